"""TTFT and TPOT per request against the two SLO targets, coloured by whether both were met.

Two small figures share the request axis: TTFT above (prefill plus queueing), TPOT below (decode).
A dashed line marks each target; the y ranges always reach the target so that headroom is visible.
A one-token request has no TPOT: it is left off the lower figure and out of the TPOT percentiles (as
vLLM's `bench serve` does), and it counts as meeting the TPOT target.
Rejected requests have no latency to draw; they count as misses in the title and the text.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, Range1d, Span, Title
from bokeh.transform import factor_cmap, factor_mark

from engine.config import SLO
from engine.metrics import Summary, meets, tpot_s, ttft_s
from engine.records import Trace
from widgets.base import PlotComponent
from widgets.style import (MET, MISSED, TARGET, add_hover, empty, fmt_ms, fmt_num, make_figure,
                           plot_pane)

STATUSES = ["met both SLOs", "missed an SLO"]
NAN = float("nan")  # a one-token request's TPOT: Bokeh draws no mark for it
COLUMNS = ("request", "ttft_ms", "tpot_ms", "status", "tokens")
TOOLTIPS = [("request", "@request"), ("TTFT", "@ttft_ms{0.000} ms"),
            ("TPOT", "@tpot_ms{0.000} ms"), ("output tokens", "@tokens"), ("", "@status")]


class LatencyPlot(PlotComponent):
    """Per-request TTFT and TPOT with SLO lines, goodput and attainment."""

    plot_id = "latency"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ColumnDataSource(data=empty(COLUMNS))
        # The models each run changes, made once; the figures hold them.
        self.ttft_title = Title(text="TTFT per request")
        self.tpot_title = Title(text="TPOT per request")
        self.x_range = Range1d(-0.5, 0.5)
        self.ttft_range, self.tpot_range = Range1d(0, 1), Range1d(0, 1)
        self.ttft_span = Span(dimension="width", line_color=TARGET, line_dash="dashed",
                              line_width=2, visible=False)
        self.tpot_span = Span(dimension="width", line_color=TARGET, line_dash="dashed",
                              line_width=2, visible=False)

    def _body(self) -> list[pn.viewable.Viewable]:
        self.ttft_fig = make_figure(self.ttft_title, "", "TTFT (ms)", y_range=self.ttft_range,
                                    x_range=self.x_range)
        self.tpot_fig = make_figure(self.tpot_title, "request id", "TPOT (ms)",
                                    y_range=self.tpot_range, x_range=self.x_range)
        for fig, column, span in ((self.ttft_fig, "ttft_ms", self.ttft_span),
                                  (self.tpot_fig, "tpot_ms", self.tpot_span)):
            fig.add_layout(span)
            marks = fig.scatter(
                "request", column, source=self.source, size=10, line_width=2,
                legend_field="status",
                color=factor_cmap("status", [MET, MISSED], STATUSES),
                marker=factor_mark("status", ["circle", "x"], STATUSES))
            add_hover(fig, [marks], TOOLTIPS)
            fig.legend.location = "top_left"
            fig.legend.orientation = "horizontal"
            fig.legend.background_fill_alpha = 0.4
            fig.xaxis.ticker.desired_num_ticks = 10
        self.ttft_fig.xaxis.major_label_text_font_size = "0px"  # ids are read off the lower figure
        return [plot_pane(self.ttft_fig), plot_pane(self.tpot_fig)]

    def reset(self) -> None:
        """Clear for a new run."""
        self.source.data = empty(COLUMNS)
        self.ttft_span.visible = self.tpot_span.visible = False
        self.ttft_title.text = "TTFT per request"
        super().reset()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw every finished request's TTFT and TPOT, and the SLO lines."""
        done = [r for r in trace.requests if r.finished]
        data = {
            "request": [r.id for r in done],
            "ttft_ms": [ttft_s(r) * 1e3 for r in done],
            "tpot_ms": [tpot_s(r) * 1e3 if len(r.output_ids) > 1 else NAN for r in done],
            "status": [STATUSES[0] if meets(r, slo) else STATUSES[1] for r in done],
            "tokens": [len(r.output_ids) for r in done],
        }
        self.source.data = data
        ids = [r.id for r in trace.requests] or [0]
        self.x_range.update(start=min(ids) - 0.5, end=max(ids) + 0.5)
        for y_range, span, values, target in (
                (self.ttft_range, self.ttft_span, data["ttft_ms"], slo.ttft_ms),
                (self.tpot_range, self.tpot_span, data["tpot_ms"], slo.tpot_ms)):
            span.visible = target is not None
            if target is not None:
                span.location = target
            top = max([v for v in values if v == v] + [target or 0.0, 1e-3])  # NaN: no TPOT
            y_range.update(start=0, end=top * 1.3)  # room for the legend above the marks
        self.ttft_title.text = (
            f"TTFT per request · goodput {fmt_num(summary.goodput_rps)} req/s · "
            f"SLO attainment {fmt_num(summary.slo_attainment * 100)} %"
            + (f" · dashed: τ_TTFT = {fmt_ms(slo.ttft_ms)}" if slo.ttft_ms is not None else ""))
        self.tpot_title.text = "TPOT per request" + (
            f" · dashed: τ_TPOT = {fmt_ms(slo.tpot_ms)}" if slo.tpot_ms is not None else "")
        self.text = self._describe(trace, summary, slo, data["status"].count(STATUSES[0]),
                                   sum(n == 1 for n in data["tokens"]))

    @staticmethod
    def _describe(trace: Trace, summary: Summary, slo: SLO, good: int, one_token: int) -> str:
        """The text equivalent: how many met the SLOs, goodput, and the percentiles."""
        targets = ", ".join(f"{name} ≤ {fmt_ms(v)}" for name, v in
                            (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms)) if v is not None)
        lines = [
            f"**{good} of {len(trace.requests)} requests met both SLOs** "
            f"({targets or 'no targets set'}); goodput {fmt_num(summary.goodput_rps)} req/s, "
            f"SLO attainment {fmt_num(summary.slo_attainment * 100)} %.",
            f"TTFT p50 {fmt_ms(summary.ttft_ms.p50)}, p90 {fmt_ms(summary.ttft_ms.p90)}; "
            f"TPOT p50 {fmt_ms(summary.tpot_ms.p50)}, p90 {fmt_ms(summary.tpot_ms.p90)}.",
        ]
        if one_token:
            lines.append(f"{one_token} request(s) generated a single token and so have no TPOT: "
                         "they are left out of the TPOT percentiles and count as meeting the TPOT "
                         "target.")
        if summary.rejected:
            lines.append(f"{summary.rejected} request(s) were rejected and count as misses.")
        return " ".join(lines)
