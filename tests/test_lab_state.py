"""The page's state objects without a browser: LabState, run checks, and the demo controller
driving a real engine server (on a thread of this process) through its HTTP routes."""
from __future__ import annotations

import pytest

from engine.config import PRESETS
from engine.metrics import summarize
from lab.runs import Limits, RunKey, check_run, kv_need_bytes
from lab.state import LabState
from tests.labkit import TEST_ENGINE, lab_engine, make_demo, queue_idle, settle


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
    why = check_run(key, Limits(kv_budget_bytes=need - 1, max_run_s=1e9), TEST_ENGINE)
    assert why is not None and "KV cache" in why and "budget" in why


def test_context_past_the_model_maximum_is_refused():
    why = check_run(RunKey("cpu-8m", 1, 8192, 16, 512), Limits(), TEST_ENGINE)
    assert why is not None and "maximum" in why


def test_runs_too_long_for_a_shared_device_are_refused():
    key = RunKey("cpu-30m", batch=64, context=4096, page=16, output=64)
    why = check_run(key, Limits(kv_budget_bytes=2**40, max_run_s=5), TEST_ENGINE)
    assert why is not None and "shared device" in why
    assert TEST_ENGINE.device in why  # the engine server's device, as it measures


def test_a_small_run_is_allowed():
    assert check_run(RunKey("cpu-8m", 2, 32, 16, 8), Limits(), TEST_ENGINE) is None


@pytest.fixture(scope="module")
def engine():
    with lab_engine() as (client, lab):
        yield client, lab


@pytest.fixture(scope="module")
def controller(engine):
    client, lab = engine
    demo = make_demo(client, LabState(batch=2, requests=2, context=32, output=6, page=16))
    demo.lab = lab  # the server side, for counting runs
    yield demo
    demo.close()


def test_controller_measures_and_fills_the_summary(controller):
    controller.start()
    assert settle(controller)
    trace = controller.trace
    assert trace is not None and controller.run.status == "done"
    assert [len(r.output_ids) for r in trace.requests] == [6, 6]
    assert trace.device == controller.engine.device  # measured by the engine server
    rows = controller.summary.values
    assert float(rows["TPOT p50 (ms)"]) > 0 and float(rows["KV GB (measured)"]) > 0


def test_bad_setting_keeps_last_results_and_shows_a_notice(controller):
    before = controller.trace
    controller.state.apply({"context": 8192, "output": 512})
    assert controller.run.status == "refused"
    assert "maximum" in controller.run.notice
    assert controller.trace is before
    controller.state.apply({"context": 32, "output": 6})
    assert settle(controller)


def test_changing_an_slo_rejudges_without_rerunning(controller):
    assert queue_idle(controller.lab)
    runs = controller.lab.queue.runs_started
    controller.state.tpot_slo = 0.1  # nothing meets a 0.1 ms TPOT on a CPU
    assert controller.lab.queue.runs_started == runs
    summary = summarize(controller.trace, controller.state.slo())
    assert summary.slo_attainment == 0.0
    assert float(controller.summary.value("Goodput (req/s)")) == 0.0
    controller.state.tpot_slo = 50.0


def test_a_cached_setting_is_drawn_at_once_without_clearing_the_plots(controller):
    first = controller.state.key()
    controller.state.batch = 3  # a new setting: it runs
    assert settle(controller)
    statuses, stale = [], []
    controller.run.param.watch(lambda e: statuses.append(e.new), "status")
    controller.summary.param.watch(lambda e: stale.append(e.new), "stale")
    controller.state.batch = 2  # back to the first setting, which this process holds
    assert controller.shown_key == first and controller.trace is controller.traces.get(first)
    assert statuses == [] and stale == []  # never "queued", never greyed: drawn in one pass
    assert controller.run.status == "done"


def test_steps_reach_the_plots_once_a_tick_and_a_superseded_run_is_dropped(controller):
    """Steps wait in the inbox until the ticker drains them, all at once; events of a run the
    learner has moved on from are dropped, and a failure keeps the last trace shown."""
    from engine.records import Outcome

    assert settle(controller)
    drawn: list[list] = []
    controller.run.param.watch(lambda e: drawn.append(e.new), "new_steps")
    controller._generation += 1
    generation = controller._generation
    controller._cleared, controller._pending = False, controller.state.key()
    trace = controller.trace
    for step in trace.steps[:3]:
        controller._receive(generation, controller.state.key(), {"event": "step",
                                                                 "step": step.to_json()})
    controller._receive(generation - 1, controller.state.key(),
                        {"event": "step", "step": trace.steps[0].to_json()})
    assert drawn == []  # nothing reaches a plot between ticks
    controller.ticker.tick()
    assert len(drawn) == 1 and [s.index for s in drawn[0]] == [s.index for s in trace.steps[:3]]
    assert controller.run.status == "running" and controller.run.steps_done == 3
    controller._receive(generation, controller.state.key(),
                        {"event": "error", "run": 0, "message": "the engine broke"})
    controller.ticker.tick()
    assert controller.run.status == "failed" and "the engine broke" in controller.notice.message
    assert controller.trace is trace
    assert Outcome.from_event({"event": "cancelled"}).cancelled


def test_an_absent_engine_server_is_a_notice_not_a_traceback():
    from lab.engine_client import EngineClient
    from tests.serverkit import free_port

    demo = make_demo(EngineClient(f"http://127.0.0.1:{free_port()}"), LabState())
    demo.start()
    assert demo.run.status == "failed"
    assert "No engine server answers" in demo.notice.message and "LAB_ENGINE_URL" in \
        demo.notice.message


def test_the_live_update_period_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAB_LIVE_UPDATE_S", "0.5")
    assert Limits.from_env().live_update_s == 0.5
    for bad in ("0", "two", "-1", "100"):
        monkeypatch.setenv("LAB_LIVE_UPDATE_S", bad)
        with pytest.raises(ValueError, match="LAB_LIVE_UPDATE_S"):
            Limits.from_env()
