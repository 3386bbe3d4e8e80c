"""Decode attention through block tables: the torch reference path, used on the CPU and as the
oracle for the Triton kernel.

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


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA when triton is installed, else the torch reference."""
    if q.is_cuda:
        from engine.kernels import triton_paged_attention as tpa
        if tpa.available():
            return tpa.paged_decode_attention_triton(q, k_cache, v_cache, block_tables,
                                                     context_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
