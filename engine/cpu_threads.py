"""Torch's own CPU thread pool holds one thread while the engine works.

On the CPU the heavy arithmetic of a step goes through numpy's OpenBLAS, which has its own threads
(`engine.kernels.cpu_decode`, `engine.model.linear`). Torch's OpenMP pool, left at one thread per
core, spins between its operations and takes the cores OpenBLAS needs: with torch imported before
`engine` (so before `engine/__init__.py` could ask OpenMP to wait passively) a batch-1 decode step
of the default model measured 15-16 ms instead of 5.5-6, and a 128-token prefill 430-510 ms instead
of 60-65 (2-core EPYC, `cpu-30m`). One torch thread removes the contention whatever the import
order. The setting is the process's, so it is restored when the run ends: the benchmark's Hugging
Face peer, which is all torch, keeps every thread.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
