"""Elementwise functions for the compiled CPU loops (`engine.kernels.cpu_jit`), written so that the
compiler keeps a loop over them in vector instructions.

Numba calls the C library's `expf` once per number, and a call inside a loop stops LLVM from
vectorising it (this build of llvmlite has no vector math library): a softmax or a SiLU over a
row then runs one number at a time. The functions here are plain arithmetic instead.
"""
from __future__ import annotations

import numpy as np

from engine.kernels.cpu_jit import inline

LOG2_E = np.float32(1.4426950408889634)
# ln 2 split in two: the first part has few enough bits that n * LN2_HI is exact for |n| < 2^9.
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)
LOWEST = np.float32(-87.0)  # exp(-87) ~ 1.6e-38, the smallest normal float32 is 1.2e-38


@inline
def exp_below_zero(row, bits, n):
    """row[:n] = exp(row[:n]) for row <= 0 (a softmax's scores minus their maximum), in place.

    The library's expf is one call per number, which stops the compiler from vectorising the
    loop; this is the textbook split instead: x = n ln2 + r with |r| <= ln2 / 2, e^r from its
    Taylor series to r^6 (relative error about 1e-7, float32's own precision), and 2^n written
    straight into a float's exponent bits. `bits` is int32 scratch of at least n values."""
    scale = bits.view(np.float32)
    for t in range(n):
        x = max(row[t], LOWEST)
        k = np.floor(x * LOG2_E + np.float32(0.5))
        r = x - k * LN2_HI - k * LN2_LO
        row[t] = np.float32(1) + r * (np.float32(1) + r * (np.float32(1 / 2) + r * (
            np.float32(1 / 6) + r * (np.float32(1 / 24) + r * (
                np.float32(1 / 120) + r * np.float32(1 / 720))))))
        bits[t] = (np.int32(k) + np.int32(127)) << np.int32(23)
    for t in range(n):
        row[t] *= scale[t]
