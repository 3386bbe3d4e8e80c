"""The engine's CPU threads: torch's pool held to one thread during runs; OpenBLAS's size set here.

On the CPU the heavy arithmetic of a step goes through numpy's OpenBLAS, which has its own threads
(`engine.kernels.cpu_decode`, `engine.model.linear`). Torch's OpenMP pool, left at one thread per
core, spins between its operations and takes the cores OpenBLAS needs: with torch imported before
`engine` (so before `engine/__init__.py` could ask OpenMP to wait passively) a batch-1 decode step
of the default model measured 15-16 ms instead of 5.5-6, and a 128-token prefill 430-510 ms instead
of 60-65 (2-core EPYC, `cpu-30m`). One torch thread removes the contention whatever the import
order. The setting is the process's, so it is restored when the run ends: the benchmark's Hugging
Face peer, which is all torch, keeps every thread.

OpenBLAS's own threads (one per core unless told otherwise) do the step's matrix products. When
another process or thread wants a core, they wait on each other and a step stretches: with one
busy-loop process on a 2-core machine, `cpu-8m` at batch 8 decoded at 17-21 ms per token with two
BLAS threads and at 8-9 ms with one (7-8 ms with two on a quiet machine). A server that also renders
pages may therefore run the engine on fewer BLAS threads (`set_blas_threads`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_info, threadpool_limits


@contextmanager
def one_torch_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block with torch limited to one thread; elsewhere, change nothing."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
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
