"""Static against continuous batching on the identical request list, measured side by side.

A table (rows: goodput, TTFT p90, TPOT p90, throughput, duration; columns `Static` and `Continuous`)
and, one above the other on a shared time axis, each policy's running sequences per step against the
batch cap: the gap between the line and the cap is idle batch slots. Static batching's gaps open as
its batch drains and stay open until the last member finishes; continuous batching refills them at
the next step.
"""
from __future__ import annotations

import html
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d, Range1d, Span

from engine.config import SLO
from engine.metrics import Summary, summarize
from engine.records import Trace
from widgets.base import TextedView
from widgets.style import (DECODE, NEUTRAL, PREFILL, WAITING, add_hover, empty, fmt_num,
                           make_figure, plot_pane)
from widgets.summary_table import CSS as SUMMARY_CSS

CSS = SUMMARY_CSS.replace("summary-table", "policy-table")  # the run summary's look

POLICIES = ("static", "continuous")
LABELS = {"static": "Static", "continuous": "Continuous"}
ROWS = ("Goodput (req/s)", "TTFT p90 (ms)", "TPOT p90 (ms)", "Throughput (tok/s)", "Duration (s)")
COLUMNS = ("t", "mid", "width", "running", "idle")


def row_values(summary: Summary) -> dict[str, float]:
    """The table's numbers for one policy's run."""
    return {"Goodput (req/s)": summary.goodput_rps, "TTFT p90 (ms)": summary.ttft_ms.p90,
            "TPOT p90 (ms)": summary.tpot_ms.p90, "Throughput (tok/s)": summary.throughput_tok_s,
            "Duration (s)": summary.duration_s}


def occupancy(trace: Trace) -> dict[str, list]:
    """Per step: its start, middle and length in time, the sequences it ran, and the batch slots
    it left empty."""
    cap = int(trace.config.get("max_num_seqs", 1))
    run = [len(s.scheduled) for s in trace.steps]
    return {"t": [s.t_start for s in trace.steps],
            "mid": [(s.t_start + s.t_end) / 2 for s in trace.steps],
            "width": [s.t_end - s.t_start for s in trace.steps], "running": run,
            "idle": [max(0, cap - r) for r in run]}


class PolicyComparison(TextedView):
    """The same requests under both policies: a table and two stacked step timelines."""

    plot_id = "policy"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.traces: dict[str, Trace] = {}
        self.values: dict[str, dict[str, float]] = {}
        self.pending = ""  # the policy still being measured, if any
        self.same_steps = False  # the workload fits one batch: the other policy is not measured
        self.table = pn.pane.HTML(self._render(), stylesheets=[CSS], name="policy-table",
                                  sizing_mode="stretch_width")
        self.sources = {p: ColumnDataSource(data=empty(COLUMNS)) for p in POLICIES}
        self.caps = {p: Span(dimension="width", location=1, line_color=NEUTRAL, line_dash="dashed",
                             line_width=2, visible=False) for p in POLICIES}
        self._y_range = Range1d(0, 1)  # shared by both figures; each shown run may raise it
        self.figs: dict = {}

    def _build(self) -> list[pn.viewable.Viewable]:
        shared_x = DataRange1d(start=0, range_padding=0.02)
        for policy in POLICIES:
            fig = make_figure(f"{LABELS[policy]} batching: sequences in each step", "time (s)",
                              "sequences", height=190, x_range=shared_x, y_range=self._y_range)
            colour = PREFILL if policy == "static" else DECODE
            # One bar per step, as wide as the step took: gaps between bars are time the engine
            # waited for arrivals, the band above a bar up to the cap is idle batch slots.
            bars = fig.vbar(x="mid", width="width", top="running", source=self.sources[policy],
                            fill_color=colour, fill_alpha=0.55, line_color=colour)
            fig.add_layout(self.caps[policy])
            add_hover(fig, [bars], [("t", "@t{0.000} s"), ("running", "@running"),
                                    ("idle slots", "@idle")])
            self.figs[policy] = fig
        return [self.table, *(plot_pane(self.figs[p]) for p in POLICIES), self.text_pane]

    def reset(self) -> None:
        """Forget both runs (a new workload)."""
        self.traces, self.values, self.pending = {}, {}, ""
        for source in self.sources.values():
            source.data = empty(COLUMNS)
        self._refresh()

    def show(self, policy: str, trace: Trace, slo: SLO, pending: str = "") -> None:
        """Add (or replace) one policy's run; `pending` names a policy still being measured."""
        self.traces[policy] = trace
        self.pending = pending
        self.sources[policy].data = occupancy(trace)
        cap = int(trace.config.get("max_num_seqs", 1))
        self.caps[policy].update(location=cap, visible=True)
        self._y_range.end = max(self._y_range.end, cap + 1)
        self.rejudge(slo)

    def rejudge(self, slo: SLO) -> None:
        """Recount both runs under new SLOs (goodput depends on them)."""
        self.values = {p: row_values(summarize(t, slo)) for p, t in self.traces.items()}
        self._refresh()

    def value(self, row: str, policy: str) -> float | None:
        return self.values.get(policy, {}).get(row)

    def _refresh(self) -> None:
        self.table.object = self._render()
        self.text = self._describe()

    def _render(self) -> str:
        def cell(row: str, policy: str) -> str:
            v = self.value(row, policy)
            if v is not None:
                return fmt_num(v)
            return "measuring…" if policy == self.pending else "—"
        head = "".join(f'<th scope="col">{LABELS[p]}</th>' for p in POLICIES)
        rows = "".join(f'<tr><th scope="row">{html.escape(r)}</th>'
                       + "".join(f"<td>{cell(r, p)}</td>" for p in POLICIES) + "</tr>"
                       for r in ROWS)
        return (f'<table class="policy-table"><caption>The same requests, both policies'
                f'</caption><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>')

    def _describe(self) -> str:
        if not self.values:
            return WAITING
        if len(self.values) < 2 and self.same_steps:
            return ("Every request arrives at once and fits one batch, so static and continuous "
                    "batching schedule the very same steps; the other policy is not measured. "
                    "Send more requests than the batch size, or spread them with a rate.")
        if len(self.values) < 2:
            return ("Measuring the other policy on the same requests; its column fills in when "
                    "the engine is free.")
        s, c = self.values["static"], self.values["continuous"]
        idle = {p: sum(occupancy(t)["idle"]) for p, t in self.traces.items()}
        text = (f"**Continuous batching** served the same requests in {fmt_num(c['Duration (s)'])} s "
                f"against {fmt_num(s['Duration (s)'])} s static: goodput "
                f"{fmt_num(c['Goodput (req/s)'])} against {fmt_num(s['Goodput (req/s)'])} req/s, "
                f"TTFT p90 {fmt_num(c['TTFT p90 (ms)'])} against {fmt_num(s['TTFT p90 (ms)'])} ms, "
                f"TPOT p90 {fmt_num(c['TPOT p90 (ms)'])} against {fmt_num(s['TPOT p90 (ms)'])} ms. "
                f"Idle batch slots summed over steps: {idle['continuous']} continuous, "
                f"{idle['static']} static.")
        return text
