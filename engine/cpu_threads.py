"""The engine's CPU threads: during runs, torch's pool does the matrix products; OpenBLAS is held
to one thread. Also OpenMP's wait policy, which the entry points set (`quiet_openmp`).

Three thread pools live in the engine's process: torch's (OpenMP, which MKL's matrix products
run on), the compiled loops' (numba's, also OpenMP: `engine.kernels.cpu_jit`) and numpy's
OpenBLAS. A pool left at one thread per core busy-waits between its jobs on the cores another
needs, and a decode step then takes several times as long. So the heavy arithmetic of a run goes
to torch and the compiled loops, which take turns (a decode step's products and attention are
compiled loops up to 512 sequences; prefill chunks and larger batches use torch), and OpenMP's threads
sleep when idle (`quiet_openmp`); numpy is left the small per-sequence arithmetic, which gains
nothing from threads, and runs with one OpenBLAS thread (OpenBLAS also repacks a whole weight
matrix on every call of two rows or more, so no product goes through it).

How many threads a run's products get is the process's setting of "BLAS threads"
(`set_blas_threads`, the CLI's `--cpu-threads`, the lab's `LAB_CPU_THREADS`), one per core unless
told otherwise; `engine_threads` moves it onto torch's and numba's pools for the run and restores
them when the run ends (the benchmark's probe keeps every torch thread; the engine server's is
taken inside `engine_threads`, on the runs' threads). When another process wants a
core, threads of one job wait on each other and a step stretches, so a server that also renders
pages may run the engine on fewer threads. The measurements behind each choice are in
docs/benchmarks.md ("One torch thread during runs", "Under contention").

This module imports torch only inside its functions, so that `quiet_openmp` can run first.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from threadpoolctl import threadpool_info, threadpool_limits

if TYPE_CHECKING:
    import torch


def quiet_openmp() -> None:
    """Make OpenMP's idle threads sleep instead of spin, unless the user chose a wait policy.

    Call it first thing in a program, before anything imports torch: OpenMP reads
    `OMP_WAIT_POLICY` once, when torch loads it, so a later call changes nothing. That is why
    this module imports torch only inside its functions, why `python -m engine` calls it in
    `engine/__main__.py` before `engine.cli` is imported, and why no import calls it (it changes
    the environment of the whole process, children included).

    Why passive: a run's matrix products go through torch's OpenMP pool. Threads that spin while
    idle take the core from whatever else wants it, and then every product waits for the thread
    that lost its core: with another process busy on a 2-core machine, `cpu-30m` at batch 1
    measured 10-14 ms a token with passive waiting and 49-253 ms with OpenMP's default spinning.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@contextmanager
def engine_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with torch's pool and the compiled loops' pool
    (`engine.kernels.cpu_jit`) at the process's BLAS-thread setting and OpenBLAS at one thread;
    elsewhere, change nothing."""
    if device.type != "cpu":
        yield
        return
    import torch

    from engine.kernels import cpu_jit

    n = blas_threads()
    before = torch.get_num_threads()
    # numba first: the first use of its OpenMP pool can reset OpenMP's thread count, which is
    # also torch's (both load the same libgomp), so torch's is set after it, both ways.
    compiled_before = cpu_jit.set_threads(n)
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        cpu_jit.set_threads(compiled_before)
        torch.set_num_threads(before)


def cpu_label(threads: int) -> str:
    """How the page and the CLI name a CPU that runs on `threads` threads."""
    return f"CPU: {threads} thread{'s' if threads != 1 else ''}"


def usable_cores() -> int:
    """Cores this process may run on (its affinity, where the platform reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_threads() -> int:
    """Threads of the BLAS library numpy uses (the largest, if several are loaded); 1 if none."""
    import numpy  # noqa: F401  (loads numpy's BLAS, so that it can be found)

    return max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"),
               default=1)


def set_blas_threads(n: int) -> int:
    """Size numpy's BLAS pool at `n` threads for the rest of the process; returns the new size."""
    if n < 1:
        raise ValueError(f"BLAS threads must be at least 1, not {n}")
    import numpy  # noqa: F401

    threadpool_limits(limits=n, user_api="blas")
    return blas_threads()
