"""The interactive demo: sliders -> LabState -> the engine server -> live measured plots.

Each session owns one `DemoController`. A change of a run-shaping control is checked (`check_run`)
and, if it may run, posted to the engine server, which measures it in its own process. The events
it streams back (queue position, steps, the finished trace) are read on a client thread and left in
this session's inbox; the session's ticker (lab/ticker.py) drains the inbox on the session's event
loop and sets the `RunState` the plots follow. Nothing here touches a Bokeh model from another
thread. SLO changes only re-judge the last trace: no rerun.

`EndpointDemoController` (lab/endpoint_demo.py) measures an external deployment instead by
replacing five methods: `_make_plots`, `run_key`, `_why_not`, `_open_stream` and `_label_run`.
"""
from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from functools import partial

from engine.config import preset
from engine.metrics import Summary, summarize
from engine.records import Outcome, StepRecord, Trace
from lab.background import REPEATS, BackgroundRuns
from lab.engine_client import EngineClient, EngineInfo, EngineUnavailable, RunStream, TraceCache
from lab.runs import Limits, RunKey, check_run, kv_capacity_bytes, run_spec, running_bounds
from lab.state import LabState
from lab.ticker import Ticker, recount_models_once
from widgets.device_banner import DeviceBanner
from widgets.goodput_rate_plot import GoodputRatePlot
from widgets.kv_memory_plot import KVMemoryPlot
from widgets.latency_plot import LatencyPlot
from widgets.notice import Notice
from widgets.page_map import PageMap
from widgets.policy_compare import PolicyComparison
from widgets.queue_plot import QueuePlot
from widgets.run_state import RunState
from widgets.style import RunInfo
from widgets.summary_table import SummaryTable
from widgets.timeline_plot import TimelinePlot
from widgets.tpot_batch_plot import TPOTBatchPlot

BACKGROUND = "background"  # the inbox tag of background events


class DemoController:
    """UI-free wiring between one session's controls, the engine server and the plots."""

    # Status lines that differ from the demo view's defaults (an external endpoint's wording).
    status_text: tuple[tuple[str, str], ...] = ()
    fixed_controls: tuple[str, ...] = ()  # controls the engine behind the page does not take
    storyboard_note: str | None = None  # said in place of the storyboard, if it cannot be drawn

    def __init__(self, state: LabState, client: EngineClient, limits: Limits,
                 traces: TraceCache | None = None, ticker: Ticker | None = None) -> None:
        self.state = state
        self.client = client
        self.limits = limits
        self.traces = traces if traces is not None else TraceCache()
        self.session = uuid.uuid4().hex
        self.run = RunState()
        self.banner = DeviceBanner()
        self.notice = Notice()
        self.link_notice = Notice()  # what a shared link's bad values were turned into
        self.gate = None  # the prediction gate, set by the demo's layout
        self.plot_tabs = None  # the plots' tabs, set by the demo's layout
        self._make_plots()
        self.trace: Trace | None = None  # the last good run
        self.shown_key: RunKey | None = None
        self.repeat = 0  # which measurement of the current setting "Run again" asked for
        self.listeners: list = []  # called with (trace, summary) after each finished run
        self.ticker = ticker if ticker is not None else Ticker(int(limits.live_update_s * 1e3))
        self.ticker.every(self.tick)
        # (generation, key, event) from the client threads; deque appends and pops are atomic
        self._inbox: deque[tuple[object, RunKey, dict]] = deque()
        self._generation = 0  # bumped by each foreground submission; older events are dropped
        self._cleared = True  # the plots were emptied for the run in flight
        self._pending: RunKey | None = None  # the run in flight
        self._stream: RunStream | None = None
        self._background_stream: RunStream | None = None
        self._background_done: dict[RunKey, Callable[[RunKey, Outcome], None]] = {}
        self.sweeps = BackgroundRuns(self)
        state.param.watch(self._on_controls, list(LabState.RUN_CONTROLS))
        state.param.watch(self._on_slo, ["ttft_slo", "tpot_slo"])

    def _make_plots(self) -> None:
        """The summary and the plots, each following `self.run`."""
        self.summary = SummaryTable(run=self.run)
        self.latency = LatencyPlot(run=self.run)
        self.timeline = TimelinePlot(run=self.run)
        self.kv_memory = KVMemoryPlot(run=self.run)
        self.page_map = PageMap(run=self.run)
        self.queue = QueuePlot(run=self.run)
        self.tpot_batch = TPOTBatchPlot()
        self.policy = PolicyComparison()
        self.goodput_rate = GoodputRatePlot()

    @property
    def engine(self) -> EngineInfo:
        """The engine server's device and limits (EngineUnavailable when none answers)."""
        return self.client.info()

    # -- submitting ----------------------------------------------------------------------------
    def start(self) -> None:
        with recount_models_once():
            self.submit()

    def _on_controls(self, *_events) -> None:
        self.repeat = 0
        with recount_models_once():
            self.submit()

    def run_again(self) -> None:
        """Measure the current setting once more (a new measurement, not the cached one)."""
        base = self.run_key()
        self.repeat = next(r for r in range(1, 10**6)
                           if self.traces.get(base.replace(repeat=r)) is None)
        with recount_models_once():
            self.submit()

    def repeats(self, key: RunKey) -> list[Trace]:
        """Every measurement of `key`'s setting this page process has (any repeat index)."""
        found = []
        for r in range(10**6):
            trace = self.traces.get(key.replace(repeat=r))
            if trace is None and r >= REPEATS:
                break
            if trace is not None:
                found.append(trace)
        return found

    def _refuse(self, why: str, status: str = "refused") -> None:
        self.run.param.update(status=status, notice=why)
        self.notice.show(why + " The plots keep the last measured run.",
                         "danger" if status == "failed" else "warning")

    def run_key(self, repeat: int = 0) -> RunKey:
        """The run the controls ask for: its cache key."""
        return self.state.key(repeat)

    def _why_not(self, key: RunKey) -> tuple[str, str] | None:
        """(why, status) when `key` may not run now, else None."""
        try:
            engine = self.engine
        except EngineUnavailable as err:
            return str(err), "failed"
        why = check_run(key, self.limits, engine)
        return (why, "refused") if why is not None else None

    def _open_stream(self, key: RunKey, on_event: Callable[[dict], None]) -> RunStream:
        """Ask the engine server to measure `key`; its events go to `on_event`."""
        return self.client.stream(self.session, [run_spec(key, self.engine)], on_event,
                                  max_run_s=self.limits.max_run_s)

    def submit(self) -> None:
        key = self.run_key(self.repeat)
        refused = self._why_not(key)
        if refused is not None:
            return self._refuse(*refused)
        self.notice.clear()
        self._generation += 1
        if self._stream is not None:
            self._stream.close()  # the server supersedes it anyway; this frees the connection
            self._stream = None
        cached = self.traces.get(key)
        if cached is not None:  # drawn over the last run at once: no "queued", no cleared plots
            self._finish(key, Outcome(trace=cached, cached=True))
            return
        self._cleared, self._pending = False, key
        self.run.param.update(status="queued", notice="", queue_position=0)
        self._stream = self._open_stream(key, partial(self._receive, self._generation, key))

    def _receive(self, generation: object, key: RunKey, event: dict) -> None:
        """On a client thread: keep the event for the next tick."""
        self._inbox.append((generation, key, event))

    def queue_background(self, key: RunKey, done: Callable[[RunKey, Outcome], None]) -> None:
        """Add `key` to the background runs `send_background` will ask for; `done(key, outcome)`
        runs on this session's loop (see lab/background.py)."""
        self._background_done[key] = done

    def send_background(self) -> None:
        """Ask the engine server for the queued background runs, on one stream, replacing the
        last set (what this session no longer shows is withdrawn)."""
        if self._background_stream is not None:
            self._background_stream.close()
            self._background_stream = None
        keys = list(self._background_done)
        if not keys:
            return
        engine = self.engine
        self._background_stream = self.client.stream(
            self.session, [run_spec(k, engine) for k in keys],
            lambda event: self._inbox.append(
                (BACKGROUND, keys[event["run"]] if event.get("run") is not None else None,
                 event)),
            background=True, max_run_s=self.limits.max_run_s)

    # -- each tick, on the session's loop ------------------------------------------------------
    def tick(self) -> None:
        """Apply what arrived since the last tick: one update of the run state.

        Streamed steps only extend sources, which Bokeh sends without recounting the document's
        models; a finished run, a cleared plot or a sweep result redraws panes, so that work
        runs under one recount (`recount_models_once`)."""
        steps: list[StepRecord] = []
        position = None
        finished = None
        background: list[tuple[RunKey, dict]] = []
        while self._inbox:
            generation, key, event = self._inbox.popleft()
            kind = event["event"]
            if generation == BACKGROUND:
                if kind in ("done", "error", "cancelled") and key is not None:
                    background.append((key, event))
            elif generation != self._generation:
                continue  # a run this session has moved on from
            elif kind == "queued":
                position = event["position"]
            elif kind == "step":
                steps.append(StepRecord.from_json(event["step"]))
            else:
                outcome = Outcome.from_event(event)
                if not outcome.cancelled:  # else superseded by the server: the newer run answers
                    finished = (key, outcome)
        clear = bool(steps or position) and not self._cleared
        if clear or finished is not None or background:
            with recount_models_once():
                self._apply(steps, position, finished, background, clear)
        elif steps or position:
            self._apply(steps, position, None, [], False)

    def _apply(self, steps, position, finished, background, clear) -> None:
        for key, event in background:
            self._background_event(key, event)
        if clear:
            self._clear_for_run(self._pending)
        if position:
            self.run.param.update(status="queued", queue_position=position)
        if steps:
            self.run.param.update(status="running", queue_position=0, new_steps=steps,
                                  steps_done=self.run.steps_done + len(steps))
        if finished is not None:
            self._finish(*finished)

    def _background_event(self, key: RunKey, event: dict) -> None:
        outcome = Outcome.from_event(event)
        if outcome.trace is not None:
            self.traces.put(key, outcome.trace)
        done = self._background_done.pop(key, None)
        if done is not None:
            done(key, outcome)

    def _clear_for_run(self, key: RunKey) -> None:
        self._cleared = True
        self.run.param.update(steps_done=0, info=self._run_info(key))
        self.run.param.trigger("cleared")

    def _run_info(self, key: RunKey) -> RunInfo:
        engine = self.engine
        cfg = preset(key.model)
        block_bytes = cfg.kv_bytes_per_token(engine.bytes_per_elem) * key.page
        capacity = kv_capacity_bytes(key, cfg, engine.bytes_per_elem)  # what the server is sent
        return RunInfo(block_size=key.page, num_blocks=capacity // block_bytes,
                       kv_bytes_capacity=capacity, block_bytes=block_bytes,
                       device=engine.device, model=key.model)

    # -- results -------------------------------------------------------------------------------
    def _finish(self, key: RunKey, outcome: Outcome) -> None:
        self._stream = None
        if outcome.error is not None:
            self._refuse(outcome.error, "failed")
            if self.trace is not None:
                self._draw(self.trace)
            return
        self.traces.put(key, outcome.trace)
        self.trace = outcome.trace
        workload_changed = (self.shown_key is None or
                            self.shown_key.replace(policy="continuous", repeat=0)
                            != key.replace(policy="continuous", repeat=0))
        self.shown_key = key
        if workload_changed:
            self.policy.reset()
        self._draw(outcome.trace)
        # Last: a page (or a test) that sees "done" finds every number of the run already drawn.
        self.run.param.update(status="done", queue_position=0)
        self.sweeps.start(key)

    def _draw(self, trace: Trace) -> None:
        slo = self.state.slo()
        summary = summarize(trace, slo)
        self._label_run(trace, summary)
        self.run.param.update(trace=trace, slo=slo, summary=summary)
        self.sweeps.redraw()
        for listener in self.listeners:
            listener(trace, summary)

    def _label_run(self, trace: Trace, summary: Summary) -> None:
        """What the panels say beside the numbers: the banner's device, the queue's bounds."""
        engine = self.engine
        self.banner.update(trace.device, trace.model, engine.probe)
        key = self.shown_key
        if key is not None:
            self.queue.set_bounds(running_bounds(key, preset(key.model), engine.bytes_per_elem))

    def _on_slo(self, *_events) -> None:
        """The shown run again, under the SLOs as they are now."""
        if self.trace is not None:
            with recount_models_once():
                self._draw(self.trace)

    def close(self) -> None:
        """The session ended: stop the ticker and hang up, which withdraws this session's runs."""
        self.ticker.stop()
        for stream in (self._stream, self._background_stream):
            if stream is not None:
                stream.close()
