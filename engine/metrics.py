"""Serving metrics from a trace, defined as vLLM's `bench serve` defines them.

- TTFT = first token time - arrival; queue time = first scheduled - arrival, reported apart.
- TPOT = (E2E - TTFT) / (n_out - 1) for each request. Its mean and percentiles cover only requests
  with n_out > 1: a one-token reply has no gap after its first token, so `bench serve` leaves it out.
  `tpot_s` still returns 0 for it, which is used only for goodput: such a request meets any TPOT SLO.
- ITL = every gap between consecutive tokens, pooled over all requests.
- E2E = last token time - arrival.
- Goodput = requests meeting every SLO / duration; SLO attainment = the fraction that meet them.
Percentiles use numpy's linear interpolation, as vLLM does. Rejected requests count as misses.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.config import SLO
from engine.records import RequestRecord, Trace


@dataclass(frozen=True)
class Stats:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> "Stats":
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0)
        a = np.asarray(values, dtype=float)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(a.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class Summary:
    completed: int
    rejected: int
    duration_s: float
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    queue_ms: Stats
    goodput_rps: float
    slo_attainment: float
    throughput_tok_s: float  # output tokens per second of the run
    request_throughput_rps: float
    kv_bytes_peak: int
    kv_bytes_capacity: int
    # Empty slots in last pages at the step of peak KV use (the first such step), the moment
    # memory is scarcest: the same step the page map and the KV plot describe.
    waste_tokens_peak: int
    contiguous_bytes_peak: int  # what reserving max_len per request would have held at peak
    preemptions: int
    peak_running: int  # most sequences in one step's running set
    peak_waiting: int  # most requests queued (for a batch slot or for KV memory) after a step
    tpot_requests: int  # finished requests with more than one token: those tpot_ms describes

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ttft_s(r: RequestRecord) -> float:
    return r.first_token_s - r.arrival_s


def e2e_s(r: RequestRecord) -> float:
    return r.token_times_s[-1] - r.arrival_s


def tpot_s(r: RequestRecord) -> float:
    """Mean time per output token after the first; 0 when only one token was generated (that 0
    serves goodput only: `summarize` leaves one-token requests out of the TPOT statistics)."""
    n_out = len(r.output_ids)
    return (e2e_s(r) - ttft_s(r)) / (n_out - 1) if n_out > 1 else 0.0


def meets(r: RequestRecord, slo: SLO) -> bool:
    """Whether a request finished within every SLO (None limits nothing)."""
    if not r.finished:
        return False
    if slo.ttft_ms is not None and ttft_s(r) * 1e3 > slo.ttft_ms:
        return False
    return slo.tpot_ms is None or tpot_s(r) * 1e3 <= slo.tpot_ms


def goodput(requests: list[RequestRecord], slo: SLO, duration_s: float) -> float:
    """Requests per second that met every SLO: |{r : meets(r, slo)}| / D."""
    good = sum(meets(r, slo) for r in requests)
    return good / duration_s if duration_s > 0 else 0.0


def summarize(trace: Trace, slo: SLO | None = None) -> Summary:
    """Aggregate a trace into the serving metrics above."""
    slo = slo or SLO()
    done = [r for r in trace.requests if r.finished]
    itl = [b - a for r in done for a, b in zip(r.token_times_s, r.token_times_s[1:])]
    duration = trace.duration_s
    good = sum(meets(r, slo) for r in trace.requests)
    out_tokens = sum(len(r.output_ids) for r in done)
    steps = trace.steps
    peak = max(steps, key=lambda s: s.kv_blocks_used, default=None)  # first step at the peak
    tpots = [tpot_s(r) * 1e3 for r in done if len(r.output_ids) > 1]
    return Summary(
        completed=len(done),
        rejected=sum(r.rejected is not None for r in trace.requests),
        duration_s=duration,
        ttft_ms=Stats.of([ttft_s(r) * 1e3 for r in done]),
        tpot_ms=Stats.of(tpots),
        itl_ms=Stats.of([x * 1e3 for x in itl]),
        e2e_ms=Stats.of([e2e_s(r) * 1e3 for r in done]),
        queue_ms=Stats.of([(r.scheduled_s - r.arrival_s) * 1e3 for r in done]),
        goodput_rps=goodput(trace.requests, slo, duration),
        slo_attainment=good / len(trace.requests) if trace.requests else 0.0,
        throughput_tok_s=out_tokens / duration if duration > 0 else 0.0,
        request_throughput_rps=len(done) / duration if duration > 0 else 0.0,
        kv_bytes_peak=max((s.kv_bytes_used for s in steps), default=0),
        kv_bytes_capacity=trace.kv_bytes_capacity,
        waste_tokens_peak=peak.waste_tokens if peak is not None else 0,
        contiguous_bytes_peak=max((s.contiguous_bytes for s in steps), default=0),
        preemptions=sum(r.preemptions for r in trace.requests),
        peak_running=max((s.running for s in steps), default=0),
        peak_waiting=max((s.waiting for s in steps), default=0),
        tpot_requests=len(tpots),
    )
