"""A decode step for the CPU written against numpy: the engine's CPU kernel for pure-decode batches.

Why not torch: a decode step of the CPU default model performs some three hundred operations on
vectors of a few hundred numbers. Each torch call costs several microseconds of dispatch, and its
OpenMP pool fights numpy's OpenBLAS threads for the two cores; together that was more than a third
of a batch-1 step. The same arithmetic as numpy calls on views of the very same memory (weights,
rotary tables, KV pages) costs about a microsecond per call, and every matrix product goes through
OpenBLAS on weights stored (in, out), the layout its matrix-vector kernel streams fastest.

Only steps made of decodes alone come here (one new token per sequence, K/V written through the
slot mapping, attention over each sequence's pages); prefill chunks stay on the torch path. The
arithmetic matches `engine.model` operation for operation, in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def _rows(weight: torch.Tensor) -> np.ndarray:
    """An (in, out) numpy view of an (out, in) weight, in whatever layout it is stored."""
    return weight.detach().numpy().T


@dataclass
class _Layer:
    ln_attn: np.ndarray  # (d,)
    qkv: np.ndarray  # (d, (Hq + 2 Hkv) * D)
    o: np.ndarray  # (Hq * D, d)
    ln_mlp: np.ndarray  # (d,)
    gate_up: np.ndarray  # (d, 2F)
    down: np.ndarray  # (F, d)


class CpuDecoder:
    """Numpy views of a prepared fp32 CPU `Llama`, and the decode step over them."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.n_heads, self.n_kv, self.d_head = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                cfg.head_dim)
        self.eps = cfg.rms_norm_eps
        self.scale = self.d_head ** -0.5
        self.layers = [
            _Layer(layer.input_layernorm.weight.detach().numpy(),
                   _rows(layer.self_attn.qkv_weight), _rows(layer.self_attn.o_proj.weight),
                   layer.post_attention_layernorm.weight.detach().numpy(),
                   _rows(layer.mlp.gate_up_weight), _rows(layer.mlp.down_proj.weight))
            for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach().numpy()
        self.lm_head = _rows(model.lm_head.weight)
        table = model.model.embed_tokens.weight if model.embed_rows is None else model.embed_rows
        self.embed = table.detach().numpy()  # (vocab, d), row-major
        self.cos = model.rotary.cos.numpy()  # (max_pos, D)
        self.sin = model.rotary.sin.numpy()

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """RMSNorm over the last axis: (B, d) -> (B, d)."""
        if x.shape[0] == 1:  # batch 1: the scale is a Python float, two array operations fewer
            row = x[0]
            return x * (weight * (1.0 / math.sqrt(float(row @ row) / row.shape[0] + self.eps)))
        return x * (weight / np.sqrt(np.vecdot(x, x) / x.shape[1] + self.eps)[:, None])

    def __call__(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                 block_tables: np.ndarray, context_lens: np.ndarray, k_cache: np.ndarray,
                 v_cache: np.ndarray) -> np.ndarray:
        """Logits for one decode token per sequence: (B, vocab).

        ids, positions, slots, context_lens: (B,) ints; block_tables: (B, max_blocks), padded;
        k_cache, v_cache: (L, num_blocks, block_size, Hkv, D) views of the engine's cache.
        """
        batch = ids.shape[0]
        hq, hkv, d = self.n_heads, self.n_kv, self.d_head
        group, half, page = hq // hkv, d // 2, k_cache.shape[2]
        lens = context_lens.tolist()
        tables = [row[:-(-n // page)] for row, n in zip(block_tables.tolist(), lens)]
        cos = self.cos[positions][:, None, :]  # (B, 1, D)
        sin = self.sin[positions][:, None, :]
        h = self.embed[ids]  # (B, d)
        attn = np.empty((batch, hkv, group, d), dtype=h.dtype)
        for i, w in enumerate(self.layers):
            qkv = self._norm(h, w.ln_attn) @ w.qkv  # (B, (Hq + 2 Hkv) D)
            qk = qkv[:, :(hq + hkv) * d].reshape(batch, hq + hkv, d)
            turned = np.empty_like(qk)  # rotate-half: (-x2, x1)
            np.negative(qk[..., half:], out=turned[..., :half])
            turned[..., half:] = qk[..., :half]
            qk = qk * cos + turned * sin  # (B, Hq + Hkv, D)
            keys, values = k_cache[i], v_cache[i]  # (NB, P, Hkv, D)
            keys.reshape(-1, hkv, d)[slots] = qk[:, hq:]
            values.reshape(-1, hkv, d)[slots] = qkv[:, (hq + hkv) * d:].reshape(batch, hkv, d)
            # A group's query heads share one K/V head: (Hkv, G, D) against (Hkv, n, D).
            q = (qk[:, :hq] * self.scale).reshape(batch, hkv, group, d)
            for b in range(batch):
                n, table = lens[b], tables[b]
                k = _pages(keys, table).reshape(-1, hkv, d)[:n]  # (n, Hkv, D)
                v = _pages(values, table).reshape(-1, hkv, d)[:n]
                scores = np.matmul(q[b], k.transpose(1, 2, 0))  # (Hkv, G, n)
                scores -= scores.max(axis=-1, keepdims=True)
                np.exp(scores, out=scores)
                scores /= scores.sum(axis=-1, keepdims=True)
                np.matmul(scores, v.transpose(1, 0, 2), out=attn[b])
            h = h + attn.reshape(batch, hq * d) @ w.o
            gate_up = self._norm(h, w.ln_mlp) @ w.gate_up  # (B, 2F)
            half_width = gate_up.shape[1] // 2
            gate, up = gate_up[:, :half_width], gate_up[:, half_width:]
            # SiLU(gate) * up, with sigmoid(x) written as (1 + tanh(x / 2)) / 2: exp(-x) overflows
            # for very negative gates, tanh never does.
            h = h + (gate * (0.5 + 0.5 * np.tanh(0.5 * gate)) * up) @ w.down
        return self._norm(h, self.norm) @ self.lm_head  # (B, vocab)


def _pages(cache: np.ndarray, table: list[int]) -> np.ndarray:
    """A sequence's pages in order: a view where they sit side by side in the cache (a fresh
    block manager hands them out that way), a gathered copy otherwise. (n_pages, P, Hkv, D)"""
    first = table[0]
    if table[-1] - first == len(table) - 1 and table == list(range(first, first + len(table))):
        return cache[first:first + len(table)]
    return cache[table]
