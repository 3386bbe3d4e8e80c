"""Grouped-query decode attention over paged K/V on the CPU, compiled (`engine.kernels.cpu_jit`).

Torch twin: `engine.kernels.paged_attention.paged_decode_attention_ref`.

Each sequence is one job for the thread pool (with fewer sequences than would keep the threads
busy, each K/V head of a sequence is). A job walks the sequence's page table page by page and
reads every K and V row where it lies in the cache: nothing is gathered into a copy first, so a
step reads every cached byte once. A token's K/V rows for all heads sit side by side, and so do
a page's tokens, so a job reads each page as one run of memory (one job per (sequence, head) read
rows a kilobyte apart, and waited on memory for each: docs/benchmarks.md, "Attention reads pages
front to back"). The hardware prefetcher stops at each page's edge, so while a job reads one page
it asks for the next (`cpu_tiles.prefetch`).

Within a job, each token's K row is loaded once for the group's query heads that share it. Where
the head size is 64 (`SCORE_HEAD`, every preset's) and a group has 1 to 4 query heads, a page's
tokens are scored 16 at a time through `cpu_tiles.score_tile`, which sums the 16 dot products'
vectors together instead of reducing each across its lanes alone (a `cpu-30m` layer's attention at
batch 16 and 32, two threads: 0-14 % less time, 8 % in the median of five runs, docs/benchmarks.md,
"Sixth look"); other tokens, a token at a time. The softmax is the plain two-pass one over the
job's scores, which stay in the core's cache, with the exponential computed by
`cpu_math.exp_below_zero` so that the loop stays in vector instructions.
The V pass runs a page at a time through `cpu_tiles.accumulate_tile` (each V row read once for the
group, the group's outputs summed in registers) where the head size is a multiple of 32 and a
group has 1 to 4 query heads, and through a plain loop otherwise.
"""
from __future__ import annotations

import numpy as np

from engine.kernels.cpu_jit import inline, kernel, prange
from engine.kernels.cpu_math import exp_below_zero
from engine.kernels.cpu_tiles import PANEL, SCORE_TOKENS, accumulate_tile, prefetch, score_tile

LINE = 64  # bytes in a cache line
SCORE_HEAD = 64  # the head size the score tiles are built for: every preset's

@inline
def dot(a, b, d_head):
    """a[:d_head] . b[:d_head]; the usual head size is spelled out so the compiler unrolls it
    into whole vector instructions."""
    s = np.float32(0)
    if d_head == 64:
        for d in range(64):
            s += a[d] * b[d]
    else:
        for d in range(d_head):
            s += a[d] * b[d]
    return s


@inline
def prefetch_rows(base, strides, block, slot, h0, nbytes):
    """Ask for a token's rows of heads h0.. (`nbytes` of them, side by side) in page `block`."""
    start = base + block * strides[0] + slot * strides[1] + h0 * strides[2]
    for line in range(0, nbytes, LINE):
        prefetch(start + line)


@inline
def ask_ahead(keys, values, k_at, v_at, following, slot, left, h0, nbytes):
    """While the K pass reads a page: ask for the next page's K rows at `slot` (`left` tokens
    remain after this page), or, on the last page (left <= 0), the first V page's rows."""
    if slot < left:
        prefetch_rows(k_at, keys.strides, following, slot, h0, nbytes)
    elif left <= 0:
        prefetch_rows(v_at, values.strides, following, slot, h0, nbytes)


_ACC1, _ACC2, _ACC3, _ACC4 = (accumulate_tile(rows) for rows in range(1, 5))
_S1, _S2, _S3, _S4 = (score_tile(group, SCORE_HEAD) for group in range(1, 5))


@inline
def score_rows(group, q, k, k_step, out, out_stride):
    """The score tile (cpu_tiles.score_tile) for `group` query rows of SCORE_HEAD floats."""
    if group == 1:
        _S1(q, k, k_step, out, out_stride)
    elif group == 2:
        _S2(q, k, k_step, out, out_stride)
    elif group == 3:
        _S3(q, k, k_step, out, out_stride)
    elif group == 4:
        _S4(q, k, k_step, out, out_stride)


@inline
def add_weighted_rows(group, x, x_stride, w, w_step, y, y_stride, k_len):
    """The `group`-row accumulate tile (cpu_tiles.accumulate_tile), for groups of 1 to 4."""
    if group == 1:
        _ACC1(x, x_stride, w, w_step, y, y_stride, k_len)
    elif group == 2:
        _ACC2(x, x_stride, w, w_step, y, y_stride, k_len)
    elif group == 3:
        _ACC3(x, x_stride, w, w_step, y, y_stride, k_len)
    elif group == 4:
        _ACC4(x, x_stride, w, w_step, y, y_stride, k_len)


@kernel
def paged_attention(q, keys, values, tables, lens, out):
    """q (B, Hkv, G, D), already scaled; keys, values (NB, P, Hkv, D) one layer's pages;
    tables (B, W) page ids, padded; lens (B,) tokens per sequence; out (B, Hkv, G, D)."""
    batch, hkv, group, d_head = q.shape
    page = keys.shape[1]
    splits = hkv if batch < 4 else 1  # too few sequences to share out: split by head too
    heads = hkv // splits
    k_at = np.int64(keys.ctypes.data)
    v_at = np.int64(values.ctypes.data)
    row_bytes = heads * d_head * 4  # one token's rows for a job's heads
    v_step = values.strides[1] // 4  # floats from one token's V rows to the next one's
    tiled = (d_head % PANEL == 0 and 1 <= group <= 4 and values.strides[3] == 4
             and values.strides[1] % 4 == 0)
    q_at = np.int64(q.ctypes.data)
    k_step = keys.strides[1] // 4  # floats from one token's K rows to the next one's
    scoring = (d_head == SCORE_HEAD and 1 <= group <= 4 and keys.strides[3] == 4
               and keys.strides[1] % 4 == 0 and q.strides[3] == 4
               and q.strides[2] == d_head * 4 and q.strides[1] == group * d_head * 4
               and q.strides[0] == hkv * group * d_head * 4)
    for job in prange(batch * splits):
        b = job // splits
        h0 = (job % splits) * heads
        n = lens[b]
        if n <= 0:  # nothing to attend to (the engine never sends this)
            out[b, h0:h0 + heads] = 0
            continue
        scores = np.empty((heads, group, n), np.float32)
        scores_at = np.int64(scores.ctypes.data)
        for first in range(0, n, page):
            block = tables[b, first // page]
            ahead = first + page  # the next page, asked for while this one is read
            following = tables[b, ahead // page] if ahead < n else tables[b, 0]
            count = min(page, n - first)
            slot = 0
            while scoring and slot + SCORE_TOKENS <= count:  # 16 tokens at a time (cpu_tiles)
                for s in range(slot, slot + SCORE_TOKENS):
                    ask_ahead(keys, values, k_at, v_at, following, s, n - ahead, h0, row_bytes)
                for h in range(heads):
                    score_rows(group, q_at + ((b * hkv + h0 + h) * group) * d_head * 4,
                               k_at + block * keys.strides[0] + slot * keys.strides[1]
                               + (h0 + h) * keys.strides[2], k_step,
                               scores_at + ((h * group) * n + first + slot) * 4, n)
                slot += SCORE_TOKENS
            for slot in range(slot, count):  # the rest, a token at a time
                ask_ahead(keys, values, k_at, v_at, following, slot, n - ahead, h0, row_bytes)
                for h in range(heads):
                    k = keys[block, slot, h0 + h]
                    for g in range(group):
                        scores[h, g, first + slot] = dot(q[b, h0 + h, g], k, d_head)
        bits = np.empty(n, np.int32)
        for h in range(heads):
            for g in range(group):
                row = scores[h, g]
                top = row[0]
                for t in range(1, n):
                    top = max(top, row[t])
                for t in range(n):
                    row[t] -= top
                exp_below_zero(row, bits, n)
                total = np.float32(0)
                for t in range(n):
                    total += row[t]
                inv = np.float32(1) / total
                for t in range(n):
                    row[t] *= inv
        acc = np.zeros((heads, group, d_head), np.float32)
        acc_at = np.int64(acc.ctypes.data)
        for first in range(0, n, page):
            block = tables[b, first // page]
            ahead = first + page
            if ahead < n:
                following = tables[b, ahead // page]
                for slot in range(min(page, n - ahead)):
                    prefetch_rows(v_at, values.strides, following, slot, h0, row_bytes)
            if tiled:  # each half-row of V read once for the group's query heads (cpu_tiles)
                for h in range(heads):
                    for c in range(0, d_head, PANEL):
                        add_weighted_rows(
                            group, scores_at + ((h * group) * n + first) * 4, n,
                            v_at + block * values.strides[0] + (h0 + h) * values.strides[2]
                            + c * 4, v_step, acc_at + ((h * group) * d_head + c) * 4, d_head,
                            min(page, n - first))
                continue
            for slot in range(min(page, n - first)):
                for h in range(heads):
                    v = values[block, slot, h0 + h]
                    for g in range(group):
                        p = scores[h, g, first + slot]
                        for d in range(d_head):
                            acc[h, g, d] += p * v[d]
        out[b, h0:h0 + heads] = acc


class PagedDecodeAttention:
    """One step's attention, layer after layer: the page tables and lengths are made into the
    arrays the kernel reads once, and reused by every layer."""

    def __init__(self, block_tables: np.ndarray, context_lens: np.ndarray) -> None:
        self.tables = np.ascontiguousarray(block_tables, dtype=np.int64)
        self.lens = np.ascontiguousarray(context_lens, dtype=np.int64)

    def __call__(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """q: (B, Hkv, G, D) scaled; keys, values: (NB, P, Hkv, D) one layer's pages ->
        (B, Hkv, G, D)."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        paged_attention(q, keys, values, self.tables, self.lens, out)
        return out
