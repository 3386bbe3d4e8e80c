"""Measured TPOT against batch size, over the device's roofline floor, with this run highlighted.

The points come from a background sweep that fills in while the learner reads; the dashed floor is
`decode_tpot_floor_s` from the device's measured bandwidth. The gap between the two is overhead; the
slope is what each extra sequence in the batch costs per output token.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, FixedTicker

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.base import PlotComponent
from widgets.style import (MET, MISSED, TARGET, add_hover, empty, fmt_ms, fmt_num, legend_below,
                           make_figure)

COLUMNS = ("batch", "tpot_ms")
TITLE = "TPOT vs batch size"


class TPOTBatchPlot(PlotComponent):
    """TPOT per batch size from a sweep, the roofline floor, and the current batch."""

    plot_id = "tpot_batch"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.measured = ColumnDataSource(data=empty(COLUMNS))
        self.floor = ColumnDataSource(data=empty(COLUMNS))
        self.current = ColumnDataSource(data=empty(COLUMNS))
        self._points: list[tuple[int, float]] = []
        self._floor: list[tuple[int, float]] = []
        self._current_batch: int | None = None
        self._pending = False
        self._run_tpot_ms: float | None = None  # this run's TPOT p50, once it has finished
        self.fig = make_figure(TITLE, "batch size (sequences decoding together)", "TPOT (ms)",
                               height=280)
        self.fig.y_range.start = 0
        self._batch_ticks = FixedTicker(ticks=[])  # one model for good; see _redraw
        self.fig.xaxis.ticker = self._batch_ticks
        self.fig.line("batch", "tpot_ms", source=self.floor, color=TARGET, line_dash="dashed",
                      line_width=2, legend_label="roofline floor (measured bandwidth)")
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
        legend_below(self.fig, ncols=3)

    def _body(self) -> pn.pane.Bokeh:
        return pn.pane.Bokeh(self.fig, sizing_mode="stretch_width")

    def reset(self) -> None:
        """Clear for a new run (the sweep starts over too)."""
        for source in (self.measured, self.floor, self.current):
            source.data = empty(COLUMNS)
        self._points, self._floor, self._current_batch, self._pending = [], [], None, False
        self._run_tpot_ms = None
        self.fig.title.text = TITLE
        super().reset()

    def show_sweep(self, points: list[tuple[int, float]], floor_ms: list[tuple[int, float]],
                   current_batch: int, pending: bool) -> None:
        """Draw the sweep so far: measured (batch, TPOT ms), floor (batch, ms), current batch."""
        self._points, self._floor = sorted(points), sorted(floor_ms)
        self._current_batch, self._pending = current_batch, pending
        self.measured.data = _columns(self._points)
        self.floor.data = _columns(self._floor)
        self._redraw()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Highlight this run's median TPOT at its batch size."""
        if self._current_batch is None:
            self._current_batch = int(trace.config.get("max_num_seqs", 1))
        self._run_tpot_ms = summary.tpot_ms.p50
        self._redraw()

    def _redraw(self) -> None:
        """Highlighted point, ticks, title and text after any change."""
        here = [p for p in self._points if p[0] == self._current_batch]
        if self._run_tpot_ms is not None:  # this run's own median beats the sweep's point
            here = [(self._current_batch, self._run_tpot_ms)]
        self.current.data = _columns(here)
        batches = sorted({b for b, _ in self._points + self._floor}
                         | set(self.current.data["batch"]))
        # Changing the one ticker's ticks (and only when they differ) sends a property; a new
        # FixedTicker per redraw was about 40% of a cached slider move's server time.
        if batches and self._batch_ticks.ticks != batches:
            self._batch_ticks.ticks = batches
        self.fig.title.text = TITLE + (" (sweep still running…)" if self._pending else "")
        self.text = self._describe()

    def _describe(self) -> str:
        """The text equivalent: every measured point, its floor, and the current batch."""
        floor = dict(self._floor)
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
        if self._pending:
            text += " The sweep is still filling in."
        return text


def _columns(points: list[tuple[int, float]]) -> dict[str, list]:
    """(batch, ms) pairs as source columns."""
    return {"batch": [b for b, _ in points], "tpot_ms": [t for _, t in points]}
