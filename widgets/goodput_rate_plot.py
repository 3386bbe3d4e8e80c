"""Goodput and SLO attainment against arrival rate, from a background sweep, with the knee marked.

Each point is a measured run of the current workload at one Poisson arrival rate. Goodput (left
axis) rises with the rate while the engine keeps up, then flattens or falls as queues build and
requests miss their SLOs; attainment (right axis) is the share of requests that met every SLO. The
knee is DistServe's goodput: the highest measured rate at which attainment stays at or above 90%.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, LinearAxis, Range1d, Span, Title

from engine.config import SLO
from engine.metrics import Summary, summarize
from engine.records import Trace
from widgets.base import PlotComponent
from widgets.style import (MET, MISSED, TARGET, add_hover, empty, fmt_num, legend_below,
                           make_figure, plot_pane)

ATTAINMENT_TARGET = 0.9  # DistServe's SLO attainment goal for the knee
COLUMNS = ("rate", "goodput", "attainment", "throughput")
TITLE = "Goodput against arrival rate"


@dataclass(frozen=True)
class RatePoint:
    rate: float  # requests per second offered
    goodput: float  # requests per second that met every SLO
    attainment: float  # share of requests that met every SLO, 0-1
    throughput: float  # requests per second completed


def rate_points(traces: dict[float, Trace], slo: SLO) -> list[RatePoint]:
    """Every measured rate judged under `slo`, in rate order."""
    points = []
    for rate in sorted(traces):
        s: Summary = summarize(traces[rate], slo)
        points.append(RatePoint(rate, s.goodput_rps, s.slo_attainment, s.request_throughput_rps))
    return points


def knee(points: list[RatePoint]) -> RatePoint | None:
    """The highest rate whose attainment is at least 90% with every lower rate's too; None when
    even the lowest rate misses."""
    best = None
    for p in points:
        if p.attainment < ATTAINMENT_TARGET:
            break
        best = p
    return best


class GoodputRatePlot(PlotComponent):
    """Goodput and attainment per arrival rate, and the knee."""

    plot_id = "goodput_rate"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.traces: dict[float, Trace] = {}
        self.expected = 0  # rates the sweep will measure
        self.source = ColumnDataSource(data=empty(COLUMNS))
        # The models each redraw changes, made once; the figure holds them.
        self.title = Title(text=TITLE)
        # A log axis needs a positive range before any data: BokehJS cannot auto-range an empty one.
        self.x_range, self.y_range = Range1d(0.2, 80), Range1d(0, 1)
        self.knee_span = Span(dimension="height", location=1, line_color=TARGET, line_width=3,
                              line_alpha=0.7, visible=False, name="knee")

    def _body(self) -> list[pn.viewable.Viewable]:
        self.fig = make_figure(self.title, "arrival rate (requests/s, log scale)",
                               "goodput (req/s)", height=280, x_axis_type="log",
                               x_range=self.x_range, y_range=self.y_range)
        self.fig.extra_y_ranges = {"share": Range1d(0, 105)}
        self.fig.add_layout(LinearAxis(y_range_name="share", axis_label="SLO attainment (%)"),
                            "right")
        line = self.fig.line("rate", "goodput", source=self.source, color=MET, line_width=2,
                             legend_label="goodput", name="goodput")
        dots = self.fig.scatter("rate", "goodput", source=self.source, color=MET, size=7,
                                legend_label="goodput")
        self.fig.line("rate", "attainment", source=self.source, color=MISSED, line_width=2,
                      line_dash="dashed", y_range_name="share", legend_label="SLO attainment")
        self.fig.scatter("rate", "attainment", source=self.source, color=MISSED, size=6,
                         marker="square", y_range_name="share", legend_label="SLO attainment")
        self.fig.add_layout(Span(dimension="width", location=ATTAINMENT_TARGET * 100,
                                 y_range_name="share", line_color=MISSED, line_dash="dotted",
                                 line_alpha=0.6))
        self.fig.add_layout(self.knee_span)
        add_hover(self.fig, [dots, line], [("rate", "@rate{0.00} req/s"),
                                           ("goodput", "@goodput{0.00} req/s"),
                                           ("attainment", "@attainment{0} %"),
                                           ("completed", "@throughput{0.00} req/s")])
        legend_below(self.fig, ncols=2)
        return [plot_pane(self.fig)]

    def reset(self) -> None:
        """Forget the sweep (a new workload)."""
        self.traces, self.expected = {}, 0
        self.source.data = empty(COLUMNS)
        self.knee_span.visible = False
        self.title.text = TITLE
        super().reset()

    def show_sweep(self, traces: dict[float, Trace], expected: int, slo: SLO) -> None:
        """Draw the rates measured so far; `expected` is how many the sweep will have."""
        self.traces, self.expected = dict(traces), expected
        self.rejudge(slo)

    def rejudge(self, slo: SLO) -> None:
        """Recount every point under the current SLOs and redraw."""
        points = rate_points(self.traces, slo)
        self.source.data = {"rate": [p.rate for p in points],
                            "goodput": [p.goodput for p in points],
                            "attainment": [100 * p.attainment for p in points],
                            "throughput": [p.throughput for p in points]}
        if points:
            self.x_range.update(start=points[0].rate / 1.4, end=points[-1].rate * 1.4)
        top = max((max(p.goodput, p.throughput) for p in points), default=1.0)
        self.y_range.end = top * 1.15 or 1.0
        best = knee(points)
        self.knee_span.visible = best is not None
        if best is not None:
            self.knee_span.location = best.rate
        pending = len(points) < self.expected
        self.title.text = TITLE + (" (sweep still running…)" if pending else "")
        self.text = describe(points, best, pending)

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """A new main run changes only the SLO judgement of the sweep."""
        self.rejudge(slo)


def describe(points: list[RatePoint], best: RatePoint | None, pending: bool) -> str:
    """The text equivalent: every rate's goodput and attainment, and the knee."""
    if not points:
        return "The arrival-rate sweep has not measured a rate yet."
    parts = [f"{fmt_num(p.rate)} req/s: goodput {fmt_num(p.goodput)}, "
             f"{fmt_num(100 * p.attainment)}% within SLO" for p in points]
    text = "**Measured** — " + "; ".join(parts) + ". "
    if best is None:
        text += "Even the lowest rate kept fewer than 90% of requests within their SLOs: no knee."
    elif best is points[-1]:
        text += (f"Every measured rate kept at least 90% within SLO: the knee lies above "
                 f"{fmt_num(best.rate)} req/s.")
    else:
        text += (f"**Knee at {fmt_num(best.rate)} req/s**: the highest rate with at least 90% of "
                 "requests within their SLOs (DistServe's goodput).")
    if pending:
        text += " The sweep is still filling in."
    return text
