"""The innermost loop of the CPU's weight products, written as LLVM vector code.

A decode step multiplies a few input rows (one per sequence) by each weight matrix. The work is
laid out the way BLAS kernels lay it out: the weight is packed once into panels of `PANEL`
output columns stored k-major (`engine.kernels.cpu_products.pack_panels`), so a panel is one
sequential stream, and a tile of `rows` input rows is multiplied by a whole panel:

    for k in range(K):
        w = panel[k, 0:32]                      two 16-float vector loads
        for each of the tile's rows r:
            acc[r] += broadcast(x[r, k]) * w    two fused multiply-adds

The accumulators stay in vector registers for the whole loop (2 x `rows` of them; 28 of the
CPU's 32 at 14 rows), and the panel is asked for `PREFETCH_STEPS` steps ahead of where the loop
reads it. numba cannot say either thing: its compiled loops sum a tile in scalars and leave
prefetching to the hardware, whose prefetcher does not run far enough ahead of a loop this busy.
Measured on the 33 products of a `cpu-30m` step (docs/benchmarks.md, "Fifth pass"), the prefetch
alone halved the time at 8 rows.

Each tile is a numba intrinsic: `tile(rows)` returns a function that compiled code calls with raw
addresses, and that numba pastes, as the LLVM instructions built here, into its caller. Only
llvmlite's public IR builder is used. (Each returns 0, which callers ignore: an intrinsic returns a
value.) numba's on-disk cache would follow only the calling kernel's file, not this one; so
`cpu_jit` keys the whole cache to the sources of every kernel module (`keyed_cache`).
"""
from __future__ import annotations

import functools

from llvmlite import ir

from engine.kernels.cpu_jit import intrinsic, types

LANES = 16  # floats in one vector of the widest registers (AVX-512); narrower CPUs split them
VECTORS = 2  # vectors across a panel
PANEL = LANES * VECTORS  # output columns in one panel
PREFETCH_STEPS = 64  # how far ahead the panel is asked for, in steps of k (8 KiB)

_F32 = ir.FloatType()
_I8P = ir.IntType(8).as_pointer()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VEC = ir.VectorType(_F32, LANES)


def _declared(module: ir.Module, name: str, fn_type: ir.FunctionType) -> ir.Function:
    """An LLVM intrinsic, declared once per module."""
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, fn_type, name)


def _i64(n: int) -> ir.Constant:
    return ir.Constant(_I64, n)


def _emit_tile(builder: ir.IRBuilder, rows: int, x_addr, x_stride, w_addr, w_step, y_addr,
               y_stride, k_len, accumulate: bool, read_ahead: bool) -> None:
    """Emit y[r, 0:PANEL] = sum over k of x[r, k] * w[k * w_step : k * w_step + PANEL], for
    r < `rows`; with `accumulate`, added to what y holds. With `read_ahead`, the w step
    PREFETCH_STEPS ahead is asked for at each step.

    Addresses are integers; strides and w_step count floats. The loop is k_len steps (none when
    k_len <= 0: the tile is then written as zeros, or left as it was)."""
    fptr, vptr = _F32.as_pointer(), _VEC.as_pointer()
    # a * b + c, fused where the CPU has fused multiply-add (a library call per number where not)
    fma = _declared(builder.module, "llvm.fmuladd.v16f32", ir.FunctionType(_VEC, [_VEC] * 3))
    prefetch = _declared(builder.module, "llvm.prefetch.p0i8",
                         ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]))
    x = builder.inttoptr(x_addr, fptr)
    w = builder.inttoptr(w_addr, fptr)
    y = builder.inttoptr(y_addr, fptr)
    x_rows = [builder.gep(x, [builder.mul(x_stride, _i64(r))]) for r in range(rows)]
    out_rows = [builder.gep(y, [builder.mul(y_stride, _i64(r))]) for r in range(rows)]
    out_vectors = [builder.bitcast(builder.gep(out_rows[r], [_i64(v * LANES)]), vptr)
                   for r in range(rows) for v in range(VECTORS)]
    if accumulate:
        start = [builder.load(target, align=4) for target in out_vectors]
    else:
        start = [ir.Constant(_VEC, None)] * (rows * VECTORS)
    undefined = ir.Constant(_VEC, ir.Undefined)
    splat = ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES)

    entry = builder.block
    loop = builder.function.append_basic_block("tile_loop")
    done = builder.function.append_basic_block("tile_done")
    builder.cbranch(builder.icmp_signed(">", k_len, _i64(0)), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(_I64)
    k.add_incoming(_i64(0), entry)
    acc = []
    for first in start:
        a = builder.phi(_VEC)
        a.add_incoming(first, entry)
        acc.append(a)
    step = builder.gep(w, [builder.mul(k, w_step)])
    if read_ahead:
        farther = builder.mul(w_step, _i64(PREFETCH_STEPS))
        for line in range(PANEL * 4 // 64):  # each 64-byte line of the step PREFETCH_STEPS ahead
            ahead = builder.gep(step, [builder.add(farther, _i64(line * 16))])
            # read, keep in every cache level, data (LLVM's prefetch: rw, locality, cache type)
            builder.call(prefetch, [builder.bitcast(ahead, _I8P), ir.Constant(_I32, 0),
                                    ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
    w_vectors = [builder.load(builder.bitcast(builder.gep(step, [_i64(v * LANES)]), vptr), align=4)
                 for v in range(VECTORS)]
    summed = []
    for r in range(rows):
        one = builder.insert_element(undefined, builder.load(builder.gep(x_rows[r], [k])),
                                     ir.Constant(_I32, 0))
        broadcast = builder.shuffle_vector(one, undefined, splat)
        summed += [builder.call(fma, [broadcast, w_vectors[v], acc[r * VECTORS + v]])
                   for v in range(VECTORS)]
    k_next = builder.add(k, _i64(1))
    body_end = builder.block
    k.add_incoming(k_next, body_end)
    for a, s in zip(acc, summed):
        a.add_incoming(s, body_end)
    builder.cbranch(builder.icmp_signed("<", k_next, k_len), loop, done)

    builder.position_at_end(done)
    final = []
    for first, s in zip(start, summed):  # every phi first: LLVM wants them atop the block
        f = builder.phi(_VEC)
        f.add_incoming(first, entry)
        f.add_incoming(s, body_end)
        final.append(f)
    for f, target in zip(final, out_vectors):
        builder.store(f, target, align=4)


@functools.cache
def tile(rows: int):
    """The compiled-code function `tile(x_addr, x_stride, w_addr, y_addr, y_stride, k_len)` for a
    tile of `rows` input rows against one panel (see `_emit_tile`)."""
    if not 1 <= rows <= 16:
        raise ValueError(f"a tile has 1 to 16 rows, not {rows}")

    @intrinsic
    def panel_tile(typingctx, x_addr, x_stride, w_addr, y_addr, y_stride, k_len):
        sig = types.int64(types.int64, types.int64, types.int64, types.int64, types.int64,
                          types.int64)

        def codegen(context, builder, signature, args):
            x_addr, x_stride, w_addr, y_addr, y_stride, k_len = args
            _emit_tile(builder, rows, x_addr, x_stride, w_addr, _i64(PANEL), y_addr, y_stride,
                       k_len, accumulate=False, read_ahead=True)
            return ir.Constant(_I64, 0)

        return sig, codegen

    return panel_tile


@functools.cache
def accumulate_tile(rows: int):
    """`acc_tile(x_addr, x_stride, w_addr, w_step, y_addr, y_stride, k_len)`: y[r, 0:PANEL] +=
    sum over k of x[r, k] * w[k * w_step : k * w_step + PANEL], for r < `rows`, with no read
    ahead. Attention's second pass: the scores of a group's query heads (x) against the V rows
    of one page (w), added into the group's outputs (y)."""
    if not 1 <= rows <= 16:
        raise ValueError(f"a tile has 1 to 16 rows, not {rows}")

    @intrinsic
    def acc_tile(typingctx, x_addr, x_stride, w_addr, w_step, y_addr, y_stride, k_len):
        sig = types.int64(*[types.int64] * 7)

        def codegen(context, builder, signature, args):
            _emit_tile(builder, rows, *args, accumulate=True, read_ahead=False)
            return ir.Constant(_I64, 0)

        return sig, codegen

    return acc_tile


@intrinsic
def prefetch(typingctx, address):
    """Ask for the 64-byte line at integer `address` in every cache level, without waiting for
    it (x86 `prefetcht0`). A hint only: an address outside the process's memory does no harm."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        fn = _declared(builder.module, "llvm.prefetch.p0i8",
                       ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]))
        builder.call(fn, [builder.inttoptr(args[0], _I8P), ir.Constant(_I32, 0),
                          ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return ir.Constant(_I64, 0)

    return sig, codegen
