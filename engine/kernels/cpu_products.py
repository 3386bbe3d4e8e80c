"""The CPU's weight-matrix products: one object per weight, made once when the model is prepared.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so it is paced by
reading the matrices. Two libraries were measured and both read more than the matrix:
- numpy's OpenBLAS copies ("packs") the whole matrix into blocks on every call of two rows or
  more, so batch 2 cost three times batch 1;
- torch's MKL packs too, less wastefully: a step's products at batch 8 took two to three times
  as long as reading the weights once.
So up to `most_compiled_rows()` rows (12 or 16) the product is `rows_times_weight`, a compiled loop
(`engine.kernels.cpu_jit`) that reads each weight row once, in place, and multiplies it by every
input row while it is in the core's cache. Past that, the work per weight read is high enough that
MKL's tuned blocking wins, and the product goes through torch. Figures: docs/benchmarks.md,
"Compiled loops".

`WeightProduct` holds the weight as it is read: (out, in) rows, a view of the model's own memory
(no copy is made; `engine.kernels.cpu_backend` stores the matrices that way).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.kernels import cpu_jit
from engine.kernels.cpu_jit import kernel, prange



def most_compiled_rows() -> int:
    """The most rows the compiled loop takes; more go to MKL. Measured crossover on the
    development box (docs/benchmarks.md, "Compiled loops"): the loop is faster up to 12 rows on
    one thread and up to 16 on two; past that, MKL is."""
    return 12 if cpu_jit.threads() == 1 else 16


@kernel
def rows_times_weight(x, w, out):
    """out = x @ w.T for x (M, K), w (N, K), out (M, N), all C-contiguous float32.

    Output columns are split over the threads, four at a time. For each group of four weight
    rows (which then stay in the core's first-level cache), input rows are taken four at a time:
    sixteen dot products share each load, and the compiler turns the loop over K into vector
    instructions."""
    m_rows, k_len = x.shape
    n_cols = w.shape[0]
    for block in prange((n_cols + 3) // 4):
        j = block * 4
        if j + 4 > n_cols:  # the last columns of a matrix whose width is not a multiple of 4
            for jj in range(j, n_cols):
                for m in range(m_rows):
                    s = np.float32(0)
                    for k in range(k_len):
                        s += x[m, k] * w[jj, k]
                    out[m, jj] = s
            continue
        m = 0
        while m + 4 <= m_rows:
            a00 = a01 = a02 = a03 = np.float32(0)
            a10 = a11 = a12 = a13 = np.float32(0)
            a20 = a21 = a22 = a23 = np.float32(0)
            a30 = a31 = a32 = a33 = np.float32(0)
            for k in range(k_len):
                w0, w1, w2, w3 = w[j, k], w[j + 1, k], w[j + 2, k], w[j + 3, k]
                x0, x1, x2, x3 = x[m, k], x[m + 1, k], x[m + 2, k], x[m + 3, k]
                a00 += x0 * w0
                a01 += x0 * w1
                a02 += x0 * w2
                a03 += x0 * w3
                a10 += x1 * w0
                a11 += x1 * w1
                a12 += x1 * w2
                a13 += x1 * w3
                a20 += x2 * w0
                a21 += x2 * w1
                a22 += x2 * w2
                a23 += x2 * w3
                a30 += x3 * w0
                a31 += x3 * w1
                a32 += x3 * w2
                a33 += x3 * w3
            out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = a00, a01, a02, a03
            out[m + 1, j], out[m + 1, j + 1], out[m + 1, j + 2], out[m + 1, j + 3] = (
                a10, a11, a12, a13)
            out[m + 2, j], out[m + 2, j + 1], out[m + 2, j + 2], out[m + 2, j + 3] = (
                a20, a21, a22, a23)
            out[m + 3, j], out[m + 3, j + 1], out[m + 3, j + 2], out[m + 3, j + 3] = (
                a30, a31, a32, a33)
            m += 4
        while m < m_rows:  # the last one to three rows
            a0 = a1 = a2 = a3 = np.float32(0)
            for k in range(k_len):
                xv = x[m, k]
                a0 += xv * w[j, k]
                a1 += xv * w[j + 1, k]
                a2 += xv * w[j + 2, k]
                a3 += xv * w[j + 3, k]
            out[m, j], out[m, j + 1], out[m, j + 2], out[m, j + 3] = a0, a1, a2, a3
            m += 1


class WeightProduct:
    """`x @ weight.T` for numpy rows x: (B, in) -> (B, out)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a weight product needs an (out, in) matrix, got {weight.dim()} dims")
        self.weight = weight.detach()  # (out, in), shares the model's memory
        if not self.weight.is_contiguous():
            raise ValueError("a weight product reads (out, in) rows: the weight must be stored "
                             "row-major (engine.kernels.cpu_backend does so)")
        self.rows = self.weight.numpy()  # the same memory, as the compiled loop reads it

    def __call__(self, x: np.ndarray, compiled_rows: int | None = None) -> np.ndarray:
        """`compiled_rows`: `most_compiled_rows()`, which a caller making many products in a row
        can ask once (it reads numba's thread count, a few microseconds each time)."""
        if x.shape[0] > (most_compiled_rows() if compiled_rows is None else compiled_rows):
            return torch.nn.functional.linear(torch.from_numpy(x), self.weight).numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.rows.shape[0]), np.float32)
        rows_times_weight(x, self.rows, out)
        return out
