"""The interactive demo: sliders -> LabState -> the shared engine service -> live measured plots.

Each session owns one `Demo`. A change of a run-shaping control is checked (`check_run`) and, if it
may run, submitted to the process's one engine service; steps stream back from the worker thread and
are handed to this session's event loop with `pn.state.execute` under the session's document, never
by touching Bokeh models from the worker. SLO changes only re-judge the last trace: no rerun.
"""
from __future__ import annotations

import threading
import time
import uuid
from functools import partial

import panel as pn
from panel.io.state import set_curdoc

from engine import analytic
from engine.llm_engine import describe_device
from engine.metrics import summarize
from engine.records import StepRecord, Trace
from lab.background import REPEATS, BackgroundRuns
from lab.runs import (Limits, ModelShelf, RunKey, bytes_per_elem, check_run, execute,
                      kv_capacity_bytes, running_bounds)
from lab.service import EngineService, Outcome
from lab.state import LabState
from widgets.device_banner import DeviceBanner
from widgets.goodput_rate_plot import GoodputRatePlot
from widgets.kv_memory_plot import KVMemoryPlot
from widgets.latency_plot import LatencyPlot
from widgets.notice import Notice
from widgets.page_map import PageMap
from widgets.policy_compare import PolicyComparison
from widgets.queue_plot import QueuePlot
from widgets.style import RunInfo
from widgets.summary_table import SummaryTable
from widgets.timeline_plot import TimelinePlot
from widgets.tpot_batch_plot import TPOTBatchPlot

QUEUE_REFRESH_MS = 500  # how often a waiting learner's place in line is refreshed


def frozen(doc, fn, *args) -> None:
    """fn(*args), with the document's model graph counted once at the end, not once per change.

    Bokeh answers every change that carries models (a pane's stylesheets, which Panel re-sends
    on a pane's first update; new children) by walking the whole document, about 860 models, to
    recount them. A finished run touches a dozen panes, and those walks were about a third of the
    server's CPU for a session's first run.
    Bokeh's own `freeze()` always walks once at the end; here the walk happens only if some change
    asked for it. Every change is still sent as it happens.
    """
    models = doc.models
    if "invalidate" in vars(models):  # already deferred by an outer call
        fn(*args)
        return
    asked: list[bool] = []
    models.invalidate = lambda: asked.append(True)  # this document's manager, this call only
    try:
        fn(*args)
    finally:
        # pop, not del: under `--num-threads` a pool thread and the loop may both have deferred
        # (each then recounts for what it was asked; a request after the pop recounts at once)
        vars(models).pop("invalidate", None)
        if asked:
            models.recompute()


class DemoController:
    """UI-free wiring between one session's state, the service and the plots."""

    def __init__(self, state: LabState, service: EngineService, shelf: ModelShelf,
                 limits: Limits) -> None:
        self.state = state
        self.service = service
        self.shelf = shelf
        self.limits = limits
        self.session = uuid.uuid4().hex
        self.banner = DeviceBanner()
        self.notice = Notice()
        self.link_notice = Notice()  # what a shared link's bad values were turned into
        self.gate = None  # the prediction gate, set by the demo's layout
        self.summary = SummaryTable()
        self.latency = LatencyPlot()
        self.timeline = TimelinePlot()
        self.kv_memory = KVMemoryPlot()
        self.page_map = PageMap()
        self.tpot_batch = TPOTBatchPlot()
        self.queue = QueuePlot()
        self.policy = PolicyComparison()
        self.goodput_rate = GoodputRatePlot()
        self.trace: Trace | None = None  # the last good run
        self.shown_key: RunKey | None = None
        self.repeat = 0  # which measurement of the current setting "Run again" asked for
        self.listeners: list = []  # called with (trace, summary) after each finished run
        self._doc = None
        self._lock = threading.Lock()
        self._pending_steps: list[StepRecord] = []
        self._flush_scheduled = False
        self._last_flush = 0.0  # time.monotonic() of the last live update
        self._run_id = 0  # bumped by each submission; steps of older runs are dropped
        self.sweeps = BackgroundRuns(self)
        self._queue_cb = None
        state.param.watch(self._on_controls, list(LabState.RUN_CONTROLS))
        state.param.watch(self._on_slo, ["ttft_slo", "tpot_slo"])

    # -- thread hop ----------------------------------------------------------------------------
    def bind_document(self, doc) -> None:
        """Remember the session's document so worker callbacks can be scheduled onto it."""
        self._doc = doc

    def _hop(self, fn, *args) -> None:
        """Run fn(*args) on this session's event loop (directly when there is no server)."""
        doc = self._doc
        if doc is None or getattr(doc, "session_context", None) is None:
            fn(*args)
            return
        with set_curdoc(doc):
            pn.state.execute(partial(frozen, doc, fn, *args), schedule=True)

    # -- submitting ----------------------------------------------------------------------------
    # Panel runs onload callbacks and param watchers on a thread pool under `--num-threads`;
    # submit() and _draw() change Bokeh models, which only the session's event loop may do.
    def start(self) -> None:
        self._hop(self.submit)

    def _on_controls(self, *_events) -> None:
        self.repeat = 0
        self._hop(self.submit)

    def run_again(self) -> None:
        """Measure the current setting once more (a new measurement, not the cached one)."""
        base = self.state.key()
        self.repeat = next(r for r in range(1, 10**6)
                           if self.service.cached(base.with_(repeat=r)) is None)
        self._hop(self.submit)

    def repeats(self, key: RunKey) -> list[Trace]:
        """Every cached measurement of `key`'s setting (any repeat index)."""
        found = []
        for r in range(10**6):
            trace = self.service.cached(key.with_(repeat=r))
            if trace is None and r >= REPEATS:
                break
            if trace is not None:
                found.append(trace)
        return found

    def submit(self) -> None:
        key = self.state.key(self.repeat)
        why = check_run(key, self.limits)
        if why is not None:
            self.state.param.update(status="refused", notice=why)
            self.notice.show(why + " The plots keep the last measured run.")
            return
        self.notice.clear()
        with self._lock:
            self._pending_steps.clear()
            self._run_id += 1
            run_id = self._run_id
        # A cached setting is answered at once and drawn over the last run in one pass
        # (`_finish`): no "queued" state and no cleared plots, which on a busy server were half
        # of a move's updates.
        hit = self.service.cached(key) is not None
        if not hit:
            self._clear_for_run()
        if self.service.submit(self.session, key, partial(self._run, key),
                               on_done=lambda o: self._hop(self._finish, key, o),
                               on_step=partial(self._step_from_worker, run_id)):
            self.state.notice = ""
            return
        if hit:  # dropped from the cache in between; its steps and result are hopped, so later
            self._clear_for_run()
        self._watch_queue()

    def _clear_for_run(self) -> None:
        self.state.param.update(status="queued", notice="", steps_done=0)
        for plot in (self.latency, self.timeline, self.kv_memory, self.page_map, self.queue):
            plot.reset()
        self.summary.reset()

    def _run(self, key: RunKey, on_step, cancel) -> Trace:
        return execute(key, self.shelf, on_step, cancel, max_run_s=self.limits.max_run_s)

    def queue_background(self, key: RunKey, done) -> None:
        """Ask the service for `key` as background work; `done(key, outcome)` runs on this
        session's loop (see lab/background.py)."""
        self.service.submit(self.session, key, partial(self._run, key),
                            on_done=lambda o: self._hop(done, key, o), background=True)

    def _step_from_worker(self, run_id: int, step: StepRecord) -> None:
        """On the worker thread: keep the step for the next live update, and schedule one. The
        first step after a quiet spell is shown at once; later ones wait out `limits.live_update_s`."""
        with self._lock:
            if run_id != self._run_id:
                return  # a run this session has moved on from, still finishing its step
            self._pending_steps.append(step)
            if self._flush_scheduled:
                return  # the scheduled flush will take this step too
            self._flush_scheduled = True
            wait_s = self._last_flush + self.limits.live_update_s - time.monotonic()
        if wait_s > 0:
            self._hop(self._flush_later, wait_s)
        else:
            self._hop(self._flush_steps)

    def _flush_later(self, wait_s: float) -> None:
        """On the session's loop: flush the pending steps after `wait_s` seconds."""
        doc = self._doc
        if doc is None or getattr(doc, "session_context", None) is None:
            self._flush_steps()  # no server (tests, notebooks): no loop to wait on
            return
        doc.add_timeout_callback(partial(frozen, doc, self._flush_steps), max(1, int(wait_s * 1e3)))

    def _flush_steps(self) -> None:
        with self._lock:
            steps, self._pending_steps = self._pending_steps, []
            self._flush_scheduled = False
            self._last_flush = time.monotonic()
        if not steps:
            return
        info = self._run_info()
        # A flush timed for a run that has since failed or been answered says nothing new.
        status = "running" if self.state.status in ("queued", "running") else self.state.status
        self.state.param.update(status=status, steps_done=self.state.steps_done + len(steps),
                                queue_position=0)
        for plot in (self.timeline, self.kv_memory, self.queue):
            plot.add_steps(steps, info)

    def _run_info(self) -> RunInfo:
        key = self.state.key()
        elem = bytes_per_elem(self.shelf.device)
        cfg = self.shelf.get(key.model).config
        block_bytes = cfg.kv_bytes_per_token(elem) * key.page
        capacity = kv_capacity_bytes(key, cfg, elem)  # the cache execute() gives the run
        return RunInfo(block_size=key.page, num_blocks=capacity // block_bytes,
                       kv_bytes_capacity=capacity, block_bytes=block_bytes,
                       device=describe_device(self.shelf.device), model=key.model)

    # -- results -------------------------------------------------------------------------------
    def _finish(self, key: RunKey, outcome: Outcome) -> None:
        self._stop_queue_watch()
        if outcome.cancelled:
            return  # a newer submission replaced this one; its own result will come
        if outcome.error is not None:
            with self._lock:  # its last steps would be drawn over the restored plots
                self._pending_steps.clear()
            self.state.param.update(status="failed", notice=outcome.error)
            self.notice.show(outcome.error + " The plots keep the last measured run.", "danger")
            if self.trace is not None:
                self._draw(self.trace)
            return
        self._flush_steps()
        self.trace = outcome.trace
        workload_changed = (self.shown_key is None or
                            self.shown_key.with_(policy="continuous", repeat=0)
                            != key.with_(policy="continuous", repeat=0))
        self.shown_key = key
        self.state.param.update(status="done")
        if workload_changed:
            self.policy.reset()
        self._draw(outcome.trace)
        self.sweeps.start(key)

    def _draw(self, trace: Trace) -> None:
        slo = self.state.slo()
        summary = summarize(trace, slo)
        probe = analytic.probe(self.shelf.device.type)
        self.banner.update(trace.device, trace.model, probe)
        key = self.shown_key
        if key is not None:
            cfg = self.shelf.get(key.model).config
            self.queue.set_bounds(running_bounds(key, cfg, bytes_per_elem(self.shelf.device)))
        for plot in (self.latency, self.timeline, self.kv_memory, self.page_map, self.queue):
            plot.show(trace, summary, slo)
        self.summary.show(trace, summary, slo)
        self.sweeps.redraw()
        for listener in self.listeners:
            listener(trace, summary)

    def _on_slo(self, *_events) -> None:
        self._hop(self._redraw)

    def _redraw(self) -> None:
        """The shown run again, under the SLOs as they are now."""
        if self.trace is not None:
            self._draw(self.trace)

    # -- queue position ------------------------------------------------------------------------
    # Bokeh's own periodic callback on the session's document, not Panel's wrapper: these run on
    # the loop already (submit is hopped there), and Panel's PeriodicCallback.start, called from a
    # scheduled callback, kept rescheduling itself on every tick when it judged the document
    # blocked; with a dozen sessions that spin took the server's whole event loop.
    def _watch_queue(self) -> None:
        self._update_queue()
        if self._doc is not None and self._queue_cb is None and self.state.status == "queued":
            self._queue_cb = self._doc.add_periodic_callback(self._update_queue, QUEUE_REFRESH_MS)

    def _update_queue(self) -> None:
        position = self.service.queue_position(self.session)
        if self.state.status == "queued":
            self.state.queue_position = position
        else:
            self._stop_queue_watch()

    def _stop_queue_watch(self) -> None:
        callback, self._queue_cb = self._queue_cb, None
        if callback is not None and self._doc is not None:
            try:
                self._doc.remove_periodic_callback(callback)
            except ValueError:  # the session already dropped its callbacks
                pass

    def close(self) -> None:
        """The session ended: stop callbacks and tell the service nobody here listens."""
        self._stop_queue_watch()
        self.service.forget(self.session)
