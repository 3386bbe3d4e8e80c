"""KV cache use and the queue of an external endpoint over a run, as its /metrics reported them.

The lab cannot see an external engine's steps or block tables; what it can read is the endpoint's
own gauges, scraped a few times a second during the run (`lab/endpoint_run.py`): the fraction of
KV cache in use, and the requests running and waiting. Both plots share the time axis, seconds
since the run's first request. Scrapes arrive live as plain dicts (`MetricsSample.to_json`); a
finished run's scrapes are in its trace (`trace.config["endpoint"]`). Where the endpoint has no
readable /metrics, each plot says so and draws nothing.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d, Range1d
from bokeh.plotting import figure

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.base import PlotComponent
from widgets.style import (DECODE, MET, PREFILL, add_hover, empty, fmt_num, make_figure,
                           plot_pane)

COLUMNS = ("t", "kv_pct", "running", "waiting")
NAN = float("nan")


def sample_columns(samples: list[dict]) -> dict[str, list]:
    """One row per scrape; a series the endpoint does not export is NaN (a gap, not a zero)."""
    def value(s: dict, name: str, scale: float = 1.0) -> float:
        v = s.get(name)
        return NAN if v is None else v * scale
    return {"t": [s["t_s"] for s in samples],
            "kv_pct": [value(s, "kv_usage", 100.0) for s in samples],
            "running": [value(s, "running") for s in samples],
            "waiting": [value(s, "waiting") for s in samples]}


def endpoint_facts(trace: Trace) -> dict:
    """The endpoint part of a trace measured by the lab's endpoint client ({} for others)."""
    return trace.config.get("endpoint", {}) if isinstance(trace.config, dict) else {}


def _block_size(samples: list[dict]) -> int | None:
    return next((s["block_size"] for s in samples if s.get("block_size")), None)


def _peak(values: list[float]) -> tuple[int, float] | None:
    found = [(i, v) for i, v in enumerate(values) if v == v]
    return max(found, key=lambda p: p[1]) if found else None


class _SampledPlot(PlotComponent):
    """Draws an endpoint's scrapes, live and from a finished trace."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ColumnDataSource(data=empty(COLUMNS))
        self.unavailable: str | None = None
        self.block_size: int | None = None  # from vllm:cache_config_info, when exported

    def reset(self) -> None:
        self.source.data = empty(COLUMNS)
        super().reset()

    def add_samples(self, samples: list[dict]) -> None:
        """Append scrapes that arrived during a run."""
        if samples:
            self.source.stream(sample_columns(samples))
            self.unavailable = None
            self.block_size = self.block_size or _block_size(samples)
            self.text = self._describe()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        facts = endpoint_facts(trace)
        self.unavailable = facts.get("metrics_error")
        self.source.data = sample_columns(facts.get("samples", []))
        self.block_size = _block_size(facts.get("samples", []))
        self.text = self._describe()

    def _body(self) -> list[pn.viewable.Viewable]:
        self.fig = self._figure()
        return [plot_pane(self.fig)]

    def _figure(self) -> figure:
        """The subclass's figure over `self.source`, built when the plot is first shown."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _missing(self, what: str) -> str:
        return (f"This endpoint's /metrics is missing or unreadable ({self.unavailable}), so "
                f"there is no {what} to draw. The latency numbers are measured on the client "
                "and do not need it.")


class EndpointKVPlot(_SampledPlot):
    """The endpoint's KV cache use (%) over the run."""

    plot_id = "kv_memory"
    heading = "KV cache use over time (the endpoint's /metrics)"

    def _figure(self) -> figure:
        fig = make_figure("KV cache in use", "seconds into the run", "% of KV cache",
                          x_range=DataRange1d(range_padding=0.02), y_range=Range1d(0, 100))
        line = fig.line("t", "kv_pct", source=self.source, color=MET, line_width=2)
        fig.scatter("t", "kv_pct", source=self.source, color=MET, size=4)
        add_hover(fig, [line], [("time", "@t{0.00} s"), ("KV cache in use", "@kv_pct{0.0} %")])
        return fig

    def _describe(self) -> str:
        if self.unavailable:
            return self._missing("KV cache use")
        d = self.source.data
        peak = _peak(d["kv_pct"])
        if peak is None:
            return ("The endpoint's /metrics has no KV cache gauge (vllm:kv_cache_usage_perc or "
                    "sglang:token_usage).")
        i, pct = peak
        pages = (f" It stores KV in blocks of {self.block_size} tokens "
                 "(vllm:cache_config_info)." if self.block_size else "")
        return (f"**Peak KV cache use {fmt_num(pct)} %** at {fmt_num(d['t'][i])} s, over "
                f"{len(d['t'])} scrapes of the endpoint's /metrics.{pages} The endpoint reports "
                "a fraction of its cache, not bytes: how many bytes that is depends on its "
                "model, GPUs and memory settings, which the lab cannot see.")


class EndpointQueuePlot(_SampledPlot):
    """The endpoint's running and waiting requests over the run."""

    plot_id = "queue"
    heading = "Running and waiting over time (the endpoint's /metrics)"

    def _figure(self) -> figure:
        fig = make_figure("Running and waiting requests", "seconds into the run", "requests",
                          x_range=DataRange1d(range_padding=0.02),
                          y_range=DataRange1d(start=0, range_padding=0.15))
        run = fig.step("t", "running", source=self.source, mode="after", color=DECODE,
                       line_width=2, legend_label="running")
        fig.step("t", "waiting", source=self.source, mode="after", color=PREFILL,
                 line_width=2, line_dash="dotdash", legend_label="waiting")
        add_hover(fig, [run], [("time", "@t{0.00} s"), ("running", "@running"),
                               ("waiting", "@waiting")])
        fig.legend.location = "top_right"
        return fig

    def _describe(self) -> str:
        if self.unavailable:
            return self._missing("queue")
        d = self.source.data
        running, waiting = _peak(d["running"]), _peak(d["waiting"])
        if running is None and waiting is None:
            return "The endpoint's /metrics has no running or waiting gauges."
        parts = [f"**peak running {fmt_num(running[1])}**" if running else "",
                 f"peak waiting {fmt_num(waiting[1])}" if waiting else ""]
        return ("Sampled from the endpoint's /metrics: " + ", ".join(p for p in parts if p) +
                f" over {len(d['t'])} scrapes. The lab's batch slider caps how many of its "
                "requests are in flight at once; the endpoint's own scheduler decides how many "
                "of those run together, and counts other clients' requests too.")
