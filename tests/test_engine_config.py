"""Configuration objects: every impossible setting is a ConfigError with a readable message."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.config import PRESETS, ConfigError, EngineConfig, dtype_for, element_bytes, preset
from engine.model import Llama
from engine.workload import WorkloadSpec, draw_shape, make_requests


@pytest.mark.parametrize("changes, message", [
    (dict(block_size=0), "page size"),
    (dict(max_num_seqs=0), "batch size"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(policy="fifo"), "unknown policy"),
    (dict(device="tpu"), "unknown device"),
    (dict(kv_budget_bytes=0), "KV budget"),
    (dict(max_model_len=0), "max_model_len"),
])
def test_engine_config_rejects(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**changes)


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple"),
    (dict(head_dim=15), "even"),
])
def test_model_config_rejects(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        replace(PRESETS["tiny"], **changes)


@pytest.mark.parametrize("changes, message", [
    (dict(num_requests=0), "at least one request"),
    (dict(prompt_len=0), "prompt"),
    (dict(output_len=0), "output length"),
    (dict(prompt_len=10, prompt_len_max=5), "range is empty"),
    (dict(rate=0.0), "rate"),
    (dict(rate=float("nan")), "rate"),
    (dict(burstiness=0.0), "burstiness"),
])
def test_workload_spec_rejects(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        WorkloadSpec(**changes)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        preset("huge")


@pytest.mark.parametrize("tied", [True, False])
def test_num_params_counts_the_real_model(tied: bool) -> None:
    cfg = replace(PRESETS["tiny"], tie_word_embeddings=tied)
    assert cfg.num_params() == sum(p.numel() for p in Llama(cfg).parameters())


def test_preset_sizes_are_as_documented() -> None:
    assert 25e6 < PRESETS["cpu-30m"].num_params() < 35e6
    assert 0.9e9 < PRESETS["gpu-1b"].num_params() < 1.1e9


def test_workload_draws_lengths_in_range_reproducibly() -> None:
    spec = WorkloadSpec(num_requests=50, prompt_len=3, prompt_len_max=9, output_len=2,
                        output_len_max=4, seed=5)
    a, b = make_requests(spec, 100), make_requests(spec, 100)
    assert a == b
    assert {len(r.prompt_ids) for r in a} == set(range(3, 10))
    assert {r.max_tokens for r in a} == {2, 3, 4}
    assert all(0 <= t < 100 for r in a for t in r.prompt_ids)
    assert [r.id for r in a] == list(range(50)) and all(r.arrival_s == 0.0 for r in a)
    assert make_requests(replace(spec, seed=6), 100) != a
    assert spec.longest == 13


def test_lognormal_mix_is_long_tailed_around_its_mean_and_clipped():
    spec = WorkloadSpec(num_requests=4000, prompt_len=100, output_len=20, mix="lognormal", seed=3)
    shape = draw_shape(spec)
    prompts = np.array(shape.prompt_lens)
    assert abs(prompts.mean() - 100) < 6  # the slider value is the mean
    assert np.median(prompts) < prompts.mean()  # a long right tail: median below the mean
    assert prompts.min() >= 1 and prompts.max() == 400 == spec.longest - 4 * 20
    assert shape == draw_shape(spec)  # seeded
    reqs = make_requests(spec, 50)
    assert [len(r.prompt_ids) for r in reqs] == shape.prompt_lens


def test_fixed_mix_draws_the_same_requests_as_before_the_mix_existed():
    # The ids follow the lengths in one seeded stream, as they always did.
    spec = WorkloadSpec(num_requests=3, prompt_len=4, output_len=2, seed=1)
    rng = np.random.default_rng(1)
    assert make_requests(spec, 100)[0].prompt_ids == rng.integers(0, 100, size=4).tolist()


def test_unknown_mix_and_lognormal_with_a_range_are_refused():
    with pytest.raises(ConfigError, match="unknown length mix"):
        WorkloadSpec(mix="zipf")
    with pytest.raises(ConfigError, match="no length range"):
        WorkloadSpec(mix="lognormal", prompt_len_max=300)


def test_the_device_picks_the_dtype() -> None:
    assert dtype_for("cuda") == "bfloat16" and dtype_for("cpu") == "float32"
    for device in ("cuda", "cpu"):
        assert element_bytes(device) == getattr(torch, dtype_for(device)).itemsize
