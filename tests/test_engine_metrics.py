"""Serving metrics from a hand-made trace, against values worked out by hand.

Three finished requests and one rejected one, times in seconds since the run began:

    id  arrival  scheduled  token times            TTFT  E2E   TPOT                 ITLs
    0   0.0      0.1        0.5, 0.7, 1.0, 1.1     0.5   1.1   (1.1-0.5)/3 = 0.2    0.2 0.3 0.1
    1   0.2      0.2        0.6                    0.4   0.4   none (one token)     -
    2   0.5      0.6        1.3, 1.8, 2.8          0.8   2.3   (2.3-0.8)/2 = 0.75   0.5 1.0
    3   0.3      rejected

Request 1 has no TPOT: the statistics leave it out (vLLM's `bench serve` does the same), while
goodput treats it as meeting any TPOT target.

Percentiles interpolate linearly between order statistics (numpy's default, as vLLM uses): for
sorted values v0..v(n-1), p-th percentile sits at rank p/100 * (n - 1).
"""
from __future__ import annotations

import pytest

from engine.config import SLO, ConfigError
from engine.metrics import Stats, summarize
from engine.records import RequestRecord, StepRecord, Trace

DURATION = 3.0


def make_trace() -> Trace:
    def req(i, arrival, scheduled, times, preemptions=0):
        return RequestRecord(id=i, prompt_ids=[1, 2], max_tokens=len(times), arrival_s=arrival,
                             scheduled_s=scheduled, first_token_s=times[0], token_times_s=times,
                             output_ids=list(range(len(times))), finish_s=times[-1],
                             preemptions=preemptions)

    requests = [req(0, 0.0, 0.1, [0.5, 0.7, 1.0, 1.1], preemptions=2),
                req(1, 0.2, 0.2, [0.6]),
                req(2, 0.5, 0.6, [1.3, 1.8, 2.8], preemptions=1),
                RequestRecord(id=3, prompt_ids=[1] * 900, max_tokens=4, arrival_s=0.3,
                              rejected="too long")]

    def step(i, used, waste, contiguous):
        return StepRecord(index=i, t_start=i, t_end=i + 0.5, prefill_tokens=0, decode_seqs=1,
                          running=1, waiting=0, kv_blocks_used=used, kv_bytes_used=used * 1024,
                          waste_tokens=waste, contiguous_bytes=contiguous)

    steps = [step(0, 3, 5, 4096), step(1, 7, 2, 8192), step(2, 4, 9, 2048)]
    return Trace(device="CPU: test", model="tiny", config={}, requests=requests, steps=steps,
                 block_size=16, num_blocks=10, block_bytes=1024, kv_bytes_capacity=10 * 1024,
                 duration_s=DURATION)


def approx_stats(stats: Stats, mean: float, p50: float, p90: float, p99: float) -> None:
    assert (stats.mean, stats.p50, stats.p90, stats.p99) == pytest.approx((mean, p50, p90, p99),
                                                                          abs=1e-9)


def test_latency_metrics_equal_hand_computed_values() -> None:
    s = summarize(make_trace())
    # TTFT sorted 400 500 800: p90 at rank 1.8 = 500 + 0.8 * 300, p99 at rank 1.98.
    approx_stats(s.ttft_ms, 1700 / 3, 500, 740, 794)
    # TPOT over the two requests with more than one token, 200 and 750: the one-token request
    # adds no zero. p90 at rank 0.9 = 200 + 0.9 * 550, p99 at rank 0.99.
    approx_stats(s.tpot_ms, 475, 475, 695, 744.5)
    assert s.tpot_requests == 2
    # ITL pooled over requests: 200 300 100 500 1000 -> rank 3.6 and 3.96 for p90, p99.
    approx_stats(s.itl_ms, 420, 300, 800, 980)
    # E2E 1100 400 2300 -> sorted 400 1100 2300.
    approx_stats(s.e2e_ms, 3800 / 3, 1100, 2060, 2276)
    approx_stats(s.queue_ms, 200 / 3, 100, 100, 100)
    # The identity E2E = TTFT + (n - 1) * TPOT holds per request.
    for r, tpot in zip(make_trace().requests[:3], (0.2, 0.0, 0.75)):
        n = len(r.output_ids)
        assert r.token_times_s[-1] - r.arrival_s == pytest.approx(
            r.first_token_s - r.arrival_s + (n - 1) * tpot)


def test_counts_throughput_and_memory_peaks() -> None:
    s = summarize(make_trace())
    assert (s.completed, s.rejected) == (3, 1)
    assert s.duration_s == DURATION
    assert s.throughput_tok_s == pytest.approx(8 / DURATION)  # 4 + 1 + 3 output tokens
    assert s.request_throughput_rps == pytest.approx(3 / DURATION)
    assert s.kv_bytes_peak == 7 * 1024
    assert s.kv_bytes_capacity == 10 * 1024
    # The waste at the step of peak KV use (step 1), the step the page map draws; not the
    # largest waste of any step (9, at step 2).
    assert s.waste_tokens_peak == 2
    assert s.contiguous_bytes_peak == 8192
    assert s.preemptions == 3


@pytest.mark.parametrize("slo, good", [
    (None, 3),  # no limits: every finished request counts; the rejected one never does
    (SLO(ttft_ms=550, tpot_ms=300), 2),  # request 2's TTFT of 800 ms misses
    (SLO(ttft_ms=500), 2),  # a TTFT exactly at the limit meets it
    (SLO(ttft_ms=499.9), 1),
    (SLO(tpot_ms=100), 1),  # only the one-token request (TPOT 0) meets it
    (SLO(tpot_ms=750), 3),
    (SLO(ttft_ms=350), 0),
])
def test_goodput_and_slo_attainment(slo: SLO | None, good: int) -> None:
    s = summarize(make_trace(), slo)
    assert s.goodput_rps == pytest.approx(good / DURATION)
    assert s.slo_attainment == pytest.approx(good / 4)  # rejected requests count as misses


def test_empty_and_degenerate_inputs() -> None:
    assert Stats.of([]) == Stats(0.0, 0.0, 0.0, 0.0)
    approx_stats(Stats.of([7.0]), 7, 7, 7, 7)
    trace = make_trace()
    trace.requests = [trace.requests[3]]  # only the rejected one
    trace.duration_s = 0.0
    s = summarize(trace)
    assert (s.completed, s.goodput_rps, s.throughput_tok_s, s.slo_attainment) == (0, 0, 0, 0)
    assert s.ttft_ms == Stats(0.0, 0.0, 0.0, 0.0)


def test_summary_serialises_with_documented_keys() -> None:
    out = summarize(make_trace()).to_json()
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(out[key]) == {"mean", "p50", "p90", "p99"}
    for key in ("goodput_rps", "slo_attainment", "throughput_tok_s", "kv_bytes_peak",
                "kv_bytes_capacity", "waste_tokens_peak", "preemptions"):
        assert key in out


@pytest.mark.parametrize("field", ["ttft_ms", "tpot_ms"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_slo_must_be_positive(field: str, value: float) -> None:
    with pytest.raises(ConfigError):
        SLO(**{field: value})
