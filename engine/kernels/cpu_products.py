"""The CPU's weight-matrix products: one object per weight, made once when the model is prepared.

A decode step multiplies a few rows (one per sequence) by every weight matrix. numpy's OpenBLAS
streams a matrix once for a single row (its matrix-vector kernel), but for two rows or more it runs
its matrix-matrix kernel, which first copies ("packs") the whole matrix into blocks, on every call.
Measured on the 2-core development box (one thread, CPU time of the 33 products of a `cpu-30m`
step, two runs): OpenBLAS 6.8-8.4 ms at batch 1 and 18.5-21.1 ms at batch 2; torch's CPU BLAS (MKL
on x86) on the same weights, 7.7-10.2 ms and 7.8-10.4 ms. So a batch-2 run had a
lower throughput than a batch-1 run, and every product now goes through torch.

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
        self.columns = self.weight.t()  # (in, out): contiguous as `Llama.prepare` stores it

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return torch.mm(torch.from_numpy(x), self.columns).numpy()
