"""The demo against an external OpenAI-compatible deployment (LAB_ENDPOINT) instead of the lab's
own engine server.

`EndpointDemoController` is the lab's `DemoController` with the engine server swapped for an
`EndpointRun` (lab/endpoint_run.py): the same controls, run state, cache, inbox and ticks; the same
latency plot and summary, from `RequestRecord`s timed on the client. What changes is what the page
can honestly show. The engine's own controls (KV memory, page size, prefill chunk, policy, model)
are the deployment's configuration, so they are fixed; panels drawn from engine internals (the
step timeline, the page map, the storyboard) and the sweeps say in one sentence why they are
empty; KV use and the queue come from the endpoint's /metrics, plotted against time.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from engine.metrics import Summary
from engine.records import Trace
from lab.demo import DemoController
from lab.endpoint_client import EndpointClient
from lab.endpoint_prompts import PromptMaker
from lab.endpoint_run import EndpointRun, shape
from lab.engine_client import TraceCache
from lab.prometheus_text import MetricsSample, interval_mean
from lab.runs import Limits, RunKey, malformed
from lab.state import LabState
from lab.ticker import Ticker, recount_models_once
from widgets.endpoint_metrics_plot import EndpointKVPlot, EndpointQueuePlot, endpoint_facts
from widgets.latency_plot import LatencyPlot
from widgets.style import fmt_num
from widgets.summary_table import SummaryTable
from widgets.unexposed import Unexposed

ENGINE_CONTROLS = ("kv_mb", "page", "chunk", "policy", "model")  # the deployment's own settings
NOT_EXPOSED = "not exposed"
UNEXPOSED = {
    "timeline": "An external engine does not expose its steps, so there is no step timeline: "
                "the latency plot is what the client measured.",
    "page_map": "An external engine does not expose its block tables, so there is no page map "
                "and no measured waste to draw.",
    "policy": "The batching policy is the deployment's own configuration, which the lab cannot "
              "switch on an external engine, so there is no comparison to draw.",
    "tpot_batch": "The lab does not sweep an external deployment, since each point would be "
                  "another run on it: move the batch slider to measure one batch size at a time.",
    "goodput_rate": "The lab does not sweep an external deployment, since each point would be "
                    "another run on it: move the rate slider to measure one rate at a time.",
}
STORYBOARD = ("An external engine does not expose its steps, so there is no run to replay step "
              "by step here; the lab's own engine shows one.")


def check_endpoint_run(key: RunKey, limits: Limits) -> str | None:
    """Why this run may not be sent to the endpoint (one sentence), or None. The arrivals must
    fit in LAB_MAX_RUN_S; the run itself is stopped at twice that, so one learner's tokens are
    bounded by the same limit as runs on the lab's own engine."""
    why = malformed(key)
    if why is not None:
        return why
    span = max(shape(key).arrivals_s)
    if span > limits.max_run_s:
        return (f"At {key.rate:g} requests/s the {key.requests} requests take {span:.0f} s just "
                f"to arrive, more than the {limits.max_run_s:.0f} s one learner may hold the "
                "shared endpoint. Raise the rate or lower the requests.")
    return None


class NoSweeps:
    """Stands in for `BackgroundRuns`: an external deployment is not swept in the background."""

    def start(self, key: RunKey) -> None:
        """Nothing is queued."""

    def redraw(self) -> None:
        """Nothing was drawn."""


class EndpointDemoController(DemoController):
    """One session's demo, measured against LAB_ENDPOINT."""

    status_text = (
        ("queued", "Waiting for the endpoint: {ahead} run(s) from this page server ahead of "
                   "yours."),
        ("running", "Measuring on the endpoint: {steps} requests finished so far."),
        ("done", "Measured on the endpoint. Move a slider to run again."))
    fixed_controls = ENGINE_CONTROLS
    storyboard_note = STORYBOARD

    def __init__(self, state: LabState, endpoint: EndpointClient, limits: Limits,
                 traces: TraceCache | None = None, ticker: Ticker | None = None,
                 prompts: PromptMaker | None = None) -> None:
        self.endpoint = endpoint
        self.prompts = prompts if prompts is not None else PromptMaker(endpoint.tokenize)
        super().__init__(state, None, limits, traces, ticker)
        self.sweeps = NoSweeps()
        self.banner.text = (f"**Measuring the endpoint {endpoint.config.address}** · its model "
                            "is named once the first run has asked it.")
        self._live: deque[tuple[int, dict]] = deque()  # progress and scrapes, drained each tick
        self.ticker.every(self._tick_live)

    def _make_plots(self) -> None:
        self.summary = SummaryTable(run=self.run)
        self.latency = LatencyPlot(run=self.run)
        self.kv_memory = EndpointKVPlot(run=self.run)
        self.queue = EndpointQueuePlot(run=self.run)
        self.timeline, self.page_map, self.policy, self.tpot_batch, self.goodput_rate = (
            Unexposed(plot_id, UNEXPOSED[plot_id]) for plot_id in
            ("timeline", "page_map", "policy", "tpot_batch", "goodput_rate"))

    @property
    def engine(self):
        raise RuntimeError("an endpoint demo has no engine server: nothing may ask for it")

    # -- the DemoController hooks --------------------------------------------------------------
    def run_key(self, repeat: int = 0) -> RunKey:
        """The controls' run, with the engine's own settings at their defaults: they do not
        change what the endpoint serves, so they do not split the cache."""
        return self.state.key(repeat).replace(
            **{name: LabState.param[name].default for name in ENGINE_CONTROLS})

    def _why_not(self, key: RunKey) -> tuple[str, str] | None:
        why = check_endpoint_run(key, self.limits)
        return (why, "refused") if why is not None else None

    def _open_stream(self, key: RunKey, on_event: Callable[[dict], None]) -> EndpointRun:
        generation = self._generation

        def route(event: dict) -> None:
            if event["event"] in ("progress", "sample"):
                self._live.append((generation, event))
            else:
                on_event(event)

        return EndpointRun(self.endpoint, self.prompts, key, self.limits.max_run_s,
                           route).start()

    def _run_info(self, key: RunKey) -> None:
        return None  # no engine steps stream from an endpoint

    def _label_run(self, trace: Trace, summary: Summary) -> None:
        facts = endpoint_facts(trace)
        self.banner.text = banner_text(trace, facts)
        self.summary.overrides = summary_rows(facts, summary)

    # -- live progress, on the session's loop --------------------------------------------------
    def _tick_live(self) -> None:
        samples, finished = [], None
        while self._live:
            generation, event = self._live.popleft()
            if generation != self._generation or self.run.status not in ("queued", "running"):
                continue
            if event["event"] == "sample":
                samples.append(event["sample"])
            else:
                finished = event["finished"]
        if not samples and finished is None:
            return
        with recount_models_once():
            if not self._cleared:
                self._clear_for_run(self._pending)
            self.kv_memory.add_samples(samples)
            self.queue.add_samples(samples)
            self.run.param.update(status="running",
                                  steps_done=finished if finished is not None
                                  else self.run.steps_done)


def banner_text(trace: Trace, facts: dict) -> str:
    """Which endpoint and model measured the numbers, and how the prompts were sized."""
    text = (f"**Measured on {trace.device}** · model **{trace.model}** (named by "
            f"{facts.get('model_from', 'its /v1/models')}) · timed on the lab's side of the "
            "network")
    if facts.get("prompt_tokens") == "counted":
        text += " · prompt lengths counted by the endpoint's /tokenize"
        if facts.get("prompt_miscount") is not None:
            text += f" (one prompt came out at {facts['prompt_miscount']} tokens)"
    else:
        text += (" · prompt lengths **approximated from text** (about one token per common "
                 "word): the endpoint offers no /tokenize")
    if not facts.get("ignore_eos"):
        text += " · it refused `ignore_eos`, so replies may stop before the output length"
    return text + "."


def summary_rows(facts: dict, summary: Summary) -> dict[str, str]:
    """Summary rows an endpoint changes: engine-internal rows it does not expose, the gauges it
    does (sampled from /metrics), and the client's means beside the endpoint's own."""
    samples = [MetricsSample.from_json(s) for s in facts.get("samples", [])]

    def peak(values: list) -> str:
        found = [v for v in values if v is not None]
        return f"{fmt_num(max(found))} (sampled)" if found else NOT_EXPOSED

    def server_ms(first, last) -> str:
        mean = interval_mean(first, last)
        return fmt_num(mean[0] * 1e3) if mean is not None else NOT_EXPOSED

    first, last = (samples[0], samples[-1]) if samples else (None, None)
    preempted = (last.preemptions - first.preemptions
                 if first is not None and first.preemptions is not None
                 and last.preemptions is not None else None)
    tpot = fmt_num(summary.tpot_ms.mean) if summary.tpot_requests else "—"
    return {
        "KV GB (measured)": NOT_EXPOSED, "Waste tokens (measured)": NOT_EXPOSED,
        "Peak running": peak([s.running for s in samples]),
        "Peak waiting": peak([s.waiting for s in samples]),
        "Preemptions": fmt_num(preempted) if preempted is not None else NOT_EXPOSED,
        "TTFT mean, client (ms)": fmt_num(summary.ttft_ms.mean),
        "TTFT mean, endpoint's /metrics (ms)": server_ms(first and first.ttft,
                                                         last and last.ttft),
        "TPOT mean, client (ms)": tpot,
        "ITL mean, endpoint's /metrics (ms)": server_ms(first and first.itl, last and last.itl),
    }
