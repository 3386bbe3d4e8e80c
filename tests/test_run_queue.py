"""The shared engine service: caching, superseding, joining, fairness and failure isolation.

Runs are small fakes that record their order and can be held open, so each test controls timing
without a model; one test at the end drives the real engine through the service.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine.config import ConfigError
from engine.llm_engine import Cancelled
from engine.records import Outcome, StepRecord, Trace
from engine.server.run_queue import RunQueue as EngineService
from tests.serverkit import wait_until


def fake_trace(tag: str) -> Trace:
    return Trace(device="fake", model=tag, config={}, requests=[], steps=[], block_size=1,
                 num_blocks=1, block_bytes=1, kv_bytes_capacity=1)


def step(i: int) -> StepRecord:
    return StepRecord(index=i, t_start=0, t_end=0, prefill_tokens=0, decode_seqs=1, running=1,
                      waiting=0, kv_blocks_used=1, kv_bytes_used=1, waste_tokens=0)


class Recorder:
    """A fake run that logs its key, streams two steps, and optionally waits for a gate."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def run(self, tag: str, fail: Exception | None = None):
        def go(on_step, cancel: threading.Event) -> Trace:
            self.order.append(tag)
            on_step(step(0))
            gate = self.gates.get(tag)
            while gate is not None and not gate.is_set():
                if cancel.is_set():
                    raise Cancelled()
                time.sleep(0.005)
            if fail is not None:
                raise fail
            on_step(step(1))
            return fake_trace(tag)
        return go


def collect():
    got: list[Outcome] = []
    done = threading.Event()

    def on_done(o: Outcome) -> None:
        got.append(o)
        done.set()
    return got, done, on_done


@pytest.fixture
def service():
    s = EngineService()
    yield s
    s.stop()


def test_identical_settings_run_once_and_are_cached(service):
    rec = Recorder()
    got1, done1, cb1 = collect()
    service.submit("a", "k", rec.run("k"), cb1)
    assert done1.wait(5)
    got2, _, cb2 = collect()
    service.submit("b", "k", rec.run("k"), cb2)  # answered from the cache, synchronously
    assert got2 and got2[0].cached and got2[0].trace.model == "k"
    assert rec.order == ["k"] and service.runs_started == 1


def test_newer_job_supersedes_older_one_of_the_same_session(service):
    rec = Recorder()
    rec.gates["old"] = threading.Event()
    got_old, done_old, cb_old = collect()
    got_new, done_new, cb_new = collect()
    service.submit("a", "old", rec.run("old"), cb_old)
    while rec.order != ["old"]:
        time.sleep(0.005)
    service.submit("a", "new", rec.run("new"), cb_new)
    assert done_old.wait(5) and got_old[0].cancelled
    assert done_new.wait(5) and got_new[0].trace.model == "new"
    assert service.cached("old") is None  # a cancelled run is never cached


def test_moving_to_a_cached_setting_drops_the_run_in_flight(service):
    rec = Recorder()
    _, done_k, cb_k = collect()
    service.submit("b", "k", rec.run("k"), cb_k)
    assert done_k.wait(5)
    rec.gates["slow"] = threading.Event()
    got_slow, done_slow, cb_slow = collect()
    service.submit("a", "slow", rec.run("slow"), cb_slow)
    while rec.order != ["k", "slow"]:
        time.sleep(0.005)
    got, _, cb = collect()
    assert service.submit("a", "k", rec.run("k"), cb)  # answered from the cache
    assert got[0].cached and got[0].trace.model == "k"
    assert done_slow.wait(5) and got_slow[0].cancelled  # not drawn later over the cached one
    rec.gates["slow"].set()
    assert service.cached("slow") is None


def test_joining_a_run_in_flight_replays_its_steps(service):
    rec = Recorder()
    rec.gates["k"] = threading.Event()
    steps_b: list[int] = []
    got_a, done_a, cb_a = collect()
    got_b, done_b, cb_b = collect()
    service.submit("a", "k", rec.run("k"), cb_a)
    while rec.order != ["k"]:
        time.sleep(0.005)
    service.submit("b", "k", rec.run("k"), cb_b, on_step=lambda s: steps_b.append(s.index))
    rec.gates["k"].set()
    assert done_a.wait(5) and done_b.wait(5)
    assert rec.order == ["k"]  # one run served both sessions
    assert steps_b == [0, 1]  # the step before joining was replayed


def test_sessions_are_served_round_robin(service):
    rec = Recorder()
    rec.gates["blocker"] = threading.Event()
    service.submit("x", "blocker", rec.run("blocker"), lambda o: None)
    while rec.order != ["blocker"]:
        time.sleep(0.005)
    # Session a submits twice (the second replaces the first in a's place), b and c once each.
    for session, key in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")):
        service.submit(session, key, rec.run(key), lambda o: None)
    assert service.queue_position("b") >= 1
    rec.gates["blocker"].set()
    assert service.wait_idle(5)
    assert rec.order == ["blocker", "a2", "b1", "c1"]


def test_background_work_waits_for_foreground_jobs(service):
    rec = Recorder()
    rec.gates["blocker"] = threading.Event()
    service.submit("x", "blocker", rec.run("blocker"), lambda o: None)
    while rec.order != ["blocker"]:
        time.sleep(0.005)
    service.submit("a", "sweep", rec.run("sweep"), lambda o: None, background=True)
    service.submit("b", "fg", rec.run("fg"), lambda o: None)
    rec.gates["blocker"].set()
    assert service.wait_idle(5)
    assert rec.order == ["blocker", "fg", "sweep"]


def test_a_failing_job_reports_and_the_worker_keeps_serving(service):
    rec = Recorder()
    got1, done1, cb1 = collect()
    got2, done2, cb2 = collect()
    got3, done3, cb3 = collect()
    service.submit("a", "boom", rec.run("boom", RuntimeError("kernel exploded")), cb1)
    service.submit("b", "bad", rec.run("bad", ConfigError("page size must be at least 1")), cb2)
    service.submit("c", "fine", rec.run("fine"), cb3)
    assert done1.wait(5) and done2.wait(5) and done3.wait(5)
    assert "kernel exploded" in got1[0].error and got1[0].trace is None
    assert got2[0].error == "page size must be at least 1"
    assert got3[0].trace.model == "fine"


def test_forgetting_a_session_cancels_its_work(service):
    rec = Recorder()
    rec.gates["long"] = threading.Event()
    service.submit("a", "long", rec.run("long"), lambda o: None)
    service.submit("a", "sw", rec.run("sw"), lambda o: None, background=True)
    while rec.order != ["long"]:
        time.sleep(0.005)
    service.forget("a")
    assert service.wait_idle(5)
    assert rec.order == ["long"]  # cancelled mid-run, and the sweep never started
    assert service.stats()["background"] == 0


def test_real_engine_runs_through_the_service(service):
    from engine.server.measured_runs import ModelShelf, RunSpec, execute
    shelf = ModelShelf("cpu")
    spec = RunSpec.from_json({"engine": {"model": "tiny", "block_size": 4, "max_num_seqs": 2,
                                         "kv_budget_bytes": 2**20},
                              "workload": {"num_requests": 2, "prompt_len": 16,
                                           "output_len": 3}}, kv_cap_bytes=2**30)
    steps: list[StepRecord] = []
    got, done, cb = collect()
    service.submit("a", spec.cache_key(),
                   lambda on_step, cancel: execute(spec, shelf, on_step, cancel), cb,
                   on_step=steps.append)
    assert done.wait(30)
    trace = got[0].trace
    assert [len(r.output_ids) for r in trace.requests] == [3, 3]
    assert len(steps) == len(trace.steps) > 0


def test_a_move_while_a_result_is_being_told_does_not_answer_twice():
    """A session moves on at the moment its finished run is reported (here: from inside the
    report, so the timing is certain). The finished run must not also answer it "cancelled"."""
    service = EngineService()
    heard: list[Outcome] = []

    def on_done(outcome: Outcome) -> None:
        heard.append(outcome)
        if len(heard) == 1:  # the learner moves a slider just as the result arrives
            service.submit("s", "next", lambda on_step, cancel: fake_trace("next"),
                           lambda o: None)

    service.submit("s", "first", lambda on_step, cancel: fake_trace("first"), on_done)
    try:
        assert service.wait_idle(10)
        assert len(heard) == 1 and heard[0].trace is not None
    finally:
        service.stop()


def test_positions_are_pushed_as_they_change_and_detach_drops_only_that_stream():
    """Three sessions queue behind a running job: each hears its place, hears it again when the
    line moves, and a stream that closes takes its own listener away, not a newer one's."""
    service = EngineService()
    gate = threading.Event()
    heard: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def blocked(on_step, cancel):
        gate.wait(10)
        return fake_trace("first")

    try:
        service.submit("x", "first", blocked, lambda o: None)
        assert wait_until(lambda: service.stats()["running"] == 1)
        old, new = object(), object()
        for session in "abc":
            service.submit(session, f"job-{session}", lambda on_step, cancel: fake_trace("j"),
                           lambda o: None, on_position=heard[session].append,
                           tag=old if session == "b" else None)
        assert heard == {"a": [1], "b": [2], "c": [3]}
        service.detach(old)  # b's stream closed: c moves up, a stays
        assert heard["c"] == [3, 2] and heard["a"] == [1] and heard["b"] == [2]
        assert service.stats()["waiting"] == 2
        service.submit("c", "job-c", lambda on_step, cancel: fake_trace("j"), lambda o: None,
                       tag=new)
        service.detach(old)  # a late close of the old stream leaves the newer listener alone
        assert service.stats()["waiting"] == 2
        gate.set()
        assert service.wait_idle(10)
    finally:
        gate.set()
        service.stop()
