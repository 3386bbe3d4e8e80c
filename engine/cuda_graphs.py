"""Decode steps replayed as captured CUDA graphs, one per batch size on a ladder.

A decode step of a small model launches a few hundred short kernels; launched one by one from
Python, the launches, not the memory traffic, set the time per token. Here a pure-decode batch of B
sequences is padded up to the next ladder size, its inputs are copied into static buffers, and the
forward pass captured for that size replays in one launch.

Padding rows decode token 0 at position 0 with a context of one token, and write their K/V into
the scratch block: a KV block the cache holds but the block manager never hands out, so what they
write is never read by a real sequence. Block tables are padded as everywhere else, with
`PAD_BLOCK` (reads past a context length are masked, so any valid id will do), and have one fixed
width, enough blocks for `max_model_len`, so the attention kernel's launch plan is the same at
every replay. Which step replays a graph is the runner's choice (`engine.runner.choose_path`).

With `capture=False` the same padded static-buffer path runs eagerly: that is how the CPU tests
check its logic, and what a CUDA run without graphs would do were it asked to.
"""
from __future__ import annotations

import bisect

import torch

from engine.block_manager import PAD_BLOCK, blocks_for, pad_tables
from engine.kv_cache import AttentionMetadata, DecodeAttention, KVCache
from engine.model import Llama

MAX_GRAPH_BATCH = 256  # past this a step's weight and KV traffic dwarfs the launches it saves


def ladder(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every multiple of 8, up to max_batch (kept) or
    MAX_GRAPH_BATCH. Steps of 8 bound padding waste to 7 rows once batches are large."""
    top = min(max_batch, MAX_GRAPH_BATCH)
    sizes = [b for b in (1, 2, 4) if b < top] + list(range(8, top, 8))
    return sizes + [top]


def padded_size(batch: int, sizes: list[int]) -> int | None:
    """The smallest ladder size holding `batch` sequences, or None past the top of the ladder."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphs:
    """Static input buffers and, with `capture`, one CUDA graph per ladder size, sharing one pool.

    Every size is captured when the object is built (the engine's warm-up), largest first so that
    smaller graphs reuse the memory the larger ones freed. Capturing lazily would be cheaper to
    start but would land a capture, tens of milliseconds, inside the first timed step of each size.
    Memory stays bounded: at most 35 sizes (MAX_GRAPH_BATCH), static buffers sized for the largest,
    and one pool holding about one step's activations plus each size's logits. A graph's logits
    are valid only until another size replays (the pool is shared), so `run` hands them straight
    back to be sampled.
    """

    @torch.inference_mode()
    def __init__(self, model: Llama, cache: KVCache, max_batch: int, max_model_len: int,
                 scratch_block: int, capture: bool, decode_attention: DecodeAttention) -> None:
        if not 0 <= scratch_block < cache.k.shape[1]:
            raise ValueError(f"scratch block {scratch_block} is not in a cache of "
                             f"{cache.k.shape[1]} blocks")
        self.model = model
        self.cache = cache
        self.sizes = ladder(max_batch)
        self.decode_attention = decode_attention  # captured into every graph
        self.pad_slot = scratch_block * cache.block_size
        top = self.sizes[-1]
        width = blocks_for(max_model_len, cache.block_size)
        device = cache.k.device
        # Rows: input ids, positions, slot mapping, context lengths; padding values to start with,
        # so the warm-up runs before capture write only into the scratch block.
        self.rows = torch.tensor([[0] * top, [0] * top, [self.pad_slot] * top, [1] * top],
                                 dtype=torch.long, device=device)  # (4, top)
        self.tables = torch.full((top, width), PAD_BLOCK, dtype=torch.long,
                                 device=device)  # (top, width)
        self.logit_index = torch.arange(top, device=device)  # (top,) every row is sampled
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the captured (size, vocab) logits
        if capture:
            self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        """The model over the first `size` rows of the static buffers: (size, vocab) logits."""
        meta = AttentionMetadata(slot_mapping=self.rows[2, :size], num_decodes=size,
                                 decode_block_tables=self.tables[:size],
                                 decode_context_lens=self.rows[3, :size], prefills=[],
                                 decode_attention=self.decode_attention)
        return self.model(self.rows[0, :size], self.rows[1, :size], self.cache, meta,
                          self.logit_index[:size])

    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            # One eager run first: Triton compiles this size's kernel variants and cuBLAS sets up
            # its workspace, neither of which may happen during capture.
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread of the server touching CUDA must not break the capture.
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph

    @torch.inference_mode()
    def run(self, ids: list[int], positions: list[int], slots: list[int],
            tables: list[list[int]], context_lens: list[int]) -> torch.Tensor:
        """One decode step for len(ids) sequences (at most `max_batch`): (B, vocab) logits.

        Arguments are per sequence, as the runner builds them: the token fed, its position, its
        cache slot, its block table (any length up to the fixed width) and its context length.
        """
        n = len(ids)
        size = padded_size(n, self.sizes)
        if size is None:
            raise ValueError(f"a decode batch of {n} is past the ladder's top of {self.max_batch}")
        pad = size - n
        # Two host-to-device copies per step: the four per-row values, then the block tables.
        # Table columns past a row's length keep stale ids from earlier steps; every one is a
        # valid block id and attention masks it by context length.
        self.rows[:, :size].copy_(torch.tensor(
            [ids + [0] * pad, positions + [0] * pad, slots + [self.pad_slot] * pad,
             context_lens + [1] * pad], dtype=torch.long))
        width = max(len(t) for t in tables)
        self.tables[:size, :width].copy_(torch.tensor(
            pad_tables(tables + [[]] * pad, width), dtype=torch.long))
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size][:n]
        return self._forward(size)[:n]
