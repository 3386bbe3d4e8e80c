"""The demo as a serving workload: arrivals, mixed lengths, a KV memory that binds, both batching
policies on the same requests, the rate sweep and the two-floor roofline, without a browser.

The controller tests drive the real engine (cpu-8m, a handful of short requests) through the shared
engine server (on a thread); the rest are plain functions over keys and hand-made traces.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine.block_manager import blocks_for
from engine.config import PRESETS
from engine.llm_engine import Cancelled
from engine.metrics import summarize
from engine.records import Trace
from lab.runs import (Limits, RunKey, check_run, estimate_run_s, floors_ms,
                      kv_capacity_bytes, num_blocks, other_policy_key, rate_key, ridge_batch,
                      running_bounds, sweep_key)
from engine.server.run_queue import RunQueue
from lab.state import LabState
from tests.labkit import TEST_ENGINE, lab_engine, make_demo, settle_all
from engine import analytic
from widgets.goodput_rate_plot import RatePoint, knee
from widgets.queue_plot import describe

CFG = PRESETS["cpu-8m"]
PER_TOKEN = CFG.kv_bytes_per_token(4)  # fp32 on the CPU


def test_a_key_without_requests_serves_one_per_batch_slot_and_same_requests_for_both_policies():
    key = RunKey("cpu-8m", 4, 32, 16, 8)
    assert key.requests == 4 and key.workload().num_requests == 4
    mixed = key.replace(requests=20, rate=5.0, mix="mixed")
    assert mixed.workload().mix == "lognormal" and mixed.workload().rate == 5.0
    assert other_policy_key(mixed).workload() == mixed.workload()  # identical request list
    assert other_policy_key(other_policy_key(mixed)) == mixed


def test_kv_memory_is_the_slider_and_the_server_cap_still_applies():
    key = RunKey("cpu-8m", 4, 32, 16, 8, kv_mb=2)
    assert kv_capacity_bytes(key, CFG, 4) == 2 * 2**20
    assert num_blocks(key, CFG, 4) == 2 * 2**20 // (16 * PER_TOKEN)
    why = check_run(key.replace(kv_mb=300), Limits(kv_budget_bytes=256 * 2**20), TEST_ENGINE)
    assert why is not None and "cap of 256 MB" in why


def test_a_request_no_cache_of_that_size_could_hold_is_refused():
    # 1 MB of cpu-8m KV holds 170 tokens; one request of 512 + 64 tokens never fits.
    why = check_run(RunKey("cpu-8m", 1, 512, 16, 64, kv_mb=1), Limits(), TEST_ENGINE)
    assert why is not None and "could never run" in why and "1 MB" in why


def test_mixed_lengths_are_checked_on_the_longest_drawn_request():
    key = RunKey("cpu-8m", 8, 4000, 16, 64, requests=32, mix="mixed")
    why = check_run(key, Limits(kv_budget_bytes=2**40, max_run_s=1e9), TEST_ENGINE)
    assert why is not None and "longest drawn request" in why and "8192" in why


def test_the_run_time_estimate_counts_arrivals_in_real_time():
    probe = analytic.DeviceProbe("fake", bandwidth_gbs=1e6, matmul_tflops=1e6)
    at_once = estimate_run_s(RunKey("cpu-8m", 4, 32, 16, 8, requests=9), CFG, probe, 4)
    spread = estimate_run_s(RunKey("cpu-8m", 4, 32, 16, 8, requests=9, rate=0.5), CFG, probe, 4)
    assert at_once < 0.01 and spread > 8  # nine arrivals at 0.5/s span about 16 s


def test_memory_bounds_follow_the_formula():
    key = RunKey("cpu-8m", 8, 16, 16, 40, requests=8, kv_mb=1)
    b = running_bounds(key, CFG, 4)
    blocks = 2**20 // (16 * PER_TOKEN)
    assert b.num_blocks == blocks
    assert b.at_full_length == blocks // blocks_for(56, 16)
    assert b.on_prompt == blocks // blocks_for(17, 16)
    assert b.batch_cap == 8


def test_bound_text_agrees_or_explains():
    from engine.analytic import RunningBounds

    def S(peak):  # noqa: N802 - peak running, peak waiting, evictions
        return peak, 3, 2
    bounds = RunningBounds(batch_cap=8, at_full_length=3, on_prompt=5, num_blocks=10,
                           blocks_full=3.0)
    assert "agrees" in describe(*S(3), bounds)
    assert "is higher" in describe(*S(5), bounds) and "prompt" in describe(*S(5), bounds)
    assert "is lower" in describe(*S(2), bounds)
    roomy = RunningBounds(batch_cap=4, at_full_length=40, on_prompt=60, num_blocks=200,
                          blocks_full=5.0)
    assert "agrees with the cap" in describe(*S(4), roomy)


def test_two_floors_cross_at_the_ridge():
    key = RunKey("cpu-8m", 8, 128, 16, 64)
    probe = analytic.DeviceProbe("fake", bandwidth_gbs=25.0, matmul_tflops=0.2)
    ridge = ridge_batch(key, CFG, probe, 4)
    assert ridge is not None and 1 < ridge < 1000
    below, above = floors_ms(key, max(1, int(ridge / 2)), CFG, probe, 4), floors_ms(
        key, int(ridge * 2), CFG, probe, 4)
    assert below[0] > below[1] and above[1] > above[0]  # memory binds below, compute above
    memory, compute = floors_ms(key, ridge, CFG, probe, 4)
    assert memory == pytest.approx(compute)


def test_sweep_points_are_the_current_workload_shape():
    key = RunKey("cpu-8m", 8, 128, 16, 64)  # 8 requests at once, fixed: the sweep's own shape
    assert sweep_key(key, 8) == key  # the highlighted point is this very run
    s = sweep_key(key.replace(requests=40, rate=4.0, mix="mixed", kv_mb=3), 16)
    assert (s.batch, s.requests, s.rate, s.mix, s.kv_mb, s.output) == (16, 16, 0.0, "fixed",
                                                                        None, 64)
    r = rate_key(key.replace(requests=40, repeat=2), 4.0)
    assert (r.rate, r.requests, r.repeat) == (4.0, 40, 0)


def test_knee_is_the_highest_rate_keeping_ninety_percent():
    pts = [RatePoint(r, g, a, g) for r, g, a in ((1, 1, 1.0), (2, 2, 0.95), (4, 3, 0.8),
                                                  (8, 2, 0.95))]
    assert knee(pts).rate == 2  # 8 req/s recovers by chance, but the knee stops at the first miss
    assert knee(pts[2:]) is None


@pytest.fixture(scope="module")
def engine():
    with lab_engine() as (client, lab):
        yield client, lab


@pytest.fixture(scope="module")
def bound_run(engine):
    """A workload whose memory binds: 8 requests at once, each growing from 2 pages to 4, in a
    cache of 10 pages (1 MB of cpu-8m KV in pages of 16)."""
    client, lab = engine
    state = LabState(batch=8, requests=8, context=16, output=40, page=16, kv_mb=1)
    demo = make_demo(client, state)
    demo.lab = lab
    demo.sweeps.rate_keys = lambda key: []  # the rate sweep has a test of its own below
    demo.start()
    assert settle_all(demo, lab)
    yield demo
    demo.close()


def test_memory_that_binds_makes_requests_wait_and_evicts(bound_run):
    summary = summarize(bound_run.trace)
    assert summary.peak_waiting > 0 and summary.preemptions > 0
    rows = bound_run.summary.values
    assert int(rows["Peak waiting"]) == summary.peak_waiting
    assert int(rows["Preemptions"]) == summary.preemptions
    assert int(rows["Peak running"]) == summary.peak_running
    assert all(len(r.output_ids) == 40 for r in bound_run.trace.requests)  # all recomputed, done
    assert "Peak running" in bound_run.queue.text and "floor(" in bound_run.queue.text


def test_the_other_policy_runs_on_the_same_requests(bound_run):
    traces = bound_run.policy.traces
    assert set(traces) == {"static", "continuous"}
    prompts = {p: [r.prompt_ids for r in t.requests] for p, t in traces.items()}
    assert prompts["static"] == prompts["continuous"]
    for row in ("Goodput (req/s)", "TTFT p90 (ms)", "Duration (s)"):
        assert bound_run.policy.value(row, "static") is not None
    assert "Continuous batching" in bound_run.policy.text


def test_a_setting_is_measured_three_times(bound_run):
    assert len(bound_run.repeats(bound_run.shown_key)) == 3


def test_run_again_measures_again(bound_run):
    runs = bound_run.lab.queue.runs_started
    first = bound_run.trace
    bound_run.run_again()
    assert settle_all(bound_run, bound_run.lab)
    assert bound_run.lab.queue.runs_started > runs and bound_run.trace is not first
    assert bound_run.shown_key.repeat >= 3  # past the three cached measurements
    assert len(bound_run.repeats(bound_run.shown_key)) >= 4


def test_tpot_sweep_draws_both_floors(bound_run):
    plot = bound_run.tpot_batch
    assert len(plot.floor.data["memory_ms"]) == len(plot.floor.data["compute_ms"]) > 0
    assert all(f == max(m, c) for f, m, c in zip(plot.floor.data["floor_ms"],
                                                 plot.floor.data["memory_ms"],
                                                 plot.floor.data["compute_ms"]))


def test_rate_sweep_measures_goodput_at_each_rate(engine):
    client, lab = engine
    state = LabState(batch=4, requests=4, context=16, output=4, page=16)
    demo = make_demo(client, state, Limits(max_run_s=4))
    keys = demo.sweeps.rate_keys(state.key())
    assert keys and all(check_run(k, demo.limits, demo.engine) is None for k in keys)
    from engine.workload import draw_shape
    assert len(keys) >= 3 and all(max(draw_shape(k.workload()).arrivals_s) <= 4 for k in keys)
    assert min(k.rate for k in keys) > 0.25  # slower arrivals would outlast the 4 s limit
    demo.start()
    try:
        assert settle_all(demo, lab)
        plot = demo.goodput_rate
        assert sorted(plot.source.data["rate"]) == sorted(k.rate for k in keys)
        assert "req/s" in plot.text and "sweep is still" not in plot.text
    finally:
        demo.close()


def test_a_learners_run_stops_a_background_run_which_then_runs_again():
    service = RunQueue()
    started, release = [], threading.Event()

    def slow(on_step, cancel):
        started.append("bg")
        while not release.is_set():
            if cancel.is_set():
                raise Cancelled()
            time.sleep(0.005)
        return Trace(device="fake", model="bg", config={}, requests=[], steps=[], block_size=1,
                     num_blocks=1, block_bytes=1, kv_bytes_capacity=1)

    def quick(on_step, cancel):
        started.append("fg")
        release.set()
        return Trace(device="fake", model="fg", config={}, requests=[], steps=[], block_size=1,
                     num_blocks=1, block_bytes=1, kv_bytes_capacity=1)

    done = []
    service.submit("s", "bg", slow, on_done=done.append, background=True)
    while not started:
        time.sleep(0.005)
    service.submit("s2", "fg", quick, on_done=done.append)
    assert service.wait_idle(30)
    assert started == ["bg", "fg", "bg"]  # stopped for the learner, then run from the start
    assert sorted(o.trace.model for o in done) == ["bg", "fg"] and not any(o.cancelled for o in done)
    service.stop()


def test_storyboard_shows_evictions_and_the_recompute_they_cost(bound_run):
    from widgets.storyboard import step_events

    trace = bound_run.trace
    events = step_events(trace)
    evictions = [(i, e) for i, es in enumerate(events) for e in es if e.kind == "preempted"]
    rejoins = [(i, e) for i, es in enumerate(events) for e in es if e.kind == "rejoined"]
    assert evictions and len(rejoins) == len(evictions)
    for i, event in rejoins:
        # the re-prefill: this request's prompt chunks from its return until its next decode
        redone = 0
        for step in trace.steps[i:]:
            item = next((it for it in step.scheduled if it.request_id == event.request_id), None)
            if item is None:
                continue
            if not item.is_prefill:
                break
            redone += item.num_tokens
        assert redone == event.tokens > 0
        assert f"{event.tokens} tokens" in event.text()


def test_one_batch_of_requests_with_room_is_not_run_twice(engine):
    client, lab = engine
    state = LabState(batch=4, requests=4, context=16, output=5, page=16)
    demo = make_demo(client, state)
    demo.sweeps.rate_keys = lambda key: []
    demo.start()
    try:
        assert settle_all(demo, lab)
        assert set(demo.policy.traces) == {"continuous"}
        assert "schedule the very same steps" in demo.policy.text
        assert demo.traces.get(state.key().replace(policy="static")) is None
    finally:
        demo.close()
