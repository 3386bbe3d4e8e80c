"""The run's headline numbers as a semantic HTML table: one labelled row per metric.

The five core rows are always present, labelled exactly as browser tests and the page's prose
expect; before any run their values read "—". While a new run is under way the previous numbers
stay visible, greyed and marked "updating…", so the page never jumps to empty.
"""
from __future__ import annotations

import html
from typing import Any

import panel as pn
import param

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.run_state import RunState
from widgets.style import WAITING, fmt_num

CORE_ROWS = ("TTFT p50 (ms)", "TPOT p50 (ms)", "KV GB (measured)", "Waste tokens (measured)",
             "Goodput (req/s)")
EXTRA_ROWS = ("TTFT p90 (ms)", "TPOT p90 (ms)", "SLO attainment (%)", "Throughput (tok/s)",
              "Peak running", "Peak waiting", "Preemptions", "Duration (s)")
DASH = "—"
CSS = """
table.summary-table {border-collapse: collapse; font-size: 14px; min-width: 260px;}
table.summary-table th, table.summary-table td {padding: 3px 10px;
  border-bottom: 1px solid color-mix(in srgb, currentColor 20%, transparent);}
table.summary-table th[scope=row] {text-align: left; font-weight: normal;}
table.summary-table td {text-align: right; font-variant-numeric: tabular-nums;}
table.summary-table tr.extra {opacity: 0.8;}
table.summary-table.stale td {opacity: 0.45;}
table.summary-table caption {text-align: left; font-weight: bold; padding-bottom: 4px;}
"""


def summary_values(summary: Summary) -> dict[str, str]:
    """Every row's formatted value, keyed by its label. TPOT rows read "—" when no request
    generated more than one token: such a run has no TPOT to report."""
    def tpot(ms: float) -> str:
        return fmt_num(ms) if summary.tpot_requests else DASH

    return {
        "TTFT p50 (ms)": fmt_num(summary.ttft_ms.p50),
        "TPOT p50 (ms)": tpot(summary.tpot_ms.p50),
        "KV GB (measured)": fmt_num(summary.kv_bytes_peak / 1e9),
        "Waste tokens (measured)": fmt_num(summary.waste_tokens_peak),
        "Goodput (req/s)": fmt_num(summary.goodput_rps),
        "TTFT p90 (ms)": fmt_num(summary.ttft_ms.p90),
        "TPOT p90 (ms)": tpot(summary.tpot_ms.p90),
        "SLO attainment (%)": fmt_num(summary.slo_attainment * 100),
        "Throughput (tok/s)": fmt_num(summary.throughput_tok_s),
        "Peak running": fmt_num(summary.peak_running),
        "Peak waiting": fmt_num(summary.peak_waiting),
        "Preemptions": fmt_num(summary.preemptions),
        "Duration (s)": fmt_num(summary.duration_s),
    }


class SummaryTable(pn.viewable.Viewer):
    """Headline metrics of the latest run, label -> value."""

    plot_id = "summary"

    values = param.Dict(default={}, doc="Formatted value per row label; empty before any run.")
    stale = param.Boolean(default=False, doc="A run is under way; the values are the last run's.")
    text = param.String(default=WAITING, doc="The table's rows as one plain sentence.")
    overrides = param.Dict(default={}, doc="Values that replace a row's (an engine behind the "
                                           "page that does not expose it), or add rows")
    run = param.ClassSelector(class_=RunState, default=None,
                              doc="The session's run this table follows (None: filled by hand)")

    def __init__(self, **params: Any) -> None:
        params.setdefault("name", self.plot_id)
        super().__init__(**params)
        self.html = pn.pane.HTML(self._render(), css_classes=["summary-table"],
                                 stylesheets=[CSS], name="summary-table",
                                 sizing_mode="stretch_width")

    def __panel__(self) -> pn.pane.HTML:
        return self.html

    @param.depends("values", "stale", watch=True)
    def _refresh(self) -> None:
        self.html.object = self._render()

    def value(self, label: str) -> str:
        """The displayed value of one row ("—" before any run)."""
        return self.values.get(label, DASH)

    @param.depends("run.cleared", watch=True)
    def _follow_new_run(self) -> None:
        self.reset()

    @param.depends("run.summary", watch=True)
    def _follow_result(self) -> None:
        if self.run.summary is not None and self.run.trace is not None:
            self.show(self.run.trace, self.run.summary, self.run.slo)

    def reset(self) -> None:
        """Keep the last numbers, greyed, while a new run is under way."""
        self.stale = bool(self.values)

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Fill every row from a finished run."""
        values = {**summary_values(summary), **self.overrides}
        self.param.update(stale=False, values=values)  # one redraw of the table, not two
        self.text = "; ".join(f"{k} {v}" for k, v in values.items()) + "."

    def _render(self) -> str:
        """The table's HTML: a row header and a value cell per metric."""
        rows = [
            f'<tr class="{"core" if label in CORE_ROWS else "extra"}">'
            f'<th scope="row">{html.escape(label)}</th><td>{html.escape(self.value(label))}</td>'
            "</tr>"
            for label in CORE_ROWS + (EXTRA_ROWS if self.values else ()) + tuple(
                k for k in self.values if k not in CORE_ROWS + EXTRA_ROWS)]
        caption = "Measured this run" + (" (updating…)" if self.stale else "")
        return (f'<table class="summary-table{" stale" if self.stale else ""}" '
                f'aria-busy="{str(self.stale).lower()}"><caption>{caption}</caption>'
                f"<tbody>{''.join(rows)}</tbody></table>")
