"""The numpy decode step (engine.kernels.cpu_decode) against the model's torch path, and its use.

The torch path is itself checked against a contiguous forward and against Hugging Face in
test_engine_paged.py and test_engine_peer.py; here the two CPU paths must agree on logits and on
what they write into the cache, over batch sizes, page sizes, ragged lengths and scattered tables:
the whole step, each numpy function against the torch twin its docstring names, and the runner
driving either path over the same steps. Also the CPU weight layout (engine.kernels.cpu_backend).
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager, blocks_for, pad_tables
from engine.config import PRESETS
from engine.kernels import cpu_attention, cpu_jit, cpu_layer_ops, cpu_math, cpu_products
from engine.kernels.cpu_backend import HugePageArena
from engine.kernels.cpu_decode import CpuDecoder
from engine.kernels.paged_attention import paged_decode_attention_ref
from engine.kv_cache import AttentionMetadata, KVCache
from engine.model import Llama, rotate
from engine.records import RequestRecord
from engine.runner import ModelRunner
from engine.scheduler import Batch
from engine.sequence import Sequence
from engine.weights import load_model

CFG = replace(PRESETS["tiny"], initializer_range=0.3)  # logits spread over units: 1e-4 bites


@pytest.fixture(scope="module")
def model() -> Llama:
    return load_model("tiny", 0, torch.device("cpu"), torch.float32, CFG)


def _decode_inputs(model: Llama, lens: list[int], block_size: int, num_blocks: int,
                   scattered: bool, seed: int) -> tuple[KVCache, torch.Tensor, torch.Tensor,
                                                        AttentionMetadata]:
    """A cache full of finite garbage and one decode token per sequence at the end of `lens`."""
    gen = torch.Generator().manual_seed(seed)
    cache = KVCache(model.config, num_blocks, block_size, torch.float32, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    order = torch.randperm(num_blocks, generator=gen) if scattered else torch.arange(num_blocks)
    tables = []
    blocks = BlockManager(num_blocks, block_size)
    blocks.free_blocks.clear()
    blocks.free_blocks.extend(order.tolist())
    for seq_id, n in enumerate(lens):
        tables.append(blocks.allocate(seq_id, n))
    slots = [blocks.slot(seq_id, n - 1) for seq_id, n in enumerate(lens)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=len(lens),
        decode_block_tables=torch.tensor(pad_tables(tables, max(map(len, tables)))),
        decode_context_lens=torch.tensor(lens), prefills=[],
        decode_attention=paged_decode_attention_ref)
    ids = torch.randint(0, CFG.vocab_size, (len(lens),), generator=gen)
    return cache, ids, torch.tensor(lens) - 1, meta


@pytest.fixture(scope="module")
def decoder(model: Llama) -> CpuDecoder:
    return CpuDecoder(model)


def _run(model: Llama, decoder: CpuDecoder | None, cache: KVCache, ids: torch.Tensor,
         positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Logits of one decode step: through `decoder` (numpy), or the model's forward if None."""
    if decoder is None:
        return model(ids, positions, cache, meta, torch.arange(len(ids)))
    return torch.from_numpy(decoder(
        ids.numpy(), positions.numpy(), meta.slot_mapping.numpy(),
        meta.decode_block_tables.numpy(), meta.decode_context_lens.numpy(), cache.k.numpy(),
        cache.v.numpy()))


def test_an_fp32_cpu_runner_gets_the_numpy_step(model: Llama) -> None:
    cache = KVCache(model.config, 4, 4, torch.float32, torch.device("cpu"))
    runner = ModelRunner(model, cache, BlockManager(4, 4), torch.device("cpu"))
    assert isinstance(runner.cpu_decoder, CpuDecoder)
    # The decoder reads the parameters' own memory: no second copy of the weights.
    layer = model.model.layers[0]
    assert np.shares_memory(runner.cpu_decoder.layers[0].down.weight.numpy(),
                            layer.mlp.down_proj.weight.detach().numpy())
    assert np.shares_memory(runner.cpu_decoder.layers[0].qkv.weight.numpy(),
                            layer.self_attn.q_proj.weight.detach().numpy())
    torch_only = ModelRunner(model, cache, BlockManager(4, 4), torch.device("cpu"),
                             numpy_decode=False)
    assert torch_only.cpu_decoder is None


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("lens", [[1], [13], [5, 40, 17], [2, 9, 33, 64, 1, 7, 16, 30]])
@pytest.mark.parametrize("scattered", [False, True])
def test_numpy_step_matches_torch_path(model: Llama, decoder: CpuDecoder, block_size: int,
                                       lens: list[int], scattered: bool) -> None:
    num_blocks = sum(blocks_for(n, block_size) for n in lens) + 5
    first = _decode_inputs(model, lens, block_size, num_blocks, scattered, seed=len(lens))
    second = _decode_inputs(model, lens, block_size, num_blocks, scattered, seed=len(lens))
    got = _run(model, decoder, *first)
    want = _run(model, None, *second)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Both wrote the new token's K/V into the same slots, and nothing else.
    torch.testing.assert_close(first[0].k, second[0].k, atol=1e-5, rtol=0)
    torch.testing.assert_close(first[0].v, second[0].v, atol=1e-5, rtol=0)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_silu_holds_for_very_negative_gates(model: Llama) -> None:
    """exp(-x) overflows float32 past x = -88; the step must stay finite and warning-free."""
    cache, ids, positions, meta = _decode_inputs(model, [6], 4, 4, False, seed=3)
    decoder = CpuDecoder(model)
    decoder.layers[0].ln_mlp = decoder.layers[0].ln_mlp * 1e4  # pushes gates far below -88
    with np.errstate(all="raise"):
        logits = _run(model, decoder, cache, ids, positions, meta)
    assert torch.isfinite(logits).all()


# -- each numpy function against its torch twin ---------------------------------------------------
def _rows(seed: int, *shape: int) -> np.ndarray:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("batch", [1, 5])
def test_rms_norms_match_their_twin(model: Llama, batch: int) -> None:
    """The norm alone, and fused with the residual add before it."""
    norm = model.model.layers[0].input_layernorm
    x, delta = _rows(batch, batch, CFG.hidden_size) * 3, _rows(9, batch, CFG.hidden_size)
    weight = norm.weight.detach().numpy()
    got = np.empty_like(x)
    cpu_layer_ops.rms_norm_into(x, weight, norm.eps, got)
    torch.testing.assert_close(torch.from_numpy(got), norm(torch.from_numpy(x)), atol=1e-6,
                               rtol=1e-6)
    h = x.copy()
    cpu_layer_ops.add_rms_norm(h, delta, weight, norm.eps, got)
    np.testing.assert_array_equal(h, x + delta)  # the residual stream, updated in place
    torch.testing.assert_close(torch.from_numpy(got), norm(torch.from_numpy(x + delta)),
                               atol=1e-6, rtol=1e-6)


def test_rotation_and_cache_write_match_their_twins(model: Llama) -> None:
    """`rope_into_cache` against `rotate`, the scaling and the cache write of the torch path."""
    hq, hkv, d = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim
    positions, slots = np.array([0, 7, 300]), np.array([5, 0, 9])  # pages of 4: blocks 1, 0, 2
    qkv = _rows(1, 3, (hq + 2 * hkv) * d)
    keys, values = np.zeros((2, 3, 4, hkv, d), np.float32)
    q = np.empty((3, hq, d), np.float32)
    cpu_layer_ops.rope_into_cache(qkv, model.rotary.cos.numpy(), model.rotary.sin.numpy(),
                                  positions, slots, keys, values, np.float32(d ** -0.5), q)
    cos, sin = model.rotary(torch.from_numpy(positions), torch.float32)  # (3, 1, D) each
    heads = torch.from_numpy(qkv).reshape(3, hq + 2 * hkv, d)
    want = rotate(heads[:, :hq + hkv], cos, sin)
    torch.testing.assert_close(torch.from_numpy(q), want[:, :hq] * d ** -0.5, atol=1e-6, rtol=0)
    flat_k, flat_v = keys.reshape(-1, hkv, d), values.reshape(-1, hkv, d)
    torch.testing.assert_close(torch.from_numpy(flat_k[slots]), want[:, hq:], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(flat_v[slots], qkv[:, (hq + hkv) * d:].reshape(3, hkv, d))
    others = np.setdiff1d(np.arange(12), slots)
    assert not flat_k[others].any() and not flat_v[others].any()  # nothing else written


def test_swiglu_matches_its_twin(model: Llama, decoder: CpuDecoder) -> None:
    """The MLP as the compiled step runs it (fused product, SwiGLU, down) against `MLP.forward`,
    with gates from far below zero to far above."""
    x = _rows(2, 4, CFG.hidden_size)
    x[0] *= 300  # gates past +-88, where exp(-gate) overflows float32
    w = decoder.layers[1]
    gate_up = w.gate_up(x)
    mid = np.empty((4, gate_up.shape[1] // 2), np.float32)
    cpu_layer_ops.swiglu_into(gate_up, mid)
    assert np.abs(gate_up[0]).max() > 100
    torch.testing.assert_close(torch.from_numpy(w.down(mid)), model.model.layers[1].mlp(
        torch.from_numpy(x)), atol=1e-5, rtol=1e-4)  # compiled products: sums reordered


# d 64 and 96 with groups up to 4: V read through the vector tiles (96: three of them); d 8 or a
# group of 5: the plain loop. 64: the head size the kernel spells out.
@pytest.mark.parametrize("d, group", [(8, 3), (64, 1), (64, 2), (64, 3), (64, 4), (96, 4),
                                      (64, 5), (128, 2)])
@pytest.mark.parametrize("lens", [[9], [3, 17, 1, 40], [3, 17, 1, 40, 6, 1]])  # split by head
@pytest.mark.parametrize("block_size", [4, 16, 32])  # 16 and 32: whole score tiles in a page
def test_paged_decode_attention_matches_its_twin(lens: list[int], d: int, group: int,
                                                 block_size: int) -> None:
    hkv = 2
    cache = _rows(5, 2, 40, block_size, hkv, d)  # K and V: (2, NB, P, Hkv, D)
    order = np.random.default_rng(0).permutation(40).tolist()
    tables, start = [], 0
    for n in lens:
        tables.append(order[start:start + blocks_for(n, block_size)])
        start += blocks_for(n, block_size)
    padded = np.array(pad_tables(tables, max(map(len, tables))))
    q = _rows(6, len(lens), hkv * group, d)  # (B, Hq, D)
    attend = cpu_attention.PagedDecodeAttention(padded, np.array(lens))
    got = attend(q.reshape(len(lens), hkv, group, d) * d ** -0.5, cache[0], cache[1])
    want = paged_decode_attention_ref(torch.from_numpy(q), torch.from_numpy(cache[0]),
                                      torch.from_numpy(cache[1]), torch.from_numpy(padded),
                                      torch.tensor(lens), d ** -0.5)
    torch.testing.assert_close(torch.from_numpy(got).reshape(want.shape), want, atol=1e-5,
                               rtol=0)


def test_the_kernels_exponential_is_float32_exact_below_zero() -> None:
    """`exp_below_zero` against numpy's exp over a softmax's whole range, far tails included."""
    x = np.concatenate([np.linspace(-100, 0, 20001, dtype=np.float32),
                        np.float32([-1e30, -87.5, -1e-7, 0.0])])
    got = x.copy()
    cpu_math.exp_below_zero(got, np.empty(x.size, np.int32), x.size)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=2e-38)


def test_runner_numpy_and_torch_paths_sample_and_cache_alike(model: Llama) -> None:
    """The runner's own inputs (slots, padded tables) fed to either path: prefill, then decodes
    of ragged sequences over scattered blocks; tokens and caches agree at every step."""
    runners = []
    for numpy_decode in (True, False):
        blocks = BlockManager(40, 3)
        blocks.free_blocks.rotate(17)  # tables that wrap around the cache, not in order
        cache = KVCache(model.config, 40, 3, torch.float32, torch.device("cpu"))
        runners.append(ModelRunner(model, cache, blocks, torch.device("cpu"),
                                   numpy_decode=numpy_decode))
    seqs = [[Sequence(RequestRecord(id=i, prompt_ids=list(range(1 + i, 6 + 4 * i)), max_tokens=8,
                                    arrival_s=0.0)) for i in range(3)] for _ in runners]
    for _ in range(6):
        sampled = []
        for runner, mine in zip(runners, seqs):
            items = [(seq, seq.remaining) for seq in mine]
            for seq, n in items:
                runner.blocks.allocate(seq.id, seq.num_computed + n)
            sampled.append(runner.run(Batch(items=items)))
            for seq, n in items:
                seq.num_computed += n
                seq.append(sampled[-1][seq.id], 0.0)
        assert sampled[0] == sampled[1]
        torch.testing.assert_close(runners[0].cache.k, runners[1].cache.k, atol=1e-5, rtol=0)
        torch.testing.assert_close(runners[0].cache.v, runners[1].cache.v, atol=1e-5, rtol=0)


def test_arena_hands_out_aligned_tensors_in_the_layout_asked_for() -> None:
    arena = HugePageArena(1000)
    plain = arena.empty(3, 5, torch.float32, transposed=False)
    turned = arena.empty(3, 5, torch.float32, transposed=True)
    assert plain.shape == turned.shape == (3, 5)
    assert plain.stride() == (5, 1) and turned.stride() == (1, 3)
    assert plain.data_ptr() % 64 == 0 and turned.data_ptr() % 64 == 0
    assert turned.data_ptr() - plain.data_ptr() == 64  # 60 bytes, rounded up to a cache line
    turned.copy_(torch.arange(15.0).view(3, 5))
    assert turned.tolist() == torch.arange(15.0).view(3, 5).tolist()
    with pytest.raises(MemoryError):
        arena.empty(1 << 20, 1, torch.float32, transposed=False)


def test_cpu_matrices_share_one_arena(model: Llama) -> None:
    """Every matrix a decode step streams sits in the one huge-page mapping, in the layout the
    decode step was tuned for; the state dict still has Hugging Face's shapes."""
    layer = model.model.layers[0]
    mats = [model.lm_head.weight] + [m for block in model.model.layers for m in (
        block.self_attn.qkv_weight, block.self_attn.o_proj.weight, block.mlp.gate_up_weight,
        block.mlp.down_proj.weight)]
    low = min(m.data_ptr() for m in mats)
    high = max(m.data_ptr() + m.nbytes for m in mats)
    packed = sum(HugePageArena.size_of(m.shape, m.dtype) for m in mats)
    assert high - low <= packed  # back to back in one region, not scattered allocations
    assert all(m.is_contiguous() for m in mats)  # stored (out, in), as the products read them
    assert model.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (
        CFG.num_key_value_heads * CFG.head_dim, CFG.hidden_size)


def test_engine_runs_products_on_torch_and_compiled_threads_and_openblas_on_one() -> None:
    """During a run the step's products run on torch's pool and the compiled loops' pool, both
    sized at the process's BLAS-thread setting, and OpenBLAS is held to one thread (busy pools
    fight over the cores); all three come back afterwards."""
    import numba

    from engine.config import EngineConfig
    from engine.cpu_threads import blas_threads, set_blas_threads
    from engine.kernels import cpu_jit
    from engine.llm_engine import LLMEngine
    from engine.workload import WorkloadSpec

    torch_before, blas_before = torch.get_num_threads(), blas_threads()
    torch.set_num_threads(3)
    set_blas_threads(2)
    compiled_before = cpu_jit.set_threads(1)
    compiled_in_run = min(2, numba.config.NUMBA_NUM_THREADS)
    try:
        engine = LLMEngine(EngineConfig(model="tiny", device="cpu"))
        seen: list[tuple[int, int, int]] = []
        engine.run(WorkloadSpec(num_requests=2, prompt_len=5, output_len=3),
                   on_step=lambda _step: seen.append((torch.get_num_threads(), blas_threads(),
                                                      numba.get_num_threads())))
        assert seen and set(seen) == {(2, 1, compiled_in_run)}
        # The probe keeps its own.
        assert (torch.get_num_threads(), blas_threads(), numba.get_num_threads()) == (3, 2, 1)
    finally:
        torch.set_num_threads(torch_before)
        set_blas_threads(blas_before)
        cpu_jit.set_threads(compiled_before)


@pytest.mark.parametrize("rows", [1, 2, 7, 13, 14, 15, 16, 25, 40])
@pytest.mark.parametrize("out_features, in_features", [(64, 48), (40, 33), (96, 1)])
def test_panel_products_match_torch_at_every_tile_size(rows: int, out_features: int,
                                                       in_features: int) -> None:
    """Every tile size (1 to 14 rows, and the splits past 14), widths that are not whole panels,
    and a single step of k, against torch in float64."""
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    product = cpu_products.WeightProduct(weight)
    want = (x.double() @ weight.double().T).numpy()
    for tile_rows in (14, 2):  # AVX-512's tiles, and those of a CPU without it (both run anywhere)
        product.tile_rows = tile_rows
        got = product(x.numpy())
        assert got.shape == (rows, out_features) and got.flags["C_CONTIGUOUS"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"rows of {in_features} inputs"):
        product(np.ones((rows, in_features + 1), np.float32))


def test_a_product_of_no_rows_is_empty_and_the_kernel_refuses_wrong_shapes() -> None:
    product = cpu_products.WeightProduct(torch.ones(40, 8))
    assert product(np.ones((0, 8), np.float32)).shape == (0, 40)
    x = np.ones((3, 8), np.float32)
    with pytest.raises(ValueError, match="smaller than the product"):
        cpu_products.panel_product(x, product.panels, np.empty((3, 40), np.float32), 14)
    with pytest.raises(ValueError, match="do not match"):
        cpu_products.panel_product(np.ones((3, 9), np.float32), product.panels,
                                   np.empty((3, 64), np.float32), 14)


def test_the_kernel_cache_is_named_after_every_kernel_source(tmp_path) -> None:
    """numba's cache checks only the compiled function's own file; the folder's name covers the
    modules whose code the kernels paste in."""
    (tmp_path / "cpu_tiles.py").write_text("PANEL = 32\n")
    (tmp_path / "cpu_products.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    first = cpu_jit.kernel_sources_digest(tmp_path)
    (tmp_path / "other.py").write_text("y = 2\n")
    assert cpu_jit.kernel_sources_digest(tmp_path) == first
    (tmp_path / "cpu_tiles.py").write_text("PANEL = 16\n")
    assert cpu_jit.kernel_sources_digest(tmp_path) != first
    assert cpu_jit.kernel_sources_digest(pathlib.Path(cpu_jit.__file__).parent) in (
        os.environ["NUMBA_CACHE_DIR"])


def test_panels_hold_the_matrix_k_major_with_zeros_past_its_width() -> None:
    weight = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    panels = cpu_products.pack_panels(weight)
    width = cpu_products.PANEL
    assert panels.shape == (2, 3, width)
    for p in range(2):
        for k in range(3):
            for j in range(width):
                row = p * width + j
                assert panels[p, k, j] == (weight[row, k] if row < 40 else 0)


@pytest.mark.parametrize("lens, most_panel_rows", [([5, 9, 3, 12, 7], 512), ([4] * 17, 16)])
def test_a_decode_step_reads_each_weight_once_through_panels_packed_once(
        model: Llama, lens: list[int], most_panel_rows: int, monkeypatch) -> None:
    """What batched decode's speed rests on: every weight matrix has one product object, whose
    panels are packed once, when the decoder is built, into memory of their own (never repacked
    on a call); a step of B sequences calls each product once with all B rows, through the panel
    kernel up to `MOST_PANEL_ROWS` rows and torch's BLAS on the model's own matrix past it (never
    numpy's OpenBLAS, which repacks a matrix on every call of 2+ rows), and the panel kernel is
    compiled once for every batch size. Attention reads the cache itself, not a gathered copy."""
    packs: list[tuple[int, int]] = []
    pack = cpu_products.pack_panels

    def counting_pack(weight: np.ndarray, *rest) -> np.ndarray:
        packs.append(weight.shape)
        return pack(weight, *rest)

    monkeypatch.setattr(cpu_products, "pack_panels", counting_pack)
    decoder = CpuDecoder(model)
    products = [decoder.lm_head] + [p for w in decoder.layers for p in (w.qkv, w.o, w.gate_up,
                                                                         w.down)]
    assert len({id(p) for p in products}) == len(packs) == 4 * CFG.num_hidden_layers + 1
    weights = {model.lm_head.weight.data_ptr()} | {m.data_ptr() for layer in model.model.layers
                                                  for m in (layer.self_attn.qkv_weight,
                                                            layer.self_attn.o_proj.weight,
                                                            layer.mlp.gate_up_weight,
                                                            layer.mlp.down_proj.weight)}
    assert {p.weight.data_ptr() for p in products} == weights
    panels = {p.panels.ctypes.data for p in products}
    assert len(panels) == len(products) and not panels & weights  # packed copies, one each
    for p in products:
        np.testing.assert_array_equal(p.panels, pack(p.weight.numpy()))
    calls: list[tuple[int, int]] = []
    compiled, linear = cpu_products.panel_product, torch.nn.functional.linear

    def counting_kernel(x: np.ndarray, packed: np.ndarray, *rest) -> None:
        calls.append((x.shape[0], packed.ctypes.data))
        compiled(x, packed, *rest)

    def counting_linear(x: torch.Tensor, w: torch.Tensor, *rest) -> torch.Tensor:
        calls.append((x.shape[0], w.data_ptr()))
        return linear(x, w, *rest)

    monkeypatch.setattr(cpu_products, "panel_product", counting_kernel)
    monkeypatch.setattr(cpu_products, "MOST_PANEL_ROWS", most_panel_rows)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    attended: list[np.ndarray] = []
    attention = cpu_attention.paged_attention
    monkeypatch.setattr(cpu_attention, "paged_attention",
                        lambda q, k, v, *rest: (attended.append(k), attention(q, k, v, *rest)))
    cache, *inputs = _decode_inputs(model, lens, 4, 40, True, seed=5)
    _run(model, decoder, cache, *inputs)
    read = weights if len(lens) > most_panel_rows else panels
    assert sorted(ptr for _, ptr in calls) == sorted(read)  # each weight once, no other product
    assert {rows for rows, _ in calls} == {len(lens)}  # all sequences' rows in one call
    assert len(attended) == CFG.num_hidden_layers
    assert all(np.shares_memory(k, cache.k.numpy()) for k in attended)
    after = [(p, p.panels) for p in products]
    _run(model, decoder, *_decode_inputs(model, lens, 4, 40, True, seed=6))
    assert all(p.panels is w for p, w in after)  # the same panels serve the next step
    assert len(packs) == len(products)  # and nothing was packed again
    assert len(compiled.signatures) == 1  # one compiled kernel whatever the batch
