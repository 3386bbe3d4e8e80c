"""Bad input never reaches the learner as a traceback: fuzzed settings, fuzzed run keys, and a
service that keeps serving through failing runs and sessions that come and go.

Extends tests/test_lab_state.py (fixed cases of `apply` and `check_run`) and tests/test_run_queue.py
(fixed orders of submit, supersede and failure) with generated ones.
"""
from __future__ import annotations

import math
import threading

import param
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import PRESETS
from engine.records import Outcome, Trace
from engine.server.measured_runs import ModelShelf, RunSpec, execute
from engine.server.run_queue import RunQueue
from lab.runs import Limits, RunKey, check_run, kv_need_bytes, run_spec
from lab.state import LabState
from tests.fakes import FakeClient
from tests.labkit import TEST_ENGINE, make_demo

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Anything a URL, a preset file or a hand-edited link might carry.
raw_values = st.one_of(
    st.none(), st.booleans(), st.text(max_size=40),
    st.integers(min_value=-10**30, max_value=10**30), st.integers(),  # unbounded: huge ints too
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", " 8 ", "8.5", "-0", "\u0661\u0662",
                     "9" * 500, "", "cpu-8m", "gpu-1b", "tiny", "../etc/passwd", "<b>64</b>"]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers()),
)
keys = st.one_of(st.sampled_from(LabState.CONTROLS), st.text(max_size=12))


def accepted_as_is(p: param.Parameter, raw: object) -> bool:
    """Whether `apply` should take `raw` for parameter `p` without a note."""
    if isinstance(p, param.Selector):
        return isinstance(raw, str) and raw in p.objects
    try:
        number = float(raw)
    except (TypeError, ValueError, OverflowError):
        return False
    if not math.isfinite(number):
        return False
    low, high = p.bounds
    whole = not isinstance(p, param.Integer) or number == int(number)
    return low <= number <= high and whole


@FAST
@given(st.dictionaries(keys, raw_values, max_size=10))
def test_apply_never_raises_stays_in_bounds_and_explains_every_change(values):
    s = LabState()
    notes = s.apply(values)
    assert all(isinstance(n, str) and n for n in notes)
    for name in LabState.CONTROLS:
        p = s.param[name]
        if isinstance(p, param.Selector):
            assert getattr(s, name) in p.objects
        else:
            low, high = p.bounds
            assert low <= getattr(s, name) <= high
    for name, raw in values.items():
        if name not in LabState.CONTROLS:
            continue
        mentioned = any(n.startswith(name) for n in notes)
        assert mentioned != accepted_as_is(s.param[name], raw), (name, raw, notes)


def test_apply_drops_a_huge_integer_with_a_note():
    s = LabState()
    notes = s.apply({"batch": 10**400})
    assert s.batch == 64 or s.batch == 8
    assert notes and notes[0].startswith("batch")


LIMITS = Limits(kv_budget_bytes=256 * 2**20, max_run_s=20.0)
run_keys = st.builds(
    RunKey,
    model=st.one_of(st.sampled_from(sorted(PRESETS)), st.text(max_size=10)),
    batch=st.integers(min_value=-4, max_value=10**6),
    context=st.integers(min_value=-4, max_value=10**6),
    page=st.integers(min_value=-4, max_value=4096),
    output=st.integers(min_value=-4, max_value=10**5),
)


@FAST
@given(run_keys)
def test_check_run_answers_none_or_a_sentence_and_refuses_what_does_not_fit(key):
    why = check_run(key, LIMITS, TEST_ENGINE)
    assert why is None or (isinstance(why, str) and why)
    if key.model in PRESETS and min(key.batch, key.context, key.page, key.output) >= 1:
        if kv_need_bytes(key, PRESETS[key.model], 4) > LIMITS.kv_budget_bytes:
            assert why is not None
    if min(key.batch, key.context, key.page, key.output) < 1:
        assert why is not None  # nothing can run with no requests, no tokens or no page


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(LabState.CONTROLS), raw_values, min_size=1, max_size=7))
def test_demo_refuses_before_submitting_and_always_says_why(values):
    service = FakeClient(TEST_ENGINE)
    demo = make_demo(service, LabState(), LIMITS)
    demo.state.apply(values)
    demo.submit()
    why = check_run(demo.state.key(), LIMITS, TEST_ENGINE)
    if why is None:
        assert demo.run.status == "queued" and service.submitted >= 1
    else:
        assert demo.run.status == "refused" and demo.notice.message.startswith(why)
        assert service.submitted == 0


def fake_trace(tag: str) -> Trace:
    return Trace(device="fake", model=tag, config={}, requests=[], steps=[], block_size=1,
                 num_blocks=1, block_bytes=1, kv_bytes_capacity=1)


ops = st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 5),
                         st.sampled_from(["submit", "submit", "submit", "background", "forget"])),
               min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(ops, st.integers(0, 25))
def test_service_answers_each_listener_at_most_once_and_ends_idle(steps, release_at):
    """Keys divisible by 3 fail in the engine. Whatever the order of submits, background work and
    closing sessions: no listener hears twice, each session's last live request is answered, the
    failures say so, and the worker ends with nothing queued. A blocking job holds the worker
    until step `release_at`, so the steps before it meet a full queue, deterministically."""
    service = RunQueue()
    gate = threading.Event()
    service.submit("z", "blocker", lambda on_step, cancel: gate.wait(10) and fake_trace("z"),
                   lambda outcome: None)
    heard: dict[int, list[Outcome]] = {}
    last: dict[str, tuple[int, int]] = {}  # session -> (listener id, key) of its last submit
    lock = threading.Lock()

    def run_for(key: int):
        def go(on_step, cancel) -> Trace:
            if key % 3 == 0:
                raise RuntimeError(f"simulated engine fault on {key}")
            return fake_trace(str(key))
        return go

    def listener(lid: int):
        def on_done(outcome: Outcome) -> None:
            with lock:
                heard.setdefault(lid, []).append(outcome)
        return on_done

    try:
        for lid, (session, key, what) in enumerate(steps):
            if lid == release_at:
                gate.set()
            if what == "forget":
                service.forget(session)
                last.pop(session, None)
                continue
            service.submit(session, key, run_for(key), listener(lid),
                           background=what == "background")
            if what == "submit":
                last[session] = (lid, key)
        gate.set()
        assert service.wait_idle(10)
        stats = service.stats()
        assert stats["waiting"] == stats["background"] == stats["running"] == 0
        with lock:
            assert all(len(outcomes) == 1 for outcomes in heard.values())
            for lid, key in last.values():
                (outcome,) = heard[lid]
                if key % 3 == 0:
                    assert outcome.error and "simulated engine fault" in outcome.error
                else:
                    assert outcome.trace is not None and outcome.trace.model == str(key)
    finally:
        service.stop()


def test_a_shared_waiting_job_survives_its_first_session_moving_on():
    """Two students queue the same setting; the first moves on before it runs. The second must
    still get the run, and the worker must keep serving."""
    service = RunQueue()
    gate = threading.Event()
    got: dict[str, Outcome] = {}
    service.submit("x", "blocker", lambda on_step, cancel: gate.wait(10) and fake_trace("x"),
                   lambda outcome: None)
    try:
        for session, key in (("a", 1), ("b", 1), ("a", 2)):
            service.submit(session, key, lambda on_step, cancel, k=key: fake_trace(str(k)),
                           lambda outcome, s=session, k=key: got.setdefault(f"{s}{k}", outcome))
        gate.set()
        assert service.wait_idle(10)
        assert got["a1"].cancelled
        assert got["b1"].trace is not None and got["b1"].trace.model == "1"
        assert got["a2"].trace is not None and got["a2"].trace.model == "2"
        assert service.stats()["worker_alive"] in (0, 1)
        later: list[Outcome] = []
        service.submit("c", 3, lambda on_step, cancel: fake_trace("3"), later.append)
        assert service.wait_idle(10) and later and later[0].trace.model == "3"
    finally:
        service.stop()


def test_an_exception_inside_the_real_engine_fails_only_that_job(monkeypatch):
    from engine import llm_engine
    shelf = ModelShelf("cpu")
    real = llm_engine.ModelRunner.run
    armed = {"calls": 0}

    def faulty(self, batch):
        if armed["calls"] >= 0:
            armed["calls"] += 1
            if armed["calls"] == 2:  # mid-run, after the first step's tensors are allocated
                armed["calls"] = -1
                raise RuntimeError("simulated device fault")
        return real(self, batch)

    monkeypatch.setattr(llm_engine.ModelRunner, "run", faulty)
    service = RunQueue()
    got: dict[str, Outcome] = {}
    done = threading.Event()

    def on_done(session):
        def record(outcome: Outcome) -> None:
            got[session] = outcome
            if len(got) == 3:
                done.set()
        return record

    try:
        for session, batch in (("a", 2), ("b", 3), ("c", 1)):
            key = RunKey("tiny", batch=batch, context=16, page=4, output=3)
            spec = RunSpec.from_json(run_spec(key, TEST_ENGINE), kv_cap_bytes=2**30)
            service.submit(session, spec.cache_key(), lambda on_step, cancel, k=spec: execute(
                k, shelf, on_step, cancel), on_done(session))
        assert done.wait(60)
    finally:
        service.stop()
    assert got["a"].trace is None and "simulated device fault" in got["a"].error
    assert got["a"].error.startswith("the engine failed on this setting")
    assert [len(r.output_ids) for r in got["b"].trace.requests] == [3, 3, 3]
    assert got["c"].trace is not None and service.stats()["cached"] == 2


@pytest.mark.parametrize("values", [
    {"batch": 64, "context": 8192, "output": 512},  # past the model's positions and the budget
    {"batch": 64, "context": 4096, "output": 256, "page": 256},
])
def test_an_oversized_setting_is_refused_with_a_notice_and_nothing_runs(values):
    service = FakeClient(TEST_ENGINE)
    demo = make_demo(service, LabState(), LIMITS)
    demo.state.apply(values)
    assert demo.run.status == "refused" and service.submitted == 0
    assert demo.notice.alert.visible and demo.notice.message
