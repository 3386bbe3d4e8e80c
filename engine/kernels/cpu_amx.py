"""Weight products on the CPU's AMX tile units, in bf16 pieces that add up to fp32.

Intel CPUs from Sapphire Rapids on carry AMX: eight tile registers of up to 16 rows x 64 bytes and
a unit that multiplies two bf16 tiles into an fp32 tile (`tdpbf16ps`) many times as fast as
AVX-512's fp32 fused multiply-adds. From about 8 rows on, a decode step spends as long on the
products' arithmetic as on reading the weights (docs/benchmarks.md, "Fifth pass"). But the model
is fp32, and a bf16 number holds 8 significant bits. So the numbers are cut into bf16 pieces:

- each weight, once, into hi + lo (hi the nearest bf16, lo the nearest to what is left). Two
  pieces hold 16 bits, so the decoder first rounds the model's own matrices to 16 significant
  bits (`round_in_place`: at most 2^-16 of each number, nothing at all for a bf16 or fp16
  checkpoint), and every path (prefill on MKL, the torch twin, this one) multiplies by the same
  numbers, which the pieces then hold exactly;
- each input row, per call, into hi + mid + lo (`split_rows`), which hold its 24 bits as fp32
  does;
- and x . w = x_lo.w_hi + x_mid.w_hi + x_hi.w_hi + x_mid.w_lo + x_hi.w_lo, summed in fp32 by
  the tile unit, the smaller products first. Only x_lo.w_lo, under 2^-24 of the product, is
  left out.

Measured against float64, a product is then at least as close as fp32's fused multiply-adds
are (worst 0.5-1.2e-7 of the sum of |x_k w_k|, against 1-3e-7 for the fp32 panels; on average
1e-8 against 2e-8), and the decode step's logits and K/V agree with the torch path as the fp32
panels' do (tests/test_cpu_decode.py). Without the rounding, the weights' two pieces were up to
2^-16 off, and the logits missed the tests' 1e-4. hi and lo take 4 bytes a weight, as fp32 did:
the step reads no more.

The layout, packed once (`pack_split`): a matrix's output columns in panels of 32, as the fp32
panels have them; each panel's k in blocks of 32; each block 4 KiB: w_hi for columns 0-15, w_hi
for 16-31, w_lo for 0-15, w_lo for 16-31, each a 16 x 64-byte tile in the pair-interleaved
("VNNI") order `tdpbf16ps` reads (tile row i holds k = 2i and 2i + 1 of each of 16 columns). The
rows' pieces are laid out in k-blocks of 32 with 16 rows contiguous, so that a tile is one 1 KiB
read.

`amx_product` shares the panels out over the threads; per panel, up to 32 rows at a time sum into
four fp32 tiles (two of 16 rows x two of 16 columns) for the whole k loop, while the panel streams
in, asked for `PREFETCH_BLOCKS` blocks ahead into the L2 cache. Figures in docs/benchmarks.md,
"Sixth pass".

The tile instructions are inline assembly inside numba intrinsics (llvmlite's public
`ir.InlineAsm`), which numba's LLVM reads only once its assembly parser is started
(`llvmlite.binding.initialize_native_asmparser`, at import). Linux hands a process the tiles'
8 KiB of register state only when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which `available`
does once. Where the CPU, the kernel or the user (`SERVING_LAB_AMX=0`) says no, the products stay
on the fp32 panels of `engine.kernels.cpu_products`. A tile used with a shape it was not
configured for stops the process (an illegal instruction), so `amx_product` checks its
configurations against the rows before any tile instruction runs.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir

from engine.kernels.cpu_jit import exact, intrinsic, kernel, prange, types

# The tile instructions are inline assembly, which numba's LLVM reads only with its parser.
llvm_binding.initialize_native_asmparser()

ENV = "SERVING_LAB_AMX"  # "0" keeps the products on fp32 panels
PANEL = 32  # output columns in a panel: two tiles of 16 fp32
K_BLOCK = 32  # k in one tile row: 64 bytes of bf16
TILE_ROWS = 16  # most rows in a tile
CHUNK_ROWS = 2 * TILE_ROWS  # rows multiplied in one pass over a panel
TILE_BYTES = TILE_ROWS * 64
BLOCK_BYTES = 4 * TILE_BYTES  # one k-block of one panel: hi and lo, two column halves each
PREFETCH_BLOCKS = 2  # how far ahead of the tile loads the panel is asked for (8 KiB)

_ARCH_PRCTL = 158  # x86-64 syscall number
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def _asm(text: str, n_args: int):
    """A numba intrinsic that runs `text` (AT&T syntax, arguments as $0, $1, ...: int64 values in
    general registers) and returns 0. It says it touches memory, so numba's own loads and stores
    keep their order around it; the tile registers themselves are invisible to LLVM, which never
    uses them, so they keep their contents from one call to the next within a thread."""
    constraint = ",".join(["r"] * n_args + ["~{memory}"])

    def typer(typingctx, *args):
        def codegen(context, builder, signature, values):
            fn_type = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * n_args)
            builder.call(ir.InlineAsm(fn_type, text, constraint, side_effect=True), list(values))
            return ir.Constant(ir.IntType(64), 0)

        return types.int64(*([types.int64] * n_args)), codegen

    # numba reads an intrinsic's arity from its signature, so it gets one with named arguments.
    names = ", ".join(f"a{i}" for i in range(n_args))
    scope = {"typer": typer}
    exec(f"def {'asm'}(typingctx{', ' + names if names else ''}):\n"
         f"    return typer(typingctx{', ' + names if names else ''})\n", scope)
    return intrinsic(scope["asm"])


def _load(tile: int, base: str, stride: str, offset: int = 0) -> str:
    return f"tileloadd {offset or ''}({base},{stride},1), %tmm{tile}"


def _dot(acc: int, rows: int, cols: int) -> str:
    """acc += rows (bf16, M x 32) times cols (bf16 pairs, 16 x 16 x 2), in fp32."""
    return f"tdpbf16ps %tmm{cols}, %tmm{rows}, %tmm{acc}"


def _block_text(sets: int) -> str:
    """One k-block of a panel against `sets` (1 or 2) sets of up to 16 rows.

    Arguments: $0 the panel's block, $1 the stride of every tile (64 bytes), $2-$4 the hi, mid
    and lo tiles of rows 0-15, $5-$7 those of rows 16-31. Tiles: 0-1 the sums of rows 0-15
    (columns 0-15, 16-31), 2-3 those of rows 16-31, 4 and 5 the rows, 6-7 the panel's two column
    halves."""
    rows = [("$2", "$3", "$4", 4, 0, 1), ("$5", "$6", "$7", 5, 2, 3)][:sets]
    lines = [_load(6, "$0", "$1"), _load(7, "$0", "$1", TILE_BYTES)]  # w_hi
    for hi, mid, lo, a, c0, c1 in rows:
        for piece in (lo, mid, hi):  # the smaller products first: x_lo, x_mid, x_hi . w_hi
            lines += [_load(a, piece, "$1"), _dot(c0, a, 6), _dot(c1, a, 7)]
    lines += [_load(6, "$0", "$1", 2 * TILE_BYTES), _load(7, "$0", "$1", 3 * TILE_BYTES)]  # w_lo
    for hi, mid, _lo, a, c0, c1 in rows:
        for piece in (mid, hi):  # x_mid, x_hi . w_lo
            lines += [_load(a, piece, "$1"), _dot(c0, a, 6), _dot(c1, a, 7)]
    return "\n".join(lines)


_configure = _asm("ldtilecfg ($0)", 1)
_release = _asm("tilerelease", 0)
_zero_two = _asm("tilezero %tmm0\ntilezero %tmm1", 0)
_zero_four = _asm("tilezero %tmm0\ntilezero %tmm1\ntilezero %tmm2\ntilezero %tmm3", 0)
_block_one = _asm(_block_text(1), 8)
_block_two = _asm(_block_text(2), 8)
# $0 where rows 0-15 go, $1 the output's row stride in bytes, $2 where rows 16-31 go
_store_two = _asm("tilestored %tmm0, ($0,$1,1)\ntilestored %tmm1, 64($0,$1,1)", 3)
_store_four = _asm("tilestored %tmm0, ($0,$1,1)\ntilestored %tmm1, 64($0,$1,1)\n"
                   "tilestored %tmm2, ($2,$1,1)\ntilestored %tmm3, 64($2,$1,1)", 3)
# Into the L2 cache: prefetches into L1 ran out of the core's fill buffers (no faster, in
# docs/benchmarks.md, "Sixth pass"), and a tile load from L2 is not what waits.
_prefetch_block = _asm("\n".join(f"prefetcht2 {o}($0)" for o in range(0, BLOCK_BYTES, 64)), 1)


def _features() -> list[str]:
    features = os.environ.get("NUMBA_CPU_FEATURES")
    return (features or llvm_binding.get_host_cpu_features().flatten()).split(",")


def _tile_permission() -> bool:
    """Ask Linux for the tiles' register state for this process (once; threads share it)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
        granted = ctypes.c_uint64(0)
        if libc.syscall(_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(granted)) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return bool(granted.value >> _XFEATURE_XTILEDATA & 1)


@functools.cache
def available() -> bool:
    """Whether products run on the tiles here: the CPU has AMX's tiles and bf16 products (among
    the features numba compiles for), Linux grants the tile state, and `SERVING_LAB_AMX` is not
    "0"."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    features = _features()
    if not {"+amx-tile", "+amx-bf16"} <= set(features):
        return False
    return _tile_permission()


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """The packed matrix's size counted in fp32 numbers, (panels, K rounded up to K_BLOCK,
    PANEL): the same bytes as the fp32 panels of a K that is whole blocks."""
    return -(-out_features // PANEL), -(-in_features // K_BLOCK) * K_BLOCK, PANEL


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """The nearest bf16 (ties to even) to each fp32 number, as its 16 bits."""
    u = a.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp32 numbers as bf16 bits hi, lo: hi nearest to a, lo nearest to a - hi."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    hi = _bf16_bits(a)
    return hi, _bf16_bits(a - _widen(hi))


def round_in_place(weight: np.ndarray) -> None:
    """Round each fp32 number of `weight` to hi + lo (`split`): to 16 significant bits, a change
    of at most 2^-16 of it (none for a bf16 or fp16 checkpoint's numbers). After it, the packed
    pieces hold the matrix exactly."""
    hi, lo = split(weight)
    weight[...] = (_widen(hi).astype(np.float64) + _widen(lo)).astype(np.float32)


def pack_split(weight: np.ndarray, allocate=None) -> np.ndarray:
    """An (out, in) fp32 matrix as (panels, k-blocks x 2048) bf16 bits in the layout above, zeros
    past `out` and `in`. `allocate(shape)` gives fp32 memory of `packed_shape` (default numpy's),
    which is returned viewed as 16-bit numbers."""
    out_features, in_features = weight.shape
    shape = packed_shape(out_features, in_features)
    n_panels, k_padded = shape[0], shape[1]
    padded = np.zeros((n_panels * PANEL, k_padded), np.float32)
    padded[:out_features, :in_features] = weight
    parts = np.stack(split(padded))  # (2: hi lo, out, K)
    # (part, panel, half, column, block, pair, one of the pair) ->
    # (panel, block, part, half, pair, column, one of the pair)
    parts = parts.reshape(2, n_panels, 2, 16, k_padded // K_BLOCK, 16, 2)
    parts = parts.transpose(1, 4, 0, 2, 5, 3, 6)
    memory = np.empty(shape, np.float32) if allocate is None else allocate(shape)
    packed = memory.view(np.uint16).reshape(n_panels, -1)
    packed[...] = parts.reshape(n_panels, -1)
    return packed


@intrinsic
def _bits(typingctx, number):
    """An fp32 number's 32 bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _number(typingctx, bits):
    """The fp32 number of 32 bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def _nearest_bf16(builder: ir.IRBuilder, u, lanes: int):
    """The fp32 bits u (<lanes x i32>) of the nearest bf16 numbers, ties to even."""
    def splat(n: int) -> ir.Constant:
        return ir.Constant(ir.VectorType(ir.IntType(32), lanes), [n] * lanes)

    odd = builder.and_(builder.lshr(u, splat(16)), splat(1))
    return builder.and_(builder.add(builder.add(u, splat(0x7FFF)), odd), splat(0xFFFF0000))


@intrinsic
def _split_block(typingctx, x_addr, hi_addr, mid_addr, lo_addr):
    """Split K_BLOCK fp32 numbers at x_addr into three runs of K_BLOCK bf16 bits (see
    `split_rows`), in 16-lane vectors; plain fp32 subtraction, never reordered."""
    def codegen(context, builder, signature, args):
        lanes = 16
        f_vec, i_vec = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(ir.IntType(32), lanes)
        h_vec = ir.VectorType(ir.IntType(16), lanes)
        shift = ir.Constant(i_vec, [16] * lanes)
        x = builder.inttoptr(args[0], f_vec.as_pointer())
        outs = [builder.inttoptr(a, h_vec.as_pointer()) for a in args[1:]]
        for half in range(K_BLOCK // lanes):
            at = ir.Constant(ir.IntType(64), half)
            rest = builder.load(builder.gep(x, [at]), align=4)
            for out in outs:
                near = _nearest_bf16(builder, builder.bitcast(rest, i_vec), lanes)
                builder.store(builder.trunc(builder.lshr(near, shift), h_vec),
                              builder.gep(out, [at]), align=2)
                rest = builder.fsub(rest, builder.bitcast(near, f_vec))
        return ir.Constant(ir.IntType(64), 0)

    return types.int64(types.int64, types.int64, types.int64, types.int64), codegen


@exact
def split_rows(x, pieces):
    """Split rows x (M, K) fp32 into pieces (3, K_pad / 32, M, 32) of bf16 bits: hi nearest to
    x, mid nearest to x - hi, lo nearest to x - hi - mid (together they hold x to 2^-24, as
    fp32 does); zeros past K. Exact arithmetic: compiled without fast-math reordering."""
    m_rows, k_len = x.shape
    blocks = pieces.shape[1]
    x_at, at = np.int64(x.ctypes.data), np.int64(pieces.ctypes.data)
    piece_bytes = blocks * m_rows * K_BLOCK * 2
    whole = k_len // K_BLOCK
    for b in range(whole):  # block by block, so that each piece is written in one stream
        for i in range(m_rows):
            to = at + (b * m_rows + i) * K_BLOCK * 2
            _split_block(x_at + (i * k_len + b * K_BLOCK) * 4, to, to + piece_bytes,
                         to + 2 * piece_bytes)
    for i in range(m_rows):
        for b in range(whole, blocks):  # the last, short block: zeros past K
            for lane in range(K_BLOCK):
                j = b * K_BLOCK + lane
                rest = x[i, j] if j < k_len else np.float32(0)
                for piece in range(3):
                    u = _bits(rest)
                    near = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & \
                        np.uint32(0xFFFF0000)
                    pieces[piece, b, i, lane] = near >> np.uint32(16)
                    rest = rest - _number(near)
    return 0


@functools.cache
def tile_configs(m_rows: int) -> np.ndarray:
    """`ldtilecfg`'s 64-byte records for each chunk of CHUNK_ROWS rows: palette 1; tiles 0, 1
    and 4 of the chunk's first up-to-16 rows, 2, 3 and 5 of the rest (unused when none), 6 and 7
    of 16 rows (the panel); every tile row 64 bytes. Read-only: one array serves every call."""
    chunks = -(-m_rows // CHUNK_ROWS)
    records = np.zeros((chunks, 64), np.uint8)
    for c in range(chunks):
        first = min(TILE_ROWS, m_rows - c * CHUNK_ROWS)
        second = max(0, min(TILE_ROWS, m_rows - c * CHUNK_ROWS - TILE_ROWS))
        records[c, 0] = 1
        row_bytes = records[c, 16:48].view(np.uint16)
        for tile, rows in ((0, first), (1, first), (4, first), (2, second), (3, second),
                           (5, second), (6, TILE_ROWS), (7, TILE_ROWS)):
            if rows:
                row_bytes[tile] = 64
                records[c, 48 + tile] = rows
    records.flags.writeable = False
    return records


@kernel
def amx_product(pieces, panels, out, configs):
    """out (M, P x PANEL) fp32 = rows (split: pieces (3, blocks, M, 32)) times the packed matrix
    (panels (P, blocks x 2048) bf16 bits); configs from `tile_configs(M)`. Panels are shared out
    over the threads; each pass over a panel takes up to CHUNK_ROWS rows."""
    _, blocks, m_rows, _ = pieces.shape
    n_panels = panels.shape[0]
    width = out.shape[1]
    # The tiles read and write through raw addresses: shapes are checked here, not trusted.
    if pieces.shape[0] != 3 or pieces.shape[3] != K_BLOCK or panels.shape[1] != blocks * 2048:
        raise ValueError("the rows do not match the panels")
    if out.shape[0] != m_rows or width < n_panels * PANEL:
        raise ValueError("the output is smaller than the product")
    chunks = (m_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    if configs.shape[0] != chunks or configs.shape[1] != 64:
        raise ValueError("the tile configurations do not match the rows")
    for c in range(chunks):  # a tile used with rows it was not given stops the process
        left = m_rows - c * CHUNK_ROWS
        if configs[c, 48] != min(left, TILE_ROWS) or configs[c, 50] != min(
                max(left - TILE_ROWS, 0), TILE_ROWS):
            raise ValueError("the tile configurations do not match the rows")
    row_block = m_rows * 64  # bytes between k-blocks of a piece
    piece_bytes = blocks * row_block  # bytes between pieces
    pieces_at = np.int64(pieces.ctypes.data)
    panels_at, out_at = np.int64(panels.ctypes.data), np.int64(out.ctypes.data)
    configs_at = np.int64(configs.ctypes.data)
    out_row = width * 4
    for p in prange(n_panels):
        panel = panels_at + p * blocks * BLOCK_BYTES
        for c in range(chunks):
            first = c * CHUNK_ROWS
            _configure(configs_at + c * 64)
            y = out_at + first * out_row + p * PANEL * 4
            if m_rows - first > TILE_ROWS:
                _zero_four()
                for b in range(blocks):
                    at = panel + b * BLOCK_BYTES
                    _prefetch_block(at + PREFETCH_BLOCKS * BLOCK_BYTES)
                    x = pieces_at + b * row_block + first * 64
                    x2 = x + TILE_BYTES
                    _block_two(at, 64, x, x + piece_bytes, x + 2 * piece_bytes, x2,
                               x2 + piece_bytes, x2 + 2 * piece_bytes)
                _store_four(y, out_row, y + TILE_ROWS * out_row)
            else:
                _zero_two()
                for b in range(blocks):
                    at = panel + b * BLOCK_BYTES
                    _prefetch_block(at + PREFETCH_BLOCKS * BLOCK_BYTES)
                    x = pieces_at + b * row_block + first * 64
                    _block_one(at, 64, x, x + piece_bytes, x + 2 * piece_bytes, 0, 0, 0)
                _store_two(y, out_row, 0)
            _release()


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array starting on a 64-byte line, so that each 64-byte tile
    row is one cache line (numpy aligns to 16)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class TileProduct:
    """x (M, K) fp32 times one matrix packed by `pack_split`, `packed`: (M, out_features),
    C-contiguous. The rows' pieces go to a workspace of this object's, kept from call to call
    (allocating it each time cost 0.3 ms a step in page faults): so one object serves one
    caller at a time."""

    def __init__(self, packed: np.ndarray, out_features: int) -> None:
        self.packed = packed
        self.out_features = out_features
        self._blocks = packed.shape[1] // 2048
        self._pieces = _aligned_empty((0,), np.uint16)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        m_rows = x.shape[0]
        size = 3 * self._blocks * m_rows * K_BLOCK
        if self._pieces.size < size:
            self._pieces = _aligned_empty((size,), np.uint16)
        pieces = self._pieces[:size].reshape(3, self._blocks, m_rows, K_BLOCK)
        split_rows(np.ascontiguousarray(x, dtype=np.float32), pieces)
        out = np.empty((m_rows, self.packed.shape[0] * PANEL), np.float32)
        amx_product(pieces, self.packed, out, tile_configs(m_rows))
        if out.shape[1] != self.out_features:
            return np.ascontiguousarray(out[:, :self.out_features])
        return out
