"""Running and waiting sequences per engine step, against what memory and the batch cap allow.

The two step lines show the scheduler's queue as the run went: sequences holding KV pages (running)
and requests that have arrived but hold none (waiting, for a batch slot or for memory). Dashed lines
mark the bounds the controller computes from the formula floor(KV blocks / blocks per sequence), at
full length and on the prompt alone, and the batch cap; crosses mark steps that evicted a sequence.
The text puts the measured peak beside those bounds and says why they may differ.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d, Span

from engine.analytic import RunningBounds
from engine.config import SLO
from engine.metrics import Summary
from engine.records import StepRecord, Trace
from widgets.base import PlotComponent
from widgets.style import (DECODE, MISSED, NEUTRAL, PREFILL, TARGET, RunInfo, add_hover, empty,
                           legend_below, make_figure, plot_pane)

COLUMNS = ("step", "running", "waiting")
EVICT_COLUMNS = ("step", "running", "evicted")


class QueuePlot(PlotComponent):
    """Running and waiting per step, the memory bounds, and the evictions."""

    plot_id = "queue"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ColumnDataSource(data=empty(COLUMNS))
        self.evictions = ColumnDataSource(data=empty(EVICT_COLUMNS))
        self.bounds: RunningBounds | None = None
        self.cap_span = Span(dimension="width", line_color=NEUTRAL, line_dash="dotted",
                             line_width=2, visible=False)
        self.full_span = Span(dimension="width", line_color=TARGET, line_dash="dashed",
                              line_width=2, visible=False)
        self.prompt_span = Span(dimension="width", line_color=TARGET, line_dash="dotted",
                                line_width=1, visible=False)

    def _body(self) -> list[pn.viewable.Viewable]:
        self.fig = make_figure("Running and waiting sequences", "engine step", "sequences",
                               height=260, x_range=DataRange1d(range_padding=0.02),
                               y_range=DataRange1d(start=0, range_padding=0.15))
        run = self.fig.step("step", "running", source=self.source, mode="after", color=DECODE,
                            line_width=2, legend_label="running")
        self.fig.step("step", "waiting", source=self.source, mode="after", color=PREFILL,
                      line_width=2, line_dash="dotdash", legend_label="waiting")
        self.fig.scatter("step", "running", source=self.evictions, marker="x", size=11,
                         color=MISSED, line_width=2, legend_label="eviction")
        for span in (self.cap_span, self.full_span, self.prompt_span):
            self.fig.add_layout(span)
        add_hover(self.fig, [run], [("step", "@step"), ("running", "@running"),
                                    ("waiting", "@waiting")])
        legend_below(self.fig, ncols=3)
        return [plot_pane(self.fig)]

    def reset(self) -> None:
        """Clear for a new run."""
        self.source.data = empty(COLUMNS)
        self.evictions.data = empty(EVICT_COLUMNS)
        super().reset()

    def set_bounds(self, bounds: RunningBounds | None) -> None:
        """The limits of the run about to be drawn (dashed lines and the text's comparison)."""
        self.bounds = bounds
        for span, value in ((self.cap_span, bounds and bounds.batch_cap),
                            (self.full_span, bounds and bounds.at_full_length),
                            (self.prompt_span, bounds and bounds.on_prompt)):
            # A memory bound far above the cap would only squash the lines that matter.
            span.visible = value is not None and value <= 2 * bounds.batch_cap
            if value is not None:
                span.location = value

    def add_steps(self, steps: list[StepRecord], trace_info: RunInfo) -> None:
        """Append newly measured steps."""
        if steps:
            self.source.stream(_columns(steps))
            evicted = [s for s in steps if s.preempted]
            if evicted:
                self.evictions.stream(_evictions(evicted))
            self.text = self._describe()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw every step of a finished run, and compare its peak with the bounds."""
        self.source.data = _columns(trace.steps)
        self.evictions.data = _evictions([s for s in trace.steps if s.preempted])
        self.text = self._describe()

    def _describe(self) -> str:
        d = self.source.data
        evictions = sum(len(ids.split(", ")) for ids in self.evictions.data["evicted"] if ids)
        return describe(max(d["running"], default=0), max(d["waiting"], default=0), evictions,
                        self.bounds)


def _columns(steps: list[StepRecord]) -> dict[str, list]:
    return {"step": [s.index for s in steps], "running": [s.running for s in steps],
            "waiting": [s.waiting for s in steps]}


def _evictions(steps: list[StepRecord]) -> dict[str, list]:
    return {"step": [s.index for s in steps], "running": [s.running for s in steps],
            "evicted": [", ".join(map(str, s.preempted)) for s in steps]}


def describe(peak: int, peak_waiting: int, evictions: int, bounds: RunningBounds | None) -> str:
    """The text equivalent: peaks, evictions, and the measured peak beside the formula's bound."""
    text = (f"**Peak running {peak}**, peak waiting {peak_waiting}, "
            f"{evictions} eviction{'s' if evictions != 1 else ''}.")
    if bounds is None:
        return text
    full, prompt = bounds.at_full_length, bounds.on_prompt
    cap = bounds.batch_cap
    text += (f" Memory bound: floor({bounds.num_blocks} KV blocks / {bounds.blocks_full:.3g} "
             f"blocks per sequence) = **{full}** sequences at full length"
             + (f", above the cap of {cap} (batch size, or the number of requests), which "
                "binds first." if full >= cap else "."))
    if full >= cap:
        verdict = ("agrees with the cap" if peak == cap else
                   "is below it: fewer requests were ever in the system at once")
        return text + f" The measured peak of {peak} {verdict}."
    if peak == full:
        return text + f" The measured peak of {peak} agrees with it."
    if peak > full:
        return text + (
            f" The measured peak of {peak} is higher: the scheduler admits a request once its "
            f"prompt's pages are free (on prompts alone floor(blocks / prompt blocks) = {prompt}), "
            "so early on more run than fit at full length, and the newest are evicted as the "
            "others grow. With mixed lengths both bounds are averages: short requests let more in.")
    return text + (f" The measured peak of {peak} is lower: requests arrived too slowly, or too "
                   "few, to fill the memory.")
