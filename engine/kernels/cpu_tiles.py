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

Attention (`engine.kernels.cpu_attention`) uses two more: `accumulate_tile`, the same loop adding
into its outputs, for the V pass; and `score_tile`, for the K pass, which scores 16 tokens' K rows
against a group's query rows and reduces the 16 dot products' vectors together (`_lane_sums`).

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


SCORE_TOKENS = LANES  # tokens one score tile takes: one vector of scores


def _lane_sums(builder: ir.IRBuilder, vectors: list) -> ir.Value:
    """One vector whose lane t is the sum of vectors[t]'s lanes, for LANES vectors.

    Pairs are folded level by level: two vectors that each hold some tokens' partial sums in
    runs of w lanes become one holding all those tokens in runs of w / 2 (the runs' first halves
    plus their second halves, one two-source shuffle each). Four levels take 16 vectors to one, in
    15 folds instead of 16 separate reductions; a last shuffle puts the tokens in order."""
    items = [(v, [t] * LANES) for t, v in enumerate(vectors)]
    width = LANES
    while len(items) > 1:
        half = width // 2
        low, high = [], []
        for source in (0, LANES):  # lanes of the first vector, then of the second
            for run in range(0, LANES, width):
                low += [source + run + i for i in range(half)]
                high += [source + run + half + i for i in range(half)]
        folded = []
        for (a, a_tokens), (b, b_tokens) in zip(items[0::2], items[1::2]):
            both = a_tokens + b_tokens
            mask_low = ir.Constant(ir.VectorType(_I32, LANES), low)
            mask_high = ir.Constant(ir.VectorType(_I32, LANES), high)
            summed = builder.fadd(builder.shuffle_vector(a, b, mask_low),
                                  builder.shuffle_vector(a, b, mask_high))
            folded.append((summed, [both[i] for i in low]))
        items, width = folded, half
    vector, tokens = items[0]
    order = ir.Constant(ir.VectorType(_I32, LANES), [tokens.index(t) for t in range(LANES)])
    return builder.shuffle_vector(vector, ir.Constant(_VEC, ir.Undefined), order)


@functools.cache
def score_tile(group: int, d_head: int):
    """`scores(q_addr, k_addr, k_step, out_addr, out_stride)`: for SCORE_TOKENS tokens whose K
    rows start at k_addr, k_step floats apart, and the `group` query rows at q_addr (d_head
    floats each, side by side), out[g * out_stride + t] = q[g] . k[t]. Attention's first pass: each
    K row is read once for the group, each product summed in vector registers, and the 16 tokens'
    sums reduced together (`_lane_sums`) instead of one at a time."""
    if not 1 <= group <= 4 or d_head % LANES or not LANES <= d_head <= 128:
        raise ValueError(f"a score tile takes 1-4 query rows of 16-128 floats, not {group} x "
                         f"{d_head}")
    chunks = d_head // LANES

    @intrinsic
    def scores(typingctx, q_addr, k_addr, k_step, out_addr, out_stride):
        sig = types.int64(*[types.int64] * 5)

        def codegen(context, builder, signature, args):
            q_addr, k_addr, k_step, out_addr, out_stride = args
            vptr, fptr = _VEC.as_pointer(), _F32.as_pointer()
            fma = _declared(builder.module, "llvm.fmuladd.v16f32",
                            ir.FunctionType(_VEC, [_VEC] * 3))
            q = builder.inttoptr(q_addr, fptr)
            k = builder.inttoptr(k_addr, fptr)
            out = builder.inttoptr(out_addr, fptr)
            qv = [[builder.load(builder.bitcast(builder.gep(q, [_i64(g * d_head + c * LANES)]),
                                                vptr), align=4) for c in range(chunks)]
                  for g in range(group)]
            partial = [[] for _ in range(group)]
            for t in range(SCORE_TOKENS):
                row = builder.gep(k, [builder.mul(k_step, _i64(t))])
                kv = [builder.load(builder.bitcast(builder.gep(row, [_i64(c * LANES)]), vptr),
                                   align=4) for c in range(chunks)]
                for g in range(group):
                    s = builder.fmul(qv[g][0], kv[0])
                    for c in range(1, chunks):
                        s = builder.call(fma, [qv[g][c], kv[c], s])
                    partial[g].append(s)
            for g in range(group):
                target = builder.gep(out, [builder.mul(out_stride, _i64(g))])
                builder.store(_lane_sums(builder, partial[g]), builder.bitcast(target, vptr),
                              align=4)
            return ir.Constant(_I64, 0)

        return sig, codegen

    return scores
