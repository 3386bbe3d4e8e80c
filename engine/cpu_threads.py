"""The engine's CPU threads: during runs, torch's pool does the matrix products; OpenBLAS is held
to one thread.

Two thread pools live in the engine's process: torch's (OpenMP, which MKL's matrix products run
on) and numpy's OpenBLAS. Each, left at one thread per core, busy-waits between its jobs on the
cores the other needs: with both at two threads on a 2-core EPYC, a batch-1 decode step measured
15-16 ms instead of 5.5-6 ms. So a run uses one pool for its heavy arithmetic. Every weight product
of a step goes through torch (`engine.kernels.cpu_products`, `engine.model.linear`), because
OpenBLAS repacks a whole weight matrix on every call of two rows or more; numpy is left the small
per-sequence arithmetic, which gains nothing from threads, and runs with one OpenBLAS thread.

How many threads a run's products get is the process's setting of "BLAS threads"
(`set_blas_threads`, the CLI's `--cpu-threads`, the lab's `LAB_CPU_THREADS`), one per core unless
told otherwise; `engine_threads` moves it onto torch's pool for the run and restores both pools
when the run ends (the benchmark's probe keeps every torch thread). When another process wants a
core, threads of one job wait on each other and a step stretches: with one busy-loop process on a
2-core machine, `cpu-8m` at batch 8 decoded at 17-21 ms per token with two threads and at 8-9 ms
with one. A server that also renders pages may therefore run the engine on fewer threads.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_info, threadpool_limits


@contextmanager
def engine_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with torch's pool at the process's BLAS-thread setting and
    OpenBLAS at one thread; elsewhere, change nothing."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(blas_threads())
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


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
