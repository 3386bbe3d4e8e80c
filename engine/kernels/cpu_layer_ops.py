"""A decoder layer's small operations on the CPU, compiled (`engine.kernels.cpu_jit`): the norms,
the rotary embedding with the K/V write, and SwiGLU.

Between its four weight products and its attention, a layer does a dozen elementwise passes over
a few rows. As numpy calls these were some twenty calls a layer, each paying a microsecond or
more of dispatch and a pass over memory of its own, and at batch 32 the part of a `cpu-8m` step
outside the products and attention took 3.6 ms of 15 (docs/benchmarks.md, "Fewer, fused
calls"). Here each is one loop, fused where one result feeds the next: a residual add with the
norm after it, and the rotation with the write into the cache. They run on the calling thread,
except SwiGLU, the widest, whose rows are shared out over the threads (one `cpu-30m` layer at 32
rows: 62 us on one thread, 12 us on two).

Each function names its torch twin; tests/test_cpu_decode.py holds every pair to the same numbers.
"""
from __future__ import annotations

import numpy as np

from engine.kernels.cpu_jit import kernel, prange, serial
from engine.kernels.cpu_math import exp_below_zero


@serial
def rms_norm_into(x, weight, eps, out):
    """out = RMSNorm(x) * weight over the last axis of (B, d) rows. Torch twin: `engine.model.RMSNorm`."""
    rows, width = x.shape
    for b in range(rows):
        squares = np.float32(0)
        for i in range(width):
            squares += x[b, i] * x[b, i]
        inv = np.float32(1) / np.sqrt(squares / np.float32(width) + np.float32(eps))
        for i in range(width):
            out[b, i] = x[b, i] * inv * weight[i]


@serial
def add_rms_norm(h, delta, weight, eps, out):
    """The residual add and the norm after it: h += delta (in place), out = RMSNorm(h) * weight.
    Torch twin: `h = h + delta` then `engine.model.RMSNorm`."""
    rows, width = h.shape
    for b in range(rows):
        for i in range(width):
            h[b, i] += delta[b, i]
    rms_norm_into(h, weight, eps, out)


@serial
def rope_into_cache(qkv, cos, sin, positions, slots, keys, values, scale, q):
    """Rotary embedding for one decode token per sequence, its K and V written into the cache.

    qkv (B, (Hq + 2 Hkv) D), the fused projection: query heads, then K heads, then V heads;
    cos, sin (max_pos, D) tables; positions, slots (B,); keys, values (NB, P, Hkv, D), one
    layer's pages; q (B, Hq, D) receives the rotated queries times `scale`.
    Torch twin: `engine.model.rotate` (rotate-half layout), then the cache write and the scaling
    in `engine.model.Attention.forward`."""
    batch, hq, d_head = q.shape
    hkv = keys.shape[2]
    page = keys.shape[1]
    half = d_head // 2
    for b in range(batch):
        c = cos[positions[b]]
        s = sin[positions[b]]
        block, offset = slots[b] // page, slots[b] % page
        for head in range(hq + hkv):
            base = head * d_head
            for i in range(half):
                x1, x2 = qkv[b, base + i], qkv[b, base + half + i]
                first = x1 * c[i] - x2 * s[i]
                second = x2 * c[half + i] + x1 * s[half + i]
                if head < hq:
                    q[b, head, i] = first * scale
                    q[b, head, half + i] = second * scale
                else:
                    keys[block, offset, head - hq, i] = first
                    keys[block, offset, head - hq, half + i] = second
        base = (hq + hkv) * d_head
        for head in range(hkv):
            for i in range(d_head):
                values[block, offset, head, i] = qkv[b, base + head * d_head + i]


@kernel
def swiglu_into(gate_up, out):
    """SiLU(gate) * up for the fused product (B, 2F) = [gate | up] -> out (B, F).
    Torch twin: the activation in `engine.model.MLP.forward`.

    SiLU(x) = x sigmoid(x), with sigmoid from e = exp(-|x|) <= 1, which never overflows:
    1 / (1 + e) for x >= 0 and e / (1 + e) below."""
    rows, width = out.shape
    for b in prange(rows):  # rows shared out over the threads: the step's largest elementwise op
        e = np.empty(width, np.float32)
        bits = np.empty(width, np.int32)
        for i in range(width):
            e[i] = -abs(gate_up[b, i])
        exp_below_zero(e, bits, width)
        for i in range(width):
            gate = gate_up[b, i]
            sig = (np.float32(1) if gate >= 0 else e[i]) / (np.float32(1) + e[i])
            out[b, i] = gate * sig * gate_up[b, width + i]
