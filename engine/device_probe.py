"""Measure what the device can do at best: read bandwidth and dense matmul throughput.

The roofline floors (`engine.analytic`) divide bytes and FLOPs by these two numbers. The probe
needs torch and the device, so it lives apart from the formulas: a process that only draws the
floors (the lab's page process) imports `engine.analytic` without loading torch, and asks the
engine server for the probe's figures.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch

from engine.analytic import DeviceProbe
from engine.config import dtype_for
from engine.cpu_threads import cpu_label


def _times(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after one warm-up call. The probe takes their
    median, not the best: on a shared host a reading can come out far above what the memory
    sustains (two benchmark runs' probes said 48-51 GB/s on a host whose reads otherwise
    measure 24-32), and a floor resting on the best repeat inherits any such outlier."""
    fn()  # warm caches and allocators
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def probe(device_type: str = "cpu") -> DeviceProbe:
    """Measure the device once per process and, on the CPU, per number of torch threads: a
    one-thread engine's floors are one core's reads and arithmetic (the cache is the sharing, on
    purpose)."""
    return _probe(device_type, torch.get_num_threads() if device_type == "cpu" else 0)


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, _threads: int) -> DeviceProbe:
    device = torch.device(device_type)
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (256 << 20)  # far beyond any cache level
    # Decode streams weights and KV in and writes almost nothing back, so the roofline's
    # bandwidth is the read rate: bytes of a large buffer reduced per second.
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    reads = [n_bytes / t / 1e9 for t in _times(lambda: src.sum(), device, repeats=5)]
    del src
    dtype = getattr(torch, dtype_for(device.type))  # the engine's dtype: the rate it will get
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t_mm = statistics.median(_times(lambda: a @ b, device, repeats=5))
    name = torch.cuda.get_device_name(device) if cuda else cpu_label(torch.get_num_threads())
    return DeviceProbe(device=name, bandwidth_gbs=statistics.median(reads),
                       matmul_tflops=2 * n**3 / t_mm / 1e12, read_samples_gbs=tuple(reads))
