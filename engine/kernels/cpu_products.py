"""The CPU's weight-matrix products: one object per weight, packed once when the decoder is built.

A decode step multiplies a few rows (one per sequence) by every weight matrix, so it is paced by
reading the matrices, and from about 16 rows on by the arithmetic too. What was measured
(docs/benchmarks.md, "What made batches slow", "Compiled loops", "Fifth pass"):
- numpy's OpenBLAS copies ("packs") the whole matrix into blocks on every call of two rows or
  more, so batch 2 cost three times batch 1;
- torch's MKL packs too, less wastefully: a step's products at batch 8 took two to three times
  as long as reading the weights once;
- a numba loop over the (out, in) rows read each weight once, but neither kept its sums in vector
  registers nor read far enough ahead: at 8 rows and more it cost the read plus the arithmetic.
So each weight is packed once, here, into panels of `PANEL` output columns stored k-major, and
`panel_product` runs the vector tiles of `engine.kernels.cpu_tiles` over them: tiles of up to 14
rows (`tile_rows()`), panels shared out over the threads. Past `MOST_PANEL_ROWS` rows (far beyond
any decode batch the lab or the bench makes) the product goes to MKL, on the model's own matrix.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.kernels import cpu_jit
from engine.kernels.cpu_jit import kernel, prange
from engine.kernels.cpu_tiles import PANEL, tile

# Past this many rows MKL is as fast (the 33 products of a `cpu-30m` step on two threads: 101
# against 120 ms at 512 rows, 218 against 208 at 1024).
MOST_PANEL_ROWS = 512

Allocate = Callable[[tuple[int, ...]], np.ndarray]

_T1, _T2, _T3, _T4, _T5, _T6 = tile(1), tile(2), tile(3), tile(4), tile(5), tile(6)
_T7, _T8, _T9, _T10, _T11, _T12 = tile(7), tile(8), tile(9), tile(10), tile(11), tile(12)
_T13, _T14 = tile(13), tile(14)


def tile_rows() -> int:
    """The most input rows one tile takes: 14 with AVX-512's 32 vector registers (28
    accumulators, two for the panel's step, one for a broadcast input), 2 with AVX2's 16 (each
    16-float vector takes two registers there)."""
    return 14 if cpu_jit.has_avx512() else 2


def panels_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(panels, K, PANEL): the packed shape of an (out, in) matrix, out padded to whole panels."""
    return -(-out_features // PANEL), in_features, PANEL


def pack_panels(weight: np.ndarray, allocate: Allocate | None = None) -> np.ndarray:
    """An (out, in) matrix as (panels, in, PANEL): panel p, step k holds
    weight[p * PANEL : (p + 1) * PANEL, k]; rows past `out` are zeros. `allocate(shape)` gives
    the memory (default: numpy's)."""
    out_features, in_features = weight.shape
    shape = panels_shape(out_features, in_features)
    padded = np.zeros((shape[0] * PANEL, in_features), np.float32)
    padded[:out_features] = weight
    packed = np.empty(shape, np.float32) if allocate is None else allocate(shape)
    packed[...] = padded.reshape(shape[0], PANEL, in_features).transpose(0, 2, 1)
    return packed


@kernel
def panel_product(x, panels, out, most_rows):
    """out = x times the packed matrix: x (M, K), panels (P, K, PANEL), out (M, P * PANEL), all
    C-contiguous float32.

    Panels are shared out over the threads. Each panel is multiplied by the rows in tiles of at
    most `most_rows` rows: the first tile as large as it can be, since it is the one that waits
    on memory and has time for arithmetic while the panel streams in; the rest, which read the
    panel from the core's own cache, as even as possible (32 rows: 14, then 9 and 9). Measured
    at 16 rows, a first tile of 14 took 4.7-5.4 ms for a step's products where two of 8 took
    5.9 (docs/benchmarks.md, "Fifth pass")."""
    m_rows, k_len = x.shape
    n_panels = panels.shape[0]
    width = out.shape[1]
    # The tiles read and write through raw addresses: shapes are checked here, not trusted.
    if panels.shape[1] != k_len or panels.shape[2] != PANEL:
        raise ValueError("the panels do not match the rows' width")
    if out.shape[0] < m_rows or width < n_panels * PANEL:
        raise ValueError("the output is smaller than the product")
    most_rows = max(1, min(most_rows, 14))
    x_at = np.int64(x.ctypes.data)
    panels_at = np.int64(panels.ctypes.data)
    out_at = np.int64(out.ctypes.data)
    later = (max(m_rows - most_rows, 0) + most_rows - 1) // most_rows  # tiles after the first
    for p in prange(n_panels):
        w = panels_at + p * k_len * PANEL * 4
        m = 0
        for t in range(later + 1):
            if t == 0:
                r = min(m_rows, most_rows)
            else:
                left = later + 1 - t
                r = (m_rows - m + left - 1) // left
            xm = x_at + m * k_len * 4
            y = out_at + (m * width + p * PANEL) * 4
            if r == 1:
                _T1(xm, k_len, w, y, width, k_len)
            elif r == 2:
                _T2(xm, k_len, w, y, width, k_len)
            elif r == 3:
                _T3(xm, k_len, w, y, width, k_len)
            elif r == 4:
                _T4(xm, k_len, w, y, width, k_len)
            elif r == 5:
                _T5(xm, k_len, w, y, width, k_len)
            elif r == 6:
                _T6(xm, k_len, w, y, width, k_len)
            elif r == 7:
                _T7(xm, k_len, w, y, width, k_len)
            elif r == 8:
                _T8(xm, k_len, w, y, width, k_len)
            elif r == 9:
                _T9(xm, k_len, w, y, width, k_len)
            elif r == 10:
                _T10(xm, k_len, w, y, width, k_len)
            elif r == 11:
                _T11(xm, k_len, w, y, width, k_len)
            elif r == 12:
                _T12(xm, k_len, w, y, width, k_len)
            elif r == 13:
                _T13(xm, k_len, w, y, width, k_len)
            elif r == 14:
                _T14(xm, k_len, w, y, width, k_len)
            m += r


class WeightProduct:
    """`x @ weight.T` for numpy rows x: (B, in) -> (B, out), over panels packed once, here."""

    def __init__(self, weight: torch.Tensor, allocate: Allocate | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a weight product needs an (out, in) matrix, got {weight.dim()} dims")
        if weight.dtype != torch.float32:
            raise ValueError(f"the CPU decode step multiplies fp32 weights, not {weight.dtype}")
        self.weight = weight.detach()  # (out, in), the model's own, for MKL past the panel rows
        self.out_features = self.weight.shape[0]
        self.panels = pack_panels(self.weight.numpy(), allocate)
        self.tile_rows = tile_rows()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != self.panels.shape[1]:  # the kernel trusts its shapes
            raise ValueError(f"rows of {self.panels.shape[1]} inputs expected, got {x.shape}")
        if x.shape[0] > MOST_PANEL_ROWS:
            return torch.nn.functional.linear(torch.from_numpy(x), self.weight).numpy()
        if x.shape[0] == 0:
            return np.empty((0, self.out_features), np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty((x.shape[0], self.panels.shape[0] * PANEL), np.float32)
        panel_product(x, self.panels, out, self.tile_rows)
        if out.shape[1] != self.out_features:  # a width that is not a whole number of panels
            return np.ascontiguousarray(out[:, :self.out_features])
        return out
