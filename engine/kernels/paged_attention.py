"""Decode attention through block tables in torch: the reference kernel, and the oracle the Triton
kernel (`engine.kernels.triton_paged_attention`) is tested against. Which of the two a step uses is
the runner's choice (`engine.runner.choose_path`).

One query token per sequence attends to every cached token of that sequence. K and V live in pages
of `block_size` slots; `block_tables[b]` lists the physical pages of sequence b in logical order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Attention for one new token per sequence, reading K/V through block tables.

    q: (B, Hq, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D);
    block_tables: (B, max_blocks) int, padded with any valid block id; context_lens: (B,) int.
    Returns (B, Hq, D) in q's dtype.
    """
    batch, n_heads, d_head = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    max_len = block_tables.shape[1] * block_size
    k = k_cache[block_tables].view(batch, max_len, n_kv, d_head).transpose(1, 2)  # (B, Hkv, S, D)
    v = v_cache[block_tables].view(batch, max_len, n_kv, d_head).transpose(1, 2)
    # The group's query heads play the part of query positions: one fused attention call, no
    # repeated K/V for grouped-query attention.
    qg = q.view(batch, n_kv, group, d_head)  # (B, Hkv, G, D)
    visible = torch.arange(max_len, device=q.device) < context_lens[:, None]  # (B, S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=visible[:, None, None, :],
                                         scale=scale)  # (B, Hkv, G, D)
    return out.reshape(batch, n_heads, d_head)

