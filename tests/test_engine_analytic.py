"""The page's formulas (engine.analytic) at the design's check values, and against a real run.

The measured waste in every step record must equal the paging formula, ceil(T/P)*P - T, summed over
the sequences live after that step, with T rebuilt from the step records alone.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine import analytic
from engine.config import PRESETS, EngineConfig
from engine.llm_engine import LLMEngine
from engine.workload import Request


@pytest.mark.parametrize("T, gb", [(2048, 10.74), (8192, 42.95), (32768, 171.80),
                                   (131072, 687.19)])
def test_kv_gb_design_check_values(T: int, gb: float) -> None:
    assert round(analytic.kv_gb(T, layers=80, h_kv=8, d_head=128, batch=16, bytes_per_elem=2),
                 2) == gb
    assert analytic.kv_bytes(T, 80, 8, 128, 16, 2) == 2 * 16 * 80 * T * 8 * 128 * 2


@pytest.mark.parametrize("T, waste", [(2000, 48), (8192, 0), (20000, 224), (1, 255), (256, 0),
                                      (257, 255)])
def test_waste_design_check_values(T: int, waste: int) -> None:
    assert analytic.waste_tokens(T, 256) == waste


def test_kv_bytes_matches_the_model_config() -> None:
    cfg = PRESETS["gpu-1b"]
    per_token = analytic.kv_bytes(1, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    assert per_token == cfg.kv_bytes_per_token(2)


def test_roofline_floors() -> None:
    assert analytic.decode_tpot_floor_s(2e9, 1e9, 1e12) == pytest.approx(3e-3)
    assert analytic.prefill_ttft_floor_s(10**9, 512, 1e14) == pytest.approx(2 * 1e9 * 512 / 1e14)
    assert analytic.prefill_ttft_floor_s(10**9, 512, 1e14, head_params=10**8) == pytest.approx(
        2 * (1e9 * 512 + 1e8) / 1e14)


def test_prefill_floor_counts_only_the_matmuls_a_prefill_must_do(monkeypatch) -> None:
    """Count the FLOPs of every weight matmul in a real one-request prefill: the floor's work
    (flops_per_s = 1 makes it a FLOP count) equals them, so the floor cannot exceed the real cost.
    Charging the LM head for every prompt token (2 * num_params * T) would overshoot it."""
    flops = []
    real = F.linear

    def counted(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        flops.append(2 * x.shape[0] * weight.shape[0] * weight.shape[1])
        return real(x, weight)

    cfg, T = PRESETS["tiny"], 48
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", max_num_batched_tokens=T))
    monkeypatch.setattr(F, "linear", counted)  # after the engine's warm-up step
    eng.run([Request(0, list(range(T)), 1, 0.0)])  # one step: the prefill, which samples
    floor = analytic.prefill_ttft_floor_s(analytic.layer_params(cfg), T, 1.0,
                                          head_params=analytic.head_params(cfg))
    assert sum(flops) == pytest.approx(floor)
    assert 2 * cfg.num_params() * T > sum(flops)


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_measured_waste_equals_formula_over_live_sequences(block_size: int) -> None:
    cfg = replace(PRESETS["tiny"], initializer_range=0.3)
    gen = torch.Generator().manual_seed(0)
    shapes = [(20, 12), (9, 16), (31, 8), (14, 20), (25, 10), (6, 14)]
    requests = [Request(i, torch.randint(0, cfg.vocab_size, (p,), generator=gen).tolist(), o, 0.0)
                for i, (p, o) in enumerate(shapes)]
    # Tight enough to force preemptions, so freed and recomputed sequences are covered too.
    blocks = math.ceil(120 / block_size)
    eng = LLMEngine(EngineConfig(model="tiny", device="cpu", block_size=block_size,
                                 kv_budget_bytes=blocks * block_size * cfg.kv_bytes_per_token(4),
                                 max_num_seqs=6, max_num_batched_tokens=24, model_config=cfg))
    trace = eng.run(requests)
    assert all(len(r.output_ids) == r.max_tokens for r in trace.requests)
    live: dict[int, int] = {}  # request id -> tokens in the cache after the step
    saw_waste = False
    for step in trace.steps:
        for victim in step.preempted:
            live.pop(victim)
        for item in step.scheduled:
            live[item.request_id] = item.context_len
        for done in step.finished:
            live.pop(done)
        expect = sum(analytic.waste_tokens(t, block_size) for t in live.values())
        assert step.waste_tokens == expect, f"step {step.index}"
        assert step.tokens_stored == sum(live.values())
        assert step.kv_blocks_used == sum(math.ceil(t / block_size) for t in live.values())
        assert step.kv_bytes_used == step.kv_blocks_used * trace.block_bytes
        saw_waste |= expect > 0
    assert saw_waste == (block_size > 1)
    assert not live
    if block_size == 5:
        assert any(step.preempted for step in trace.steps)
    snap = trace.peak_snapshot
    assert snap is not None
    peak = max(trace.steps, key=lambda s: s.kv_blocks_used)
    assert sum(snap.waste(i) for i in snap.tables) == trace.steps[snap.step_index].waste_tokens
    assert trace.steps[snap.step_index].kv_blocks_used == peak.kv_blocks_used
