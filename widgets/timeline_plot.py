"""Each engine step's measured duration, with the prefill tokens and decodes it carried.

Above: step duration (ms) per step index, bars coloured by whether the step carried prompt tokens,
so prefill spikes stand out from the even decode floor. Below, on the same step axis: prefill tokens
(bars, left axis) and decode sequences (line, right axis). Steps stream in while the run goes on.
"""
from __future__ import annotations

import statistics
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d, LinearAxis
from bokeh.transform import factor_cmap

from engine.config import SLO
from engine.metrics import Summary
from engine.records import StepRecord, Trace
from widgets.base import PlotComponent
from widgets.style import (DECODE, PREFILL, RunInfo, add_hover, empty, fmt_ms, fmt_num,
                           make_figure, plot_pane)

KINDS = ["carried prefill", "decode only"]
COLUMNS = ("step", "start_s", "duration_ms", "prefill_tokens", "decode_seqs", "running",
           "waiting", "kind")
TOOLTIPS = [("step", "@step"), ("started", "@start_s{0.000} s"),
            ("duration", "@duration_ms{0.000} ms"), ("prefill tokens", "@prefill_tokens"),
            ("decode sequences", "@decode_seqs"), ("running / waiting", "@running / @waiting")]


def step_columns(steps: list[StepRecord]) -> dict[str, list]:
    """One row per step, in the source's columns."""
    return {
        "step": [s.index for s in steps],
        "start_s": [s.t_start for s in steps],
        "duration_ms": [s.duration_s * 1e3 for s in steps],
        "prefill_tokens": [s.prefill_tokens for s in steps],
        "decode_seqs": [s.decode_seqs for s in steps],
        "running": [s.running for s in steps],
        "waiting": [s.waiting for s in steps],
        "kind": [KINDS[0] if s.prefill_tokens else KINDS[1] for s in steps],
    }


class TimelinePlot(PlotComponent):
    """Step durations over the run, with each step's prefill and decode load."""

    plot_id = "timeline"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ColumnDataSource(data=empty(COLUMNS))

    def _body(self) -> list[pn.viewable.Viewable]:
        self.duration_fig = make_figure("Step duration", "", "step time (ms)",
                                        x_range=DataRange1d(range_padding=0.02),
                                        y_range=DataRange1d(start=0, range_padding=0.25))
        self.load_fig = make_figure("Work per step", "engine step", "prefill tokens",
                                    x_range=self.duration_fig.x_range, height=190)
        bars = self.duration_fig.vbar(
            "step", top="duration_ms", width=0.8, source=self.source, legend_field="kind",
            color=factor_cmap("kind", [PREFILL, DECODE], KINDS))
        self.duration_fig.legend.location = "top_right"
        self.duration_fig.legend.background_fill_alpha = 0.4
        add_hover(self.duration_fig, [bars], TOOLTIPS)

        tokens = self.load_fig.vbar("step", top="prefill_tokens", width=0.8, source=self.source,
                                    color=PREFILL, alpha=0.8, legend_label="prefill tokens")
        self.load_fig.extra_y_ranges = {"seqs": DataRange1d(start=0, range_padding=0.4)}
        self.load_fig.add_layout(LinearAxis(y_range_name="seqs", axis_label="decode sequences"),
                                 "right")
        seqs = self.load_fig.step("step", "decode_seqs", source=self.source, mode="center",
                                  color=DECODE, line_width=2, y_range_name="seqs",
                                  legend_label="decode sequences")
        self.load_fig.extra_y_ranges["seqs"].renderers = [seqs]
        self.load_fig.y_range = DataRange1d(start=0, range_padding=0.4, renderers=[tokens])
        self.load_fig.legend.location = "top_right"
        self.load_fig.legend.orientation = "horizontal"
        self.load_fig.legend.background_fill_alpha = 0.4
        add_hover(self.load_fig, [tokens], TOOLTIPS)
        return [plot_pane(self.duration_fig), plot_pane(self.load_fig)]

    def reset(self) -> None:
        """Clear for a new run."""
        self.source.data = empty(COLUMNS)
        super().reset()

    def add_steps(self, steps: list[StepRecord], trace_info: RunInfo) -> None:
        """Append newly measured steps to the bars."""
        if steps:
            self.source.stream(step_columns(steps))
            self.text = self._describe()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw every step of a finished run."""
        self.source.data = step_columns(trace.steps)
        self.text = self._describe()

    def _describe(self) -> str:
        """The text equivalent: step count, the largest step, and the decode floor."""
        d = self.source.data
        n = len(d["step"])
        if not n:
            return "The run produced no engine steps."
        big = max(range(n), key=d["duration_ms"].__getitem__)
        decode = [t for t, k in zip(d["duration_ms"], d["kind"]) if k == KINDS[1]]
        prefill_steps = n - len(decode)
        text = (f"**{n} engine steps**, {prefill_steps} of them carrying prompt tokens. "
                f"Largest step: #{d['step'][big]} took {fmt_ms(d['duration_ms'][big])} with "
                f"{d['prefill_tokens'][big]} prefill tokens and {d['decode_seqs'][big]} decodes. ")
        if decode:
            text += (f"Median decode-only step: {fmt_ms(statistics.median(decode))} "
                     f"over {len(decode)} steps")
            if d["prefill_tokens"][big]:
                ratio = d["duration_ms"][big] / statistics.median(decode)
                text += f"; the largest prefill step took {fmt_num(ratio)}× as long"
            return text + "."
        return text + "No decode-only step yet."
