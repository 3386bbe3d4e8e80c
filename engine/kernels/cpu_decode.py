"""A decode step for the CPU written against numpy: the engine's CPU kernel for pure-decode batches.

Why not torch for the whole step: a decode step of the CPU default model performs some three
hundred operations on vectors of a few hundred numbers. Each torch call costs several microseconds
of dispatch; the same arithmetic as numpy calls on views of the very same memory (weights, rotary
tables, KV pages) costs about a microsecond per call. The weight products are the exception: they
go through torch's BLAS (`engine.kernels.cpu_products`), one call per matrix with every
sequence's row, because numpy's OpenBLAS repacks the whole matrix on each call of two rows or more.

Attention reads each sequence's pages. One sequence attends through a view of its pages where they
sit side by side; several are attended to a few at a time, their pages gathered into one small
array (a handful of numpy calls per layer whatever the batch, instead of a dozen per sequence).

Only steps made of decodes alone come here (one new token per sequence, K/V written through the
slot mapping, attention over each sequence's pages), and only when the runner sends them
(`engine.runner.choose_path`); prefill chunks stay on the torch path. The arithmetic matches the
torch path operation for operation, in fp32: each function that repeats a piece of it names its
torch twin, and tests/test_cpu_decode.py holds every pair to the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import blocks_for
from engine.kernels.cpu_products import WeightProduct

# Sequences whose gathered K and V (per layer) stay within about this many bytes are attended to
# together: few enough numpy calls per layer at any batch, and the gathered pages stay in the
# core's L2 cache for the two products that read them, instead of going out to memory and back.
ATTENTION_CHUNK_BYTES = 1 << 20


@dataclass
class _Layer:
    ln_attn: np.ndarray  # (d,)
    qkv: WeightProduct  # d -> (Hq + 2 Hkv) * D
    o: WeightProduct  # Hq * D -> d
    ln_mlp: np.ndarray  # (d,)
    gate_up: WeightProduct  # d -> 2F
    down: WeightProduct  # F -> d


class CpuDecoder:
    """Numpy views of an fp32 CPU `Llama`'s weights, and the decode step over them.

    Torch twin: `engine.model.Llama.forward` over a decodes-only batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.n_heads, self.n_kv, self.d_head = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                cfg.head_dim)
        self.eps = cfg.rms_norm_eps
        self.scale = self.d_head ** -0.5
        self.layers = [
            _Layer(layer.input_layernorm.weight.detach().numpy(),
                   WeightProduct(layer.self_attn.qkv_weight),
                   WeightProduct(layer.self_attn.o_proj.weight),
                   layer.post_attention_layernorm.weight.detach().numpy(),
                   WeightProduct(layer.mlp.gate_up_weight),
                   WeightProduct(layer.mlp.down_proj.weight))
            for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach().numpy()
        self.lm_head = WeightProduct(model.lm_head.weight)
        table = model.model.embed_tokens.weight if model.embed_rows is None else model.embed_rows
        self.embed = table.detach().numpy()  # (vocab, d), row-major
        self.cos = model.rotary.cos.numpy()  # (max_pos, D)
        self.sin = model.rotary.sin.numpy()

    def __call__(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                 block_tables: np.ndarray, context_lens: np.ndarray, k_cache: np.ndarray,
                 v_cache: np.ndarray) -> np.ndarray:
        """Logits for one decode token per sequence: (B, vocab).

        ids, positions, slots, context_lens: (B,) ints; block_tables: (B, max_blocks), padded;
        k_cache, v_cache: (L, num_blocks, block_size, Hkv, D) views of the engine's cache.
        """
        batch = ids.shape[0]
        hq, hkv, d = self.n_heads, self.n_kv, self.d_head
        group = hq // hkv
        attend = PagedDecodeAttention(block_tables, context_lens, k_cache.shape[2], hkv, d)
        cos = self.cos[positions][:, None, :]  # (B, 1, D)
        sin = self.sin[positions][:, None, :]
        h = self.embed[ids]  # (B, d)
        for i, w in enumerate(self.layers):
            qkv = w.qkv(rms_norm(h, w.ln_attn, self.eps))  # (B, (Hq + 2 Hkv) D)
            qk = rotate(qkv[:, :(hq + hkv) * d].reshape(batch, hq + hkv, d), cos, sin)
            keys, values = k_cache[i], v_cache[i]  # (NB, P, Hkv, D)
            keys.reshape(-1, hkv, d)[slots] = qk[:, hq:]
            values.reshape(-1, hkv, d)[slots] = qkv[:, (hq + hkv) * d:].reshape(batch, hkv, d)
            # A group's query heads share one K/V head: (B, Hkv, G, D) against (n, Hkv, D).
            q = (qk[:, :hq] * self.scale).reshape(batch, hkv, group, d)
            h = h + w.o(attend(q, keys, values).reshape(batch, hq * d))
            h = h + w.down(swiglu(w.gate_up(rms_norm(h, w.ln_mlp, self.eps))))
        return self.lm_head(rms_norm(h, self.norm, self.eps))  # (B, vocab)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: (B, d) -> (B, d). Torch twin: `engine.model.RMSNorm`."""
    if x.shape[0] == 1:  # batch 1: the scale is a Python float, two array operations fewer
        row = x[0]
        return x * (weight * (1.0 / math.sqrt(float(row @ row) / row.shape[0] + eps)))
    return x * (weight / np.sqrt(np.vecdot(x, x) / x.shape[1] + eps)[:, None])


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embeddings in the rotate-half layout: x (B, H, D), cos and sin (B, 1, D) ->
    (B, H, D). Torch twin: `engine.model.rotate`."""
    half = x.shape[-1] // 2
    turned = np.empty_like(x)  # (-x2, x1)
    np.negative(x[..., half:], out=turned[..., :half])
    turned[..., half:] = x[..., :half]
    return x * cos + turned * sin


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up for the fused product (B, 2F) = [gate | up] -> (B, F). Torch twin: the
    activation in `engine.model.MLP.forward`.

    sigmoid(x) is written as (1 + tanh(x / 2)) / 2: exp(-x) overflows for very negative gates,
    tanh never does."""
    half = gate_up.shape[1] // 2
    gate, up = gate_up[:, :half], gate_up[:, half:]
    return gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up


class PagedDecodeAttention:
    """Grouped-query decode attention over paged K/V for one step. Torch twin:
    `engine.kernels.paged_attention.paged_decode_attention_ref`.

    What does not depend on the layer (page lists, chunks, masks) is worked out once here and
    reused by every layer."""

    def __init__(self, block_tables: np.ndarray, context_lens: np.ndarray, page: int, hkv: int,
                 d: int) -> None:
        self.lens = context_lens.tolist()
        pages = [blocks_for(n, page) for n in self.lens]
        self.single = len(self.lens) == 1
        if self.single:  # one sequence: its pages as a view where they are side by side
            self.table = block_tables[0, :pages[0]].tolist()
            return
        # Several: each chunk of sequences gathers its pages into one (b, T, Hkv, D) array, T
        # padded to the chunk's longest; padded positions get -inf before the softmax.
        per_seq = max(pages) * page * hkv * d * 4 * 2
        step = max(1, ATTENTION_CHUNK_BYTES // per_seq)
        self.chunks = []
        for start in range(0, len(self.lens), step):
            lens = context_lens[start:start + step]
            width = blocks_for(int(lens.max()), page)
            table = block_tables[start:start + step, :width]  # (b, pages) padded with valid ids
            positions = np.arange(width * page)
            mask = np.where(positions[None, :] < lens[:, None], 0.0, -np.inf).astype(np.float32)
            self.chunks.append((start, start + len(lens), table, mask[:, None, None, :]))

    def __call__(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """q: (B, Hkv, G, D) scaled; keys, values: (NB, P, Hkv, D) one layer's pages ->
        (B, Hkv, G, D)."""
        batch, hkv, _, d = q.shape
        if self.single:
            n = self.lens[0]
            k = _pages(keys, self.table).reshape(-1, hkv, d)[:n]  # (n, Hkv, D)
            v = _pages(values, self.table).reshape(-1, hkv, d)[:n]
            scores = np.matmul(q[0], k.transpose(1, 2, 0))  # (Hkv, G, n)
            return _softmax_product(scores, v.transpose(1, 0, 2))[None]
        out = np.empty_like(q)
        for start, stop, table, mask in self.chunks:
            b = stop - start
            k = keys[table].reshape(b, -1, hkv, d)  # (b, T, Hkv, D)
            v = values[table].reshape(b, -1, hkv, d)
            scores = np.matmul(q[start:stop], k.transpose(0, 2, 3, 1))  # (b, Hkv, G, T)
            scores += mask
            out[start:stop] = _softmax_product(scores, v.transpose(0, 2, 1, 3))
        return out


def _softmax_product(scores: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(scores) @ v over the last axis of scores, in place: (..., G, T) @ (..., T, D)."""
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.matmul(scores, v)


def _pages(cache: np.ndarray, table: list[int]) -> np.ndarray:
    """A sequence's pages in order: a view where they sit side by side in the cache (a fresh
    block manager hands them out that way), a gathered copy otherwise. (n_pages, P, Hkv, D)"""
    first = table[0]
    if table[-1] - first == len(table) - 1 and table == list(range(first, first + len(table))):
        return cache[first:first + len(table)]
    return cache[table]
