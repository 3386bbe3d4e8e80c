"""A decode step for the CPU written against numpy: the engine's CPU kernel for pure-decode batches.

Why not torch for the whole step: a decode step of the CPU default model performs some three
hundred operations on vectors of a few hundred numbers. Each torch call costs several microseconds
of dispatch; the same arithmetic as numpy calls on views of the very same memory (weights, rotary
tables, KV pages) costs about a microsecond per call. The weight products are one call per matrix
with every sequence's row.

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

from engine.kernels import cpu_jit
from engine.kernels.cpu_attention import PagedDecodeAttention
from engine.kernels.cpu_products import WeightProduct


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
        self.embed = model.model.embed_tokens.weight.detach().numpy()  # (vocab, d)
        self.cos = model.rotary.cos.numpy()  # (max_pos, D)
        self.sin = model.rotary.sin.numpy()
        cpu_jit.warm_up()

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
        attend = PagedDecodeAttention(block_tables, context_lens)
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
