"""Decode graphs: the padded static-buffer path against the plain runner, in fp32.

Two runners share one block manager and start from caches holding the same garbage. One runs every
step eagerly on tensors sized to the batch; the other sends pure-decode steps through
`DecodeGraphs`, padded up the ladder. Their logits must agree to 1e-4 and their tokens exactly, the
blocks of real sequences must hold the same K/V, and padding may write only into the scratch block.
On the CPU the padded path runs eagerly (capture=False); where CUDA is present the same scenario
replays captured graphs.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import replace

import pytest
import torch

from engine.block_manager import BlockManager
from engine.cli import build_parser, configs
from engine.config import PRESETS, EngineConfig
from engine.cuda_graphs import MAX_GRAPH_BATCH, DecodeGraphs, ladder, padded_size
from engine.llm_engine import LLMEngine
from engine.kernels.paged_attention import paged_decode_attention_ref
from engine.kv_cache import KVCache
from engine.model import Llama
from engine.records import RequestRecord
from engine.runner import ModelRunner, graphs_supported, triton_attention
from engine.scheduler import Batch
from engine.sequence import Sequence
from engine.weights import load_model

CFG = replace(PRESETS["tiny"], initializer_range=0.3)  # logits spread wide: 1e-4 is a real bound
ATOL = 1e-4
MAX_LEN = 48  # fixes the table width: 48 blocks at page size 1, 3 at page size 16
PROMPTS = (5, 13, 1, 20, 8, 3, 17)  # ragged, and mostly off page boundaries
# Decode steps, as indices into PROMPTS: sizes on the ladder (1, 2, 4) and off it (3, 5, 7).
DECODE_STEPS = ((0, 1, 2, 3, 4, 5, 6), (0, 1, 2, 3), (1, 3, 5), (6,), (0, 2, 4, 5, 6), (3, 4))

DEVICES = [
    pytest.param("cpu", id="cpu-eager"),
    pytest.param("cuda", id="cuda-captured", marks=pytest.mark.skipif(
        not graphs_supported(torch.device("cuda")),
        reason="capturing graphs needs CUDA and triton; the CPU case runs the same padded path")),
]


class Recorder:
    """Calls the model and keeps its last logits, so the test can read what a runner sampled."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        self.last: torch.Tensor | None = None

    def __call__(self, *args: object) -> torch.Tensor:
        self.last = self.model(*args)  # (rows, vocab)
        return self.last


class Pair:
    """A plain runner and a graph runner fed the same steps; every step is compared."""

    def __init__(self, model: Llama, block_size: int, max_batch: int, device: torch.device) -> None:
        self.num_blocks = 256 // block_size + 8
        self.blocks = BlockManager(self.num_blocks, block_size)
        ids = list(range(self.num_blocks))
        random.Random(0).shuffle(ids)  # non-contiguous tables: a wrong slot shows in the logits
        self.blocks.free_blocks = deque(ids)
        gen = torch.Generator().manual_seed(1)
        caches = [KVCache(model.config, self.num_blocks + 1, block_size, torch.float32, device)
                  for _ in range(2)]  # the last block is the scratch block
        for kv in ("k", "v"):
            garbage = torch.randn(caches[0].k.shape, generator=gen) * 50  # finite
            for cache in caches:
                getattr(cache, kv).copy_(garbage)
        self.initial = caches[1].k.clone()
        self.plain_model, self.graph_model = Recorder(model), Recorder(model)
        # Graphs run the torch forward: compare that, not the numpy decode step.
        self.plain = ModelRunner(self.plain_model, caches[0], self.blocks, device,
                                 numpy_decode=False)
        self.graphs = DecodeGraphs(self.graph_model, caches[1], max_batch, MAX_LEN,
                                   scratch_block=self.num_blocks, capture=device.type == "cuda",
                                   # the engine's kernel on CUDA, the reference on the CPU
                                   decode_attention=(triton_attention(device)
                                                     or paged_decode_attention_ref))
        self.padded = ModelRunner(self.graph_model, caches[1], self.blocks, device, self.graphs,
                                  numpy_decode=False)
        self.touched: set[int] = set()  # blocks some sequence has held

    def step(self, items: list[tuple[Sequence, int]]) -> None:
        for seq, n in items:
            self.blocks.allocate(seq.id, seq.num_computed + n)
            self.touched.update(self.blocks.block_tables[seq.id])
        want = self.plain.run(Batch(items=list(items)))
        got = self.padded.run(Batch(items=list(items)))
        assert got == want
        rows = self.graph_model.last  # (rows, vocab)
        if all(seq.is_decode for seq, _ in items) and len(items) <= self.graphs.max_batch:
            size = padded_size(len(items), self.graphs.sizes)
            if self.graphs.graphs:  # a replay calls no Python: read the captured output
                rows = self.graphs.outputs[size]
            assert rows.shape[0] == size  # the padded path ran, not the plain one
        torch.testing.assert_close(rows[:len(self.plain_model.last)], self.plain_model.last,
                                   atol=ATOL, rtol=0)
        self.check_cache()
        for seq, n in items:
            seq.num_computed += n
            if seq.id in want:
                seq.append(want[seq.id], 0.0)

    def check_cache(self) -> None:
        """Real blocks match the plain cache; blocks nobody held still hold the initial garbage."""
        plain, padded = self.plain.cache, self.padded.cache
        real = slice(0, self.num_blocks)
        for a, b in ((plain.k, padded.k), (plain.v, padded.v)):
            torch.testing.assert_close(b[:, real], a[:, real], atol=1e-5, rtol=0)
        untouched = [b for b in range(self.num_blocks) if b not in self.touched]
        assert torch.equal(padded.k[:, untouched], self.initial[:, untouched])


@pytest.fixture(scope="module")
def cpu_model() -> Llama:
    return load_model("tiny", 0, torch.device("cpu"), torch.float32, CFG)


def _model(device: str, cpu_model: Llama) -> Llama:
    if device == "cpu":
        return cpu_model
    return load_model("tiny", 0, torch.device(device), torch.float32, CFG)


def _sequences(prompts: tuple[int, ...], max_tokens: int = 16) -> list[Sequence]:
    gen = random.Random(2)
    return [Sequence(RequestRecord(id=i, prompt_ids=[gen.randrange(CFG.vocab_size) for _ in
                                                     range(n)], max_tokens=max_tokens,
                                   arrival_s=0.0)) for i, n in enumerate(prompts)]


def test_ladder_rounds_up_to_the_next_size() -> None:
    assert ladder(1) == [1]
    assert ladder(5) == [1, 2, 4, 5]
    assert ladder(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert ladder(10_000)[-1] == MAX_GRAPH_BATCH
    for top in (1, 3, 8, 20, 64, 300):
        sizes = ladder(top)
        assert sizes == sorted(set(sizes)) and sizes[-1] == min(top, MAX_GRAPH_BATCH)
        for b in range(1, sizes[-1] + 1):
            size = padded_size(b, sizes)
            assert size in sizes and size >= b
            assert all(s < b for s in sizes if s < size)  # the smallest that fits
        assert padded_size(sizes[-1] + 1, sizes) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_padded_decode_matches_plain_runner(cpu_model: Llama, device: str,
                                            block_size: int) -> None:
    pair = Pair(_model(device, cpu_model), block_size, max_batch=8, device=torch.device(device))
    assert pair.graphs.sizes == [1, 2, 4, 8]
    seqs = _sequences(PROMPTS)
    pair.step([(s, s.remaining) for s in seqs])  # every prompt whole: the eager path
    scratch_before = pair.padded.cache.k[:, pair.num_blocks].clone()
    for step in DECODE_STEPS:
        pair.step([(seqs[i], 1) for i in step])
    # Padded steps happened (7 -> 8, 3 -> 4, 5 -> 8), and wrote their K/V into the scratch block.
    assert not torch.equal(pair.padded.cache.k[:, pair.num_blocks], scratch_before)
    # Steps mixing a prefill chunk with decodes run eagerly.
    late = _sequences((11,))[0]
    late.record.id = 99
    pair.step([(seqs[0], 1), (late, 6)])
    pair.step([(seqs[0], 1), (late, late.remaining)])


def test_batch_past_the_ladder_falls_back_to_eager(cpu_model: Llama) -> None:
    pair = Pair(cpu_model, 4, max_batch=2, device=torch.device("cpu"))
    seqs = _sequences((3, 6, 9))
    pair.step([(s, s.remaining) for s in seqs])
    pair.step([(s, 1) for s in seqs])  # 3 decodes, ladder [1, 2]: the plain path
    assert pair.graph_model.last.shape[0] == 3
    pair.step([(s, 1) for s in seqs[:2]])
    with pytest.raises(ValueError, match="past the ladder"):
        pair.graphs.run([0, 0, 0], [1, 1, 1], [0, 1, 2], [[0], [1], [2]], [2, 2, 2])


def test_kernel_reads_the_static_buffers_like_the_reference(cpu_model: Llama,
                                                             monkeypatch) -> None:
    """The Triton kernel (in triton's interpreter) on what a replay hands it: fixed-width tables
    with stale columns, padding rows, and splits past every sequence's end, which stay empty."""
    tpa = pytest.importorskip("engine.kernels.triton_paged_attention")
    if tpa.triton is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pair = Pair(cpu_model, 1, max_batch=8, device=torch.device("cpu"))
    seqs = _sequences(PROMPTS)
    pair.step([(s, s.remaining) for s in seqs])
    pair.step([(s, 1) for s in seqs])  # 7 -> 8 rows, the widest tables
    pair.step([(s, 1) for s in seqs[4:]])  # 3 -> 4 rows: narrower tables over stale columns
    tables, lens = pair.graphs.tables[:4], pair.graphs.rows[3, :4]  # (4, 48), (4,)
    assert lens[3] == 1 and tables.shape[1] == MAX_LEN  # row 3 pads
    cache = pair.padded.cache
    q = torch.randn(4, CFG.num_attention_heads, CFG.head_dim,
                    generator=torch.Generator().manual_seed(3))  # (4, Hq, D)
    args = (q, cache.k[0], cache.v[0], tables, lens, CFG.head_dim ** -0.5)
    tile = tpa.TileConfig(block_n=16)
    assert tpa.split_plan(4, CFG.num_key_value_heads, MAX_LEN, q.device, 3, tile) == (3, 16)
    got = tpa.paged_decode_attention_triton(*args, num_splits=3, tile=tile)
    torch.testing.assert_close(got, paged_decode_attention_ref(*args), atol=ATOL, rtol=0)


def test_cpu_engine_keeps_its_plain_path() -> None:
    engine = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_seqs=4, max_model_len=64,
                                    kv_budget_bytes=1 << 20))
    assert engine.graphs is None
    assert engine.cache.k.shape[1] == engine.num_blocks  # no scratch block without graphs


def test_cli_flag_turns_graphs_off() -> None:
    parser = build_parser()
    assert configs(parser.parse_args(["run"]))[0].cuda_graphs
    assert not configs(parser.parse_args(["run", "--no-cuda-graphs"]))[0].cuda_graphs


@pytest.mark.skipif(not graphs_supported(torch.device("cuda")),
                    reason="capturing graphs needs CUDA and triton")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_cuda_engine_serves_with_and_without_graphs(cuda_graphs: bool) -> None:
    from engine.workload import WorkloadSpec
    engine = LLMEngine(EngineConfig(model="tiny", device="cuda", max_num_seqs=4, max_model_len=64,
                                    kv_budget_bytes=1 << 24, cuda_graphs=cuda_graphs))
    assert (engine.graphs is not None) == cuda_graphs
    if cuda_graphs:
        assert sorted(engine.graphs.graphs) == [1, 2, 4]
        assert engine.cache.k.shape[1] == engine.num_blocks + 1
    trace = engine.run(WorkloadSpec(num_requests=3, prompt_len=9, output_len=6))
    assert all(len(r.output_ids) == 6 for r in trace.requests)


def test_gpu_check_times_decode_with_graphs_on_and_off() -> None:
    from tools import gpu_check
    plan = gpu_check.DRY_PLAN
    result = gpu_check.decode_graphs(plan, box_s=60, read_gbs=10.0)
    assert [r["batch"] for r in result["rows"]] == list(plan.graph_batches)
    for row in result["rows"]:
        assert row["graphs_used"] is False  # the dry run is on the CPU, which keeps its plain path
        assert row["graphs_ms"] > 0 and row["eager_ms"] > 0 and row["floor_ms"] > 0
