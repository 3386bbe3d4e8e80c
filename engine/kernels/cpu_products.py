"""The CPU's weight-matrix products: one object per weight, made once when the model is prepared.

A decode step multiplies a few rows (one per sequence) by every weight matrix. numpy's OpenBLAS
streams a matrix once for a single row (its matrix-vector kernel), but for two rows or more it runs
its matrix-matrix kernel, which first copies ("packs") the whole matrix into blocks, on every call:
batch 2 cost OpenBLAS about three times batch 1, and a batch-2 run had a lower throughput than a
batch-1 run. torch's CPU BLAS (MKL on x86) does not repack, so every product goes through torch
(figures: docs/benchmarks.md, "What made batches slow").

`WeightProduct` holds the weight as it will be read (a torch view of the model's own memory: no
copy is made) and computes `x @ weight.T` for numpy rows, on torch's thread pool; see
`engine.cpu_threads` for how that pool and OpenBLAS's are sized during runs.
"""
from __future__ import annotations

import numpy as np
import torch


class WeightProduct:
    """`x @ weight.T` for numpy rows x: (B, in) -> (B, out), through torch's CPU BLAS."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a weight product needs an (out, in) matrix, got {weight.dim()} dims")
        self.weight = weight.detach()  # (out, in) shape, any layout; shares the model's memory
        self.columns = self.weight.t()  # (in, out): contiguous as `cpu_backend` stores it

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return torch.mm(torch.from_numpy(x), self.columns).numpy()
