"""Measured TPOT against batch size, over the device's whole roofline, with the current batch marked.

The points come from a background sweep that fills in while the learner reads: at each batch size,
that many requests of the current context and output, all at once. Two dashed floors bound a decode
step from below: memory, (weights + KV read) / measured bandwidth, nearly flat in the batch; and
compute, 2 x params x batch / measured FLOP/s, rising with it. The ridge is the batch where they
cross: below it an extra sequence is almost free, above it every sequence costs its arithmetic.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, FixedTicker, Range1d, Span, Title

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.base import PlotComponent
from widgets.style import (MET, MISSED, NEUTRAL, TARGET, add_hover, empty, fmt_ms, fmt_num,
                           legend_below, make_figure, plot_pane)

COLUMNS = ("batch", "tpot_ms")
FLOOR_COLUMNS = ("batch", "memory_ms", "compute_ms", "floor_ms")
TITLE = "TPOT vs batch size"


class TPOTBatchPlot(PlotComponent):
    """TPOT per batch size from a sweep, the roofline floor, and the current batch."""

    plot_id = "tpot_batch"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.measured = ColumnDataSource(data=empty(COLUMNS))
        self.floor = ColumnDataSource(data=empty(FLOOR_COLUMNS))
        self.current = ColumnDataSource(data=empty(COLUMNS))
        self._points: list[tuple[int, float]] = []
        self._floor: list[tuple[int, float, float]] = []  # (batch, memory ms, compute ms)
        self._current_batch: int | None = None
        self._pending = False
        self._ridge: float | None = None
        # The models each redraw changes, made once (see _redraw); the figure holds them.
        self.title = Title(text=TITLE)
        self._batch_ticks = FixedTicker(ticks=[])
        self.ridge_span = Span(dimension="height", location=1, line_color=NEUTRAL,
                               line_dash="dotted", line_width=2, visible=False, name="ridge")

    def _body(self) -> list[pn.viewable.Viewable]:
        # A log axis needs a positive range before any data: BokehJS cannot auto-range an empty one.
        self.fig = make_figure(self.title, "batch size (sequences decoding together, log scale)",
                               "TPOT (ms)", height=300, x_axis_type="log",
                               x_range=Range1d(0.8, 80))
        self.fig.y_range.start = 0
        self.fig.xaxis.ticker = self._batch_ticks
        self.fig.line("batch", "memory_ms", source=self.floor, color=TARGET, line_dash="dashed",
                      line_width=2, legend_label="memory floor (measured bandwidth)",
                      name="memory-floor")
        self.fig.line("batch", "compute_ms", source=self.floor, color=NEUTRAL, line_dash="dashed",
                      line_width=2, legend_label="compute floor (measured FLOP/s)",
                      name="compute-floor")
        self.fig.add_layout(self.ridge_span)
        self.fig.line("batch", "tpot_ms", source=self.measured, color=MET, line_width=2,
                      legend_label="measured TPOT")
        dots = self.fig.scatter("batch", "tpot_ms", source=self.measured, color=MET, size=7,
                                legend_label="measured TPOT")
        here = self.fig.scatter("batch", "tpot_ms", source=self.current, marker="diamond",
                                color=MISSED, size=16, line_color=MISSED,
                                legend_label="current batch")
        add_hover(self.fig, [dots], [("batch", "@batch"), ("TPOT", "@tpot_ms{0.000} ms")])
        add_hover(self.fig, [here], [("current batch", "@batch"),
                                     ("TPOT", "@tpot_ms{0.000} ms")])
        legend_below(self.fig, ncols=2)
        return [plot_pane(self.fig)]

    def reset(self) -> None:
        """Clear for a new run (the sweep starts over too)."""
        for source in (self.measured, self.current):
            source.data = empty(COLUMNS)
        self.floor.data = empty(FLOOR_COLUMNS)
        self._points, self._floor, self._current_batch, self._pending = [], [], None, False
        self._ridge = None
        self.ridge_span.visible = False
        self.title.text = TITLE
        super().reset()

    def show_sweep(self, points: list[tuple[int, float]],
                   floors: list[tuple[int, float, float]], current_batch: int, pending: bool,
                   ridge: float | None = None) -> None:
        """Draw the sweep so far: measured (batch, TPOT ms), floors (batch, memory ms, compute
        ms), the current batch, and the ridge batch where the floors cross (None: off the axis)."""
        self._points, self._floor = sorted(points), sorted(floors)
        self._current_batch, self._pending, self._ridge = current_batch, pending, ridge
        self.measured.data = _columns(self._points)
        self.floor.data = {"batch": [b for b, _, _ in self._floor],
                           "memory_ms": [m for _, m, _ in self._floor],
                           "compute_ms": [c for _, _, c in self._floor],
                           "floor_ms": [max(m, c) for _, m, c in self._floor]}
        self.ridge_span.visible = ridge is not None
        if ridge is not None:
            self.ridge_span.location = ridge
        self._redraw()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Mark the run's batch; the highlighted point is the sweep's own (same workload)."""
        if self._current_batch is None:
            self._current_batch = int(trace.config.get("max_num_seqs", 1))
        self._redraw()

    def _redraw(self) -> None:
        """Highlighted point, ticks, title and text after any change."""
        self.current.data = _columns([p for p in self._points if p[0] == self._current_batch])
        batches = sorted({b for b, _ in self._points} | {b for b, _, _ in self._floor})
        # Changing the one ticker's ticks (and only when they differ) sends a property; a new
        # FixedTicker per redraw was about 40% of a cached slider move's server time.
        if batches and self._batch_ticks.ticks != batches:
            self._batch_ticks.ticks = batches
        self.title.text = TITLE + (" (sweep still running…)" if self._pending else "")
        self.text = self._describe()

    def _describe(self) -> str:
        """The text equivalent: every measured point, its floor, and the current batch."""
        floor = {b: max(m, c) for b, m, c in self._floor}
        if not self._points and not self.current.data["batch"]:
            return "The batch-size sweep has not started yet."
        parts = []
        for b, t in self._points:
            f = floor.get(b)
            parts.append(f"batch {b}: {fmt_ms(t)}" +
                         (f" (floor {fmt_ms(f)}, {fmt_num(t / f)}×)" if f else ""))
        text = ("**Measured TPOT** — " + "; ".join(parts) + "." if parts
                else "No sweep point measured yet.")
        if self.current.data["batch"]:
            b, t = self.current.data["batch"][0], self.current.data["tpot_ms"][0]
            text += f" Current batch {b}: TPOT {fmt_ms(t)}"
            text += f", {fmt_num(t / floor[b])}× its floor of {fmt_ms(floor[b])}." if floor.get(
                b) else "."
        if self._ridge is not None:
            text += (f" The floors cross at a batch of about {fmt_num(self._ridge)}: below it "
                     "the weights' bytes set the floor, above it the arithmetic does.")
        if self._pending:
            text += " The sweep is still filling in."
        return text


def _columns(points: list[tuple[int, float]]) -> dict[str, list]:
    """(batch, ms) pairs as source columns."""
    return {"batch": [b for b, _ in points], "tpot_ms": [t for _, t in points]}
