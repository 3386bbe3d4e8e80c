"""The engine's online API (`add_request`, `abort`, `step`) and the sampler, without HTTP."""
from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.records import RequestRecord
from engine.sampler import greedy_tokens
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", device="cpu", block_size=4, max_num_seqs=4,
                                  kv_budget_bytes=64 * 4 * 512))


def record(rid: int, prompt: list[int], max_tokens: int) -> RequestRecord:
    return RequestRecord(id=rid, prompt_ids=prompt, max_tokens=max_tokens, arrival_s=0.0)


def drain(engine: LLMEngine, limit: int = 500) -> None:
    for _ in range(limit):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("the engine did not finish its work")


def test_abort_frees_blocks_and_the_others_finish(engine):
    engine.reset()
    a, b = record(0, [1, 2, 3, 4, 5], 30), record(1, [6, 7, 8], 5)
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    assert engine.blocks.num_used > 0
    assert engine.abort(0) is not None and engine.abort(0) is None  # gone the first time
    drain(engine)
    assert len(b.output_ids) == 5 and len(a.output_ids) < 30
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.step() is None  # nothing left to schedule


def test_add_request_refuses_what_can_never_run(engine):
    engine.reset()
    rec = record(0, [], 4)
    assert engine.add_request(rec) is None and rec.rejected == "the prompt is empty"
    assert not engine.has_work


def test_a_stop_token_ends_the_output_early(engine):
    engine.reset()
    greedy = record(0, [9, 8, 7], 12)
    engine.add_request(greedy)
    drain(engine)
    stop = greedy.output_ids[3]
    engine.reset()
    stopped = record(1, [9, 8, 7], 12)
    seq = engine.add_request(stopped, SamplingParams(stop_token_ids=(stop,)))
    drain(engine)
    first = greedy.output_ids.index(stop)
    assert stopped.output_ids == greedy.output_ids[:first + 1]
    assert seq.finish_reason == "stop"


def test_a_seeded_draw_does_not_depend_on_batch_company(engine):
    params = SamplingParams(temperature=1.2, seed=42)

    def tokens(company: int) -> list[int]:
        engine.reset()
        rec = record(0, [3, 1, 4, 1, 5], 16)
        engine.add_request(rec, params)
        for i in range(company):
            engine.add_request(record(i + 1, [2, 7, 1, 8][: i + 1], 16),
                               SamplingParams(temperature=1.0, seed=i))
        drain(engine)
        return rec.output_ids

    alone = tokens(0)
    assert tokens(3) == alone
    engine.reset()
    greedy = record(0, [3, 1, 4, 1, 5], 16)
    engine.add_request(greedy)
    drain(engine)
    assert greedy.output_ids != alone  # it did sample


def test_records_stay_json(engine):
    engine.reset()
    rec = record(0, [1, 2], 3)
    engine.add_request(rec, SamplingParams(temperature=0.5))
    drain(engine)
    assert json.loads(json.dumps(rec.to_json()))["output_ids"] == rec.output_ids


def test_negative_temperature_is_refused():
    from engine.config import ConfigError
    with pytest.raises(ConfigError):
        SamplingParams(temperature=-1)


def test_greedy_tokens_agree_with_torchs_argmax_ties_and_nan_included() -> None:
    """The CPU takes numpy's argmax (much faster there); it must pick what torch's picks."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1  # a tie: the first index wins
    logits[2, 50] = float("nan")  # torch counts NaN as the largest
    logits[3] = 0.0
    assert greedy_tokens(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert greedy_tokens(logits)[1] == 7 and greedy_tokens(logits)[2] == 50
    assert greedy_tokens(logits[:, ::2]).tolist() == logits[:, ::2].argmax(dim=-1).tolist()
