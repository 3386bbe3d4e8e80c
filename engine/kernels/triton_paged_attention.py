"""Paged decode attention in Triton: the kernel CUDA steps attend with (`runner.choose_path`).

Same contract as `paged_decode_attention_ref` (the oracle, and the CPU's kernel). Design, for a GPU
where decode attention is bound by how fast K/V stream out of memory:

* One program per (sequence, KV head, split). It loads K/V of that KV head once and serves every
  query head of its group with it (grouped-query attention), so K/V bytes are read exactly once.
* Tokens are walked in tiles of BLOCK_N logical positions. Each position finds its page through
  the block table (`page = table[pos // block_size]`), so any page size works (1..256, powers of
  two or not) and a tile may straddle pages. Each row of a tile is one token's `head_dim`
  contiguous values, loaded as vectors (cp.async into shared memory on Hopper).
* Softmax is online (running max and sum, fp32, base 2), so nothing of size `context` is kept.
* Split-K (flash-decoding): when `batch * kv_heads` programs cannot fill the GPU, each sequence's
  positions are cut into `num_splits` chunks that run in parallel; a second small kernel merges the
  partial results by their log-sum-exp.
* Nothing reads a device value back to the host: the split plan comes from the block table's
  width, not from context_lens. That keeps the call capturable in a CUDA graph
  (`engine.cuda_graphs`, which passes tables of one fixed width).

The module imports without triton (then `available()` is False). The kernels are plain functions
handed to `triton.jit` on first use, not at import: `triton.jit` picks the interpreter or the
compiler from TRITON_INTERPRET when it is called, and deferring that call means the order in which
this module is imported and the variable is set does not matter.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional extra; the torch reference covers every device
    triton = None
    tl = None

MAX_SPLITS = 64  # bounds the merge kernel's tile (MAX_SPLITS x head_dim fp32 values per program)
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost (launch share, merge traffic) outweighs it


@dataclass(frozen=True)
class TileConfig:
    """Launch shape of the decode kernel; the default suits head_dim 128 in bf16 on Hopper."""

    block_n: int = 64  # tokens per tile: 64 x 128 x 2 B = 16 KB of K per step; dots need >= 16
    num_warps: int = 4  # one KV head's tile is small; more warps would wait on the same loads
    num_stages: int = 2  # tiles prefetched into shared memory while the previous one computes

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"bad launch shape: {self.num_warps} warps, {self.num_stages} stages")


def available() -> bool:
    """True when triton imports and can run here: on CUDA, or anywhere under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def _interpreting() -> bool:
    """Whether triton would run kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # triton >= 3.4 reads the variable through its knobs on each access
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, lse_ptr,
        scale_log2,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_tb,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        block_size, chunk,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention of one sequence's query heads (one KV group) over one chunk of its positions."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < GROUP  # tensor-core dots need >= 16 rows, so small groups are padded with zeros
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g  # (BLOCK_G,) query heads served by this KV head
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of p * V
    table_row = tables_ptr + seq * stride_tb
    for t0 in range(start, end, BLOCK_N):
        pos = t0 + n  # (BLOCK_N,) logical positions
        pos_ok = pos < end
        # int64 before scaling by the page stride: a large cache exceeds 2**31 elements.
        page = tl.load(table_row + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
        slot = pos % block_size
        row_ok = pos_ok[:, None] & d_ok[None, :]
        k_rows = page * stride_kb + slot * stride_ks + kv_head * stride_kh  # (BLOCK_N,)
        k = tl.load(k_ptr + k_rows[:, None] + d[None, :], mask=row_ok,
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid position
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_G, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_rows = page * stride_vb + slot * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptr + v_rows[:, None] + d[None, :], mask=row_ok,
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = g_ok[:, None] & d_ok[None, :]
    # An empty split (sequence shorter than its chunk start) has l_i == 0: write zeros, lse -inf.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]  # (BLOCK_G, BLOCK_D)
    o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    if SPLIT:
        tl.store(o_ptrs, o, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)
    else:
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)


def _merge_splits_kernel(
        part_ptr, lse_ptr, out_ptr, n_splits,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine one (sequence, query head)'s per-split outputs, weighting each by exp2(lse)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < n_splits
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s, mask=s_ok,
                  other=float("-inf"))  # (BLOCK_S,)
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds position 0, so the max is finite
    part_rows = part_ptr + seq * stride_pb + head * stride_ph + s * stride_ps  # (BLOCK_S,)
    part = tl.load(part_rows[:, None] + d[None, :], mask=s_ok[:, None] & (d[None, :] < HEAD_DIM),
                   other=0.0)  # (BLOCK_S, BLOCK_D)
    o = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)  # (BLOCK_D,)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, o.to(out_ptr.dtype.element_ty),
             mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The two kernels handed to triton.jit; cached per mode (interpreter or compiler)."""
    return triton.jit(_paged_decode_kernel), triton.jit(_merge_splits_kernel)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of one CUDA device (asked once; the answer never changes)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, n_kv: int, max_len: int, device: torch.device) -> int:
    """Splits per sequence so about two programs run per SM; 1 off CUDA or when already full."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting only adds work
    programs = batch * n_kv
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 2 * _sm_count(index)
    if programs >= target:
        return 1
    by_length = math.ceil(max_len / MIN_SPLIT_TOKENS)
    return max(1, min(math.ceil(target / programs), by_length, MAX_SPLITS))


def split_plan(batch: int, n_kv: int, max_len: int, device: torch.device,
               num_splits: int | None = None, tile: TileConfig = TileConfig()) -> tuple[int, int]:
    """(splits, tokens per split) the kernel will use: whole tiles per chunk, no empty last one."""
    splits = num_splits or default_num_splits(batch, n_kv, max_len, device)
    splits = max(1, min(splits, MAX_SPLITS, math.ceil(max_len / tile.block_n)))
    # Chunks are whole tiles, so only a sequence's last tile is ever partial.
    chunk = math.ceil(math.ceil(max_len / splits) / tile.block_n) * tile.block_n
    return math.ceil(max_len / chunk), chunk


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, context_lens: torch.Tensor,
                                  scale: float, num_splits: int | None = None,
                                  tile: TileConfig = TileConfig()) -> torch.Tensor:
    """Decode attention through block tables with the Triton kernel; same contract as the reference.

    q: (B, Hq, D); k_cache, v_cache: (num_blocks, block_size, Hkv, D);
    block_tables: (B, max_blocks) int, padded with any valid block id; context_lens: (B,) int, >= 1.
    num_splits: chunks per sequence run in parallel (None picks one from the GPU's size);
    tile: the decode kernel's launch shape.
    Returns (B, Hq, D) in q's dtype.
    """
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'serving-lab[triton]')")
    batch, n_heads, d_head = q.shape
    _, block_size, n_kv, d_cache = k_cache.shape
    if d_cache != d_head or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not "
                         f"fit q {tuple(q.shape)}")
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split into groups of {n_kv} KV heads")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head_dim must be contiguous")
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = n_heads // n_kv
    # The table's width bounds every length without reading context_lens back from the device.
    splits, chunk = split_plan(batch, n_kv, block_tables.shape[1] * block_size, q.device,
                               num_splits, tile)

    decode, merge = _kernels(_interpreting())
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, Hq, D)
    block_d = max(16, triton.next_power_of_2(d_head))
    common = dict(GROUP=group, HEAD_DIM=d_head, BLOCK_G=max(16, triton.next_power_of_2(group)),
                  BLOCK_D=block_d, BLOCK_N=tile.block_n,
                  # fp32 dots would otherwise run in TF32 and miss the reference by ~1e-3
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  num_warps=tile.num_warps, num_stages=tile.num_stages)
    scale_log2 = scale * math.log2(math.e)  # exp(x) == exp2(x * log2 e); exp2 is the native one
    kv_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                  v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
    if splits == 1:
        decode[(batch, n_kv, 1)](
            q, k_cache, v_cache, block_tables, context_lens, out, out, scale_log2,
            q.stride(0), q.stride(1), *kv_strides, block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0, block_size, chunk, SPLIT=False, **common)
        return out
    part = torch.empty(batch, n_heads, splits, d_head, device=q.device,
                       dtype=torch.float32)  # (B, Hq, S, D) per-split normalised outputs
    lse = torch.empty(batch, n_heads, splits, device=q.device, dtype=torch.float32)  # (B, Hq, S)
    decode[(batch, n_kv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, scale_log2,
        q.stride(0), q.stride(1), *kv_strides, block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        block_size, chunk, SPLIT=True, **common)
    merge[(batch, n_heads)](
        part, lse, out, splits, part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d_head, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
        num_warps=4)
    return out
