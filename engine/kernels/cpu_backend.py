"""The CPU's weight layout: every matrix a step streams, in one huge-page arena, stored (out, in),
row-major.

A CPU step multiplies rows by every weight matrix, so it is paced by reading the weights. Two
things make that reading cheaper, and both are decided here, once, when a model is loaded onto the
CPU (`engine.weights.load_model`):
- huge pages: with 4 KiB pages, streaming the weights costs tens of thousands of TLB misses a step;
  with 2 MiB pages, a few dozen. The kernel must run transparent huge pages in `always` or
  `madvise` mode; elsewhere the arena is plain anonymous memory and nothing else changes;
- (out, in) rows, which torch's BLAS reads for prefill chunks, and which the decode step packs
  once into panels of its own (`engine.kernels.cpu_products`, also in a huge-page arena).
What each was measured to save is in docs/benchmarks.md ("CPU weight layout"). The model itself
does not know where its matrices live: parameters keep Hugging Face's names and (out, in) shapes,
as views into the arena.
"""
from __future__ import annotations

import mmap

import torch
from torch import nn

from engine.model import Allocate, Llama

HUGE_PAGE = 2 << 20
ALIGN = 64  # a cache line: every tensor starts on one


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a whole number of `multiple`s."""
    return -(-n // multiple) * multiple


class HugePageArena:
    """One anonymous mapping, advised for huge pages, handed out as tensors front to back."""

    def __init__(self, nbytes: int) -> None:
        size = max(HUGE_PAGE, round_up(nbytes, HUGE_PAGE))
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
        if advice is not None:
            try:
                self._map.madvise(advice)
            except OSError:  # THP compiled out: ordinary pages, same behaviour
                pass
        # The tensor holds a reference to the mapping, so the memory lives as long as any view.
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._used = 0

    @staticmethod
    def size_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes one tensor takes in the arena, alignment included."""
        n = torch.Size(shape).numel() * dtype.itemsize
        return round_up(n, ALIGN)

    def empty(self, rows: int, cols: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
        """An uninitialised (rows, cols) tensor; with `transposed`, stored (cols, rows)."""
        stored = (cols, rows) if transposed else (rows, cols)
        n = self.size_of(stored, dtype)
        if self._used + n > self._bytes.numel():
            raise MemoryError(f"huge-page arena of {self._bytes.numel()} bytes is full")
        chunk = self._bytes[self._used:self._used + n]
        self._used += n
        flat = chunk.view(dtype)[:rows * cols]
        return flat.view(stored).t() if transposed else flat.view(stored)


def streamed_linears(model: Llama) -> list[nn.Linear]:
    """Every linear whose matrix a decode step reads whole: the LM head and each layer's seven."""
    return [model.lm_head] + [m for layer in model.model.layers for m in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
        layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]


def arena_allocator(model: Llama) -> Allocate:
    """(out, in)-stored matrices from one arena sized for every matrix a decode step reads."""
    dtype = model.lm_head.weight.dtype
    # Fused matrices are one allocation each, so per-linear sizes plus alignment bound them.
    arena = HugePageArena(sum(HugePageArena.size_of(m.weight.shape, dtype)
                              for m in streamed_linears(model)))
    return lambda rows, cols: arena.empty(rows, cols, dtype, transposed=False)


def move_weight(linear: nn.Linear, allocate: Allocate) -> None:
    """Rebind a linear's weight to memory from `allocate`, values unchanged."""
    with torch.no_grad():
        moved = allocate(*linear.weight.shape)
        moved.copy_(linear.weight)
        linear.weight.data = moved


def lay_out_weights(model: Llama) -> Llama:
    """Move a CPU model's streamed matrices into one huge-page arena, stored (out, in); fused
    q/k/v and gate/up are made there too. Returns the model, changed in place."""
    allocate = arena_allocator(model)
    model.fuse_weights(allocate)
    for layer in model.model.layers:
        move_weight(layer.self_attn.o_proj, allocate)
        move_weight(layer.mlp.down_proj, allocate)
    # Tied or not, the LM head is the biggest single matrix; stored (out, in), a tied one is also
    # the row-major table that token lookups read.
    move_weight(model.lm_head, allocate)
    return model
