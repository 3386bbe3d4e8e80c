"""The paged KV cache, and what a step tells the model about the tokens it brings.

K and V pages per layer, `(num_blocks, block_size, n_kv_heads, d_head)` each: written through a
slot mapping, read through block tables. `AttentionMetadata` is the model's one view of paging:
the runner (`engine.runner`) builds it from the block manager's tables for every step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.config import ModelConfig

# Decode attention through block tables: (q, k_cache, v_cache, block_tables, context_lens, scale)
# -> (B, Hq, D). The runner chooses the kernel (engine.runner.choose_path) and hands it in here.
DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            float], torch.Tensor]


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk inside the flat token list."""

    start: int  # offset of the chunk's first token in the flat batch
    length: int  # tokens in the chunk
    context_len: int  # tokens cached for this sequence once the chunk is written
    block_table: torch.Tensor  # (n_blocks,) physical block ids


@dataclass
class AttentionMetadata:
    """How the flat token batch maps onto sequences and cache slots."""

    slot_mapping: torch.Tensor  # (N,) flat cache slot for each token's K/V
    num_decodes: int  # the first num_decodes tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # (num_decodes, max_blocks)
    decode_context_lens: torch.Tensor | None  # (num_decodes,) including the new token
    prefills: list[PrefillChunk]
    decode_attention: DecodeAttention | None = None  # the kernel decodes attend with, if any


class KVCache:
    """Per-layer K and V pages: (num_blocks, block_size, n_kv_heads, d_head) each."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                 cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, NB, P, Hkv, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
