"""Grouped-query decode attention over paged K/V on the CPU, compiled (`engine.kernels.cpu_jit`).

Torch twin: `engine.kernels.paged_attention.paged_decode_attention_ref`.

Each (sequence, K/V head) pair is one job for the thread pool. A job walks the sequence's
tokens through its page table and reads each K and V row where it lies in the cache: nothing is
gathered into a copy first, so a step reads every cached byte once. For each token the group's
query heads (which share the K/V head) are scored together, so the K row is loaded once per group.
The softmax is the plain two-pass one over the job's scores, which stay in the core's cache.
"""
from __future__ import annotations

import math

import numpy as np

from engine.kernels.cpu_jit import kernel, prange


@kernel
def paged_attention(q, keys, values, tables, lens, out):
    """q (B, Hkv, G, D), already scaled; keys, values (NB, P, Hkv, D) one layer's pages;
    tables (B, W) page ids, padded; lens (B,) tokens per sequence; out (B, Hkv, G, D)."""
    batch, hkv, group, d_head = q.shape
    page = keys.shape[1]
    for job in prange(batch * hkv):
        b = job // hkv
        h = job % hkv
        n = lens[b]
        scores = np.empty((group, n), np.float32)
        for t in range(n):
            k = keys[tables[b, t // page], t % page, h]
            for g in range(group):
                s = np.float32(0)
                for d in range(d_head):
                    s += q[b, h, g, d] * k[d]
                scores[g, t] = s
        for g in range(group):
            top = scores[g, 0]
            for t in range(1, n):
                top = max(top, scores[g, t])
            total = np.float32(0)
            for t in range(n):
                e = math.exp(scores[g, t] - top)
                scores[g, t] = e
                total += e
            inv = np.float32(1) / total
            for t in range(n):
                scores[g, t] *= inv
        acc = np.zeros((group, d_head), np.float32)
        for t in range(n):
            v = values[tables[b, t // page], t % page, h]
            for g in range(group):
                p = scores[g, t]
                for d in range(d_head):
                    acc[g, d] += p * v[d]
        out[b, h] = acc


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
