"""The page's state objects without a browser: LabState, run checks, and the demo controller
driving the real engine through the shared service."""
from __future__ import annotations

import pytest
import torch

from engine.llm_engine import describe_device
from engine.metrics import summarize
from lab.demo import DemoController
from lab.runs import Limits, ModelShelf, RunKey, check_run, kv_need_bytes
from lab.service import EngineService
from lab.state import LabState
from engine.config import PRESETS


def test_apply_clamps_out_of_range_and_drops_malformed_values():
    s = LabState()
    notes = s.apply({"batch": "500", "context": "abc", "page": "0", "model": "gpt-9",
                     "tpot_slo": "nan", "unknown": "1"})
    assert s.batch == 64 and s.page == 1
    assert s.context == 128 and s.model == "cpu-8m" and s.tpot_slo == 50.0
    assert len(notes) == 5
    assert any("batch=500" in n and "64" in n for n in notes)
    assert any("context='abc'" in n for n in notes)


def test_apply_accepts_good_values_silently():
    s = LabState()
    assert s.apply({"batch": "4", "context": "256", "ttft_slo": "250.5"}) == []
    assert (s.batch, s.context, s.ttft_slo) == (4, 256, 250.5)


def test_kv_need_beyond_budget_is_refused_before_running():
    key = RunKey("cpu-8m", batch=64, context=8000, page=16, output=64)
    need = kv_need_bytes(key, PRESETS["cpu-8m"], 4)
    why = check_run(key, Limits(kv_budget_bytes=need - 1, max_run_s=1e9, device="cpu"))
    assert why is not None and "KV cache" in why and "budget" in why


def test_context_past_the_model_maximum_is_refused():
    why = check_run(RunKey("cpu-8m", 1, 8192, 16, 512), Limits(device="cpu"))
    assert why is not None and "maximum" in why


def test_runs_too_long_for_a_shared_device_are_refused():
    key = RunKey("cpu-30m", batch=64, context=4096, page=16, output=64)
    why = check_run(key, Limits(kv_budget_bytes=2**40, max_run_s=5, device="cpu"))
    assert why is not None and "shared device" in why
    assert describe_device(torch.device("cpu")) in why  # the threads runs use, not the probe's


def test_a_small_run_is_allowed():
    assert check_run(RunKey("cpu-8m", 2, 32, 16, 8), Limits(device="cpu")) is None


@pytest.fixture(scope="module")
def controller():
    service = EngineService()
    demo = DemoController(LabState(batch=2, requests=2, context=32, output=6, page=16), service,
                          ModelShelf("cpu"), Limits(device="cpu"))
    yield demo
    service.stop()


def test_controller_measures_and_fills_the_summary(controller):
    controller.start()
    assert controller.service.wait_idle(180)
    trace = controller.trace
    assert trace is not None and controller.state.status == "done"
    assert [len(r.output_ids) for r in trace.requests] == [6, 6]
    rows = controller.summary.values
    assert float(rows["TPOT p50 (ms)"]) > 0 and float(rows["KV GB (measured)"]) > 0


def test_bad_setting_keeps_last_results_and_shows_a_notice(controller):
    before = controller.trace
    controller.state.apply({"context": 8192, "output": 512})
    assert controller.state.status == "refused"
    assert "maximum" in controller.state.notice
    assert controller.trace is before
    controller.state.apply({"context": 32, "output": 6})


def test_changing_an_slo_rejudges_without_rerunning(controller):
    assert controller.service.wait_idle(180)
    runs = controller.service.runs_started
    controller.state.tpot_slo = 0.1  # nothing meets a 0.1 ms TPOT on a CPU
    assert controller.service.runs_started == runs
    summary = summarize(controller.trace, controller.state.slo())
    assert summary.slo_attainment == 0.0
    assert float(controller.summary.value("Goodput (req/s)")) == 0.0


def test_a_cached_setting_is_drawn_at_once_without_clearing_the_plots(controller):
    assert controller.service.wait_idle(180)
    first = controller.state.key()
    controller.state.batch = 3  # a new setting: it runs
    assert controller.service.wait_idle(180)
    statuses, stale = [], []
    controller.state.param.watch(lambda e: statuses.append(e.new), "status")
    controller.summary.param.watch(lambda e: stale.append(e.new), "stale")
    controller.state.batch = 2  # back to the first setting, which the service has cached
    assert controller.shown_key == first and controller.trace is controller.service.cached(first)
    assert statuses == [] and stale == []  # never "queued", never greyed: drawn in one pass
    assert controller.state.status == "done"


def test_frozen_counts_the_document_once_and_only_when_a_change_asks():
    from bokeh.document import Document
    from bokeh.models import Column, Div

    from lab.demo import frozen

    doc = Document()
    col = Column(Div())
    doc.add_root(col)
    calls = []
    real = doc.models.recompute
    doc.models.recompute = lambda: (calls.append(1), real())[1]

    def regrow() -> None:
        for _ in range(3):
            col.children = [Div(), Div()]  # each change carries models: Bokeh would recount

    frozen(doc, regrow)
    assert calls == [1] and len(doc.models) == 3
    assert all(child.document is doc for child in col.children)
    calls.clear()
    frozen(doc, lambda: setattr(col.children[0], "text", "plain text"))
    assert calls == []  # nothing asked for a recount
    with pytest.raises(ValueError):
        frozen(doc, lambda: frozen(doc, lambda: (regrow(), int("not a number"))))
    assert calls == [1] and "invalidate" not in vars(doc.models)  # restored, even after an error


def test_live_updates_during_a_run_are_rate_limited(controller, monkeypatch):
    # Every live update is work for the server's loop that competes with the measured run; the
    # first step of a burst is shown at once, later ones wait out `live_update_s` together.
    from dataclasses import replace

    from lab.service import Outcome

    assert controller.service.wait_idle(180)
    monkeypatch.setattr(controller, "limits", replace(controller.limits, live_update_s=10.0))
    hops = []
    monkeypatch.setattr(controller, "_hop", lambda fn, *args: hops.append((fn.__name__, args)))
    drawn = []
    monkeypatch.setattr(controller.timeline, "add_steps", lambda steps, info: drawn.extend(steps))
    monkeypatch.setattr(controller.kv_memory, "add_steps", lambda steps, info: None)
    monkeypatch.setattr(controller.queue, "add_steps", lambda steps, info: None)
    controller._flush_scheduled, controller._last_flush = False, 0.0
    controller.state.status = "running"
    run = controller._run_id
    controller._step_from_worker(run, "step 0")
    assert hops == [("_flush_steps", ())]  # nothing shown for a while: at once
    controller._flush_steps()
    hops.clear()
    for i in range(1, 5):
        controller._step_from_worker(run, f"step {i}")
    controller._step_from_worker(run - 1, "a step of a run the learner moved on from")
    assert len(hops) == 1 and hops[0][0] == "_flush_later"
    assert 9.0 < hops[0][1][0] <= 10.0
    assert controller._pending_steps == ["step 1", "step 2", "step 3", "step 4"]

    class Loop:  # stands in for a served document's timer
        session_context = object()

        def __init__(self):
            self.timers = []

        def add_timeout_callback(self, callback, ms):
            self.timers.append((callback, ms))

    loop = Loop()
    monkeypatch.setattr(controller, "_doc", loop)
    controller._flush_later(hops[0][1][0])
    assert len(loop.timers) == 1 and 9_000 < loop.timers[0][1] <= 10_000
    monkeypatch.setattr(controller, "_doc", None)
    # The run fails before the timer fires: its last steps are dropped, and the late flush
    # neither draws them nor turns "failed" back into "running".
    controller._finish(controller.state.key(), Outcome(error="the engine broke"))
    controller._flush_steps()
    assert drawn == ["step 0"]
    assert controller.state.status == "failed" and controller._pending_steps == []
    assert not controller._flush_scheduled
    controller.state.param.update(status="done", notice="")


def test_cpu_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAB_CPU_THREADS", "3")
    assert Limits.from_env().cpu_threads == 3
    monkeypatch.delenv("LAB_CPU_THREADS")
    assert Limits.from_env().cpu_threads == Limits().cpu_threads >= 1
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("LAB_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="LAB_CPU_THREADS"):
            Limits.from_env()


def test_live_update_gap_must_be_a_sane_number_of_seconds(monkeypatch):
    def gap(text: str) -> float:
        monkeypatch.setenv("LAB_LIVE_UPDATE_S", text)
        return Limits.from_env().live_update_s

    assert gap("0.25") == 0.25 and gap("0") == 0.0
    for bad in ("fast", "-1", "nan", "inf", "600"):
        with pytest.raises(ValueError, match="LAB_LIVE_UPDATE_S"):
            gap(bad)
    monkeypatch.delenv("LAB_LIVE_UPDATE_S")
    assert Limits.from_env().live_update_s == Limits().live_update_s == 0.25
