"""A decode step for the CPU over numpy views: the engine's CPU kernel for pure-decode batches.

Why not torch for the whole step: a decode step of the CPU default model performs some three
hundred operations on vectors of a few hundred numbers, and each torch call costs several
microseconds of dispatch. Here a step is a short list of compiled calls (`engine.kernels.cpu_jit`)
on views of the model's norms and rotary tables and of the engine's KV pages, and on the weight
matrices packed once into panels when the decoder is built (`cpu_products`; a second copy of the
weights, 111 MB for `cpu-30m`, since prefill chunks and token lookups read the model's own), per
layer:
- four weight products, one call per matrix with every sequence's row (`cpu_products`);
- the rotary embedding with the K/V write into the cache, the residual adds with the norms after
  them, and SwiGLU (`cpu_layer_ops`);
- attention, reading each sequence's pages in place (`cpu_attention`).

Only steps made of decodes alone come here (one new token per sequence, K/V written through the
slot mapping, attention over each sequence's pages), and only when the runner sends them
(`engine.runner.choose_path`); prefill chunks stay on the torch path. The arithmetic matches the
torch path operation for operation, in fp32: each function that repeats a piece of it names its
torch twin, and tests/test_cpu_decode.py holds every pair to the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.kernels import cpu_jit
from engine.kernels import cpu_layer_ops as ops
from engine.kernels.cpu_attention import PagedDecodeAttention
from engine.kernels.cpu_backend import HugePageArena
from engine.kernels.cpu_products import Allocate, WeightProduct, panels_shape


@dataclass
class _Layer:
    ln_attn: np.ndarray  # (d,)
    qkv: WeightProduct  # d -> (Hq + 2 Hkv) * D
    o: WeightProduct  # Hq * D -> d
    ln_mlp: np.ndarray  # (d,)
    gate_up: WeightProduct  # d -> 2F
    down: WeightProduct  # F -> d


def _panel_memory(matrices: list[torch.Tensor]) -> Allocate:
    """Memory for every matrix's packed panels, from one huge-page arena (as the model's own
    weights are: `engine.kernels.cpu_backend`), handed out in the order asked."""
    shapes = [panels_shape(*m.shape) for m in matrices]
    arena = HugePageArena(sum(HugePageArena.size_of(s, torch.float32) for s in shapes))

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        panels, k_len, width = shape
        return arena.empty(panels * k_len, width, torch.float32, transposed=False).numpy().reshape(
            shape)

    return allocate


class CpuDecoder:
    """An fp32 CPU `Llama`'s weights as the decode step reads them (matrices packed into panels,
    views of the rest), and the step over them.

    Torch twin: `engine.model.Llama.forward` over a decodes-only batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        self.n_heads, self.n_kv, self.d_head = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                cfg.head_dim)
        self.eps = cfg.rms_norm_eps
        self.scale = np.float32(self.d_head ** -0.5)
        matrices = [model.lm_head.weight] + [m for layer in model.model.layers for m in (
            layer.self_attn.qkv_weight, layer.self_attn.o_proj.weight, layer.mlp.gate_up_weight,
            layer.mlp.down_proj.weight)]
        allocate = _panel_memory(matrices)
        products = iter([WeightProduct(m, allocate) for m in matrices])
        self.lm_head = next(products)
        self.layers = [
            _Layer(layer.input_layernorm.weight.detach().numpy(), next(products), next(products),
                   layer.post_attention_layernorm.weight.detach().numpy(), next(products),
                   next(products))
            for layer in model.model.layers]
        self.norm = model.model.norm.weight.detach().numpy()
        self.embed = model.model.embed_tokens.weight.detach().numpy()  # (vocab, d)
        self.cos = np.ascontiguousarray(model.rotary.cos.numpy())  # (max_pos, D)
        self.sin = np.ascontiguousarray(model.rotary.sin.numpy())
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
        attend = PagedDecodeAttention(block_tables, context_lens)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        h = self.embed[ids]  # (B, d), a copy: the residual stream, updated in place
        x = np.empty_like(h)  # the normed rows each product reads
        q = np.empty((batch, hq, d), np.float32)
        ops.rms_norm_into(h, self.layers[0].ln_attn, self.eps, x)
        for i, w in enumerate(self.layers):
            keys, values = k_cache[i], v_cache[i]  # (NB, P, Hkv, D)
            ops.rope_into_cache(w.qkv(x), self.cos, self.sin, positions, slots, keys,
                                values, self.scale, q)
            # A group's query heads share one K/V head: (B, Hkv, G, D) against the pages.
            heads = attend(q.reshape(batch, hkv, hq // hkv, d), keys, values)
            ops.add_rms_norm(h, w.o(heads.reshape(batch, hq * d)), w.ln_mlp, self.eps, x)
            gate_up = w.gate_up(x)
            mid = np.empty((batch, gate_up.shape[1] // 2), np.float32)
            ops.swiglu_into(gate_up, mid)
            after = self.layers[i + 1].ln_attn if i + 1 < len(self.layers) else self.norm
            ops.add_rms_norm(h, w.down(mid), after, self.eps, x)
        return self.lm_head(x)  # (B, vocab)
