"""KV-cache memory per step: measured on this model, and the formula's cost on a reference model.

Left (measured, this model): bytes allocated by the block manager, bytes that hold tokens (the gap
is paging waste), what a contiguous allocator would reserve, and the capacity. The contiguous
baseline reserves the model's maximum length (`max_model_len`, by default the model's position
limit) for every running request, as the pre-paging systems the PagedAttention paper measured did.
These span orders of magnitude, so the axis is logarithmic; steps with nothing cached are gaps.
Right (formula, reference 80-layer model): M_KV = 2*B*L*T*H_kv*d_head*s for the step's B running
sequences holding T tokens each on average (B*T = the tokens stored), with 80 layers, 8 KV heads,
d_head 128 and fp16, i.e. what those tokens would cost on a 70B-class model.
"""
from __future__ import annotations

from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, DataRange1d

from engine.analytic import kv_bytes, kv_gb
from engine.config import SLO
from engine.metrics import Summary
from engine.records import StepRecord, Trace
from widgets.base import PlotComponent
from widgets.style import (MET, NEUTRAL, PREFILL, TARGET, RunInfo, add_hover, bytes_ticks, empty,
                           fmt_bytes, fmt_num, legend_below, make_figure, plot_pane)

REFERENCE = {"layers": 80, "h_kv": 8, "d_head": 128, "bytes_per_elem": 2}  # a 70B-class model
NAN = float("nan")
COLUMNS = ("step", "tokens", "seqs", "T", "used", "stored", "contiguous", "capacity",
           "reference", "reference_gb")
MEASURED_TIPS = [("step", "@step"), ("tokens stored", "@tokens"),
                 ("allocated", "@used{0.000a}B"), ("holding tokens", "@stored{0.000a}B"),
                 ("contiguous baseline (model max length each)", "@contiguous{0.000a}B"),
                 ("capacity", "@capacity{0.000a}B")]
REFERENCE_TIPS = [("step", "@step"), ("B, running sequences", "@seqs"),
                  ("T, mean tokens per sequence", "@T{0.0}"), ("B·T, tokens stored", "@tokens"),
                  ("formula, 80-layer model", "@reference_gb{0.0000} GB")]


def _positive(x: float) -> float:
    """Log axes cannot draw zero: an empty cache becomes a gap."""
    return x if x > 0 else NAN


def kv_columns(steps: list[StepRecord], info: RunInfo) -> dict[str, list]:
    """One row per step: measured bytes (this model) and the formula's bytes (reference model)."""
    ref = [kv_gb(T=s.tokens_stored, batch=1, **REFERENCE) for s in steps]
    return {
        "step": [s.index for s in steps],
        "tokens": [s.tokens_stored for s in steps],
        "seqs": [s.running for s in steps],
        "T": [s.tokens_stored / s.running if s.running else 0.0 for s in steps],
        "used": [_positive(s.kv_bytes_used) for s in steps],
        "stored": [_positive(s.tokens_stored * info.bytes_per_token) for s in steps],
        "contiguous": [_positive(s.contiguous_bytes) for s in steps],
        "capacity": [info.kv_bytes_capacity] * len(steps),
        "reference": [g * 1e9 for g in ref],
        "reference_gb": ref,
    }


def reserved_len(data: dict[str, list], info: RunInfo) -> int | None:
    """Tokens the contiguous baseline reserves per running request, read back from a step's
    reservation (running requests x max length x bytes per token); None if no step had one."""
    for seqs, reserved in zip(data["seqs"], data["contiguous"]):
        if seqs and reserved == reserved:  # NaN: nothing reserved
            return round(reserved / (seqs * info.bytes_per_token))
    return None


class KVMemoryPlot(PlotComponent):
    """Measured KV bytes against capacity and the contiguous baseline, beside the formula."""

    plot_id = "kv_memory"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.source = ColumnDataSource(data=empty(COLUMNS))
        self._info: RunInfo | None = None

    def _body(self) -> list[pn.viewable.Viewable]:
        self.measured_fig = make_figure("Measured (this model)", "engine step",
                                        "KV memory (log scale)", y_axis_type="log",
                                        x_range=DataRange1d(range_padding=0.02), height=300)
        self.measured_fig.yaxis.formatter = bytes_ticks()
        lines = []
        for column, label, color, dash in (
                ("capacity", "capacity", TARGET, "dashed"),
                ("contiguous", "contiguous (max length each)", NEUTRAL,
                 "dotdash"),
                ("used", "allocated (paged)", MET, "solid"),
                ("stored", "holding tokens", PREFILL, "solid")):
            lines.append(self.measured_fig.line("step", column, source=self.source, color=color,
                                                line_dash=dash, line_width=2, legend_label=label))
        legend_below(self.measured_fig, ncols=2)
        add_hover(self.measured_fig, [lines[2]], MEASURED_TIPS)

        self.reference_fig = make_figure("Formula (reference 80-layer model)", "engine step",
                                         "KV memory, same tokens", height=300,
                                         x_range=self.measured_fig.x_range,
                                         y_range=DataRange1d(start=0))
        self.reference_fig.yaxis.formatter = bytes_ticks()
        ref = self.reference_fig.varea("step", y1=0, y2="reference", source=self.source,
                                       color=MET, alpha=0.25)
        ref_line = self.reference_fig.line(
            "step", "reference", source=self.source, color=MET, line_width=2,
            # B and T are the run's (the text spells them out); the rest is the reference model's
            legend_label="M_KV = 2·B·L·T·H_kv·d_head·s, L=80, H_kv=8, d_head=128, s=2")
        self.reference_fig.y_range.renderers = [ref, ref_line]
        legend_below(self.reference_fig, ncols=1)
        add_hover(self.reference_fig, [ref_line], REFERENCE_TIPS)
        return [pn.Row(plot_pane(self.measured_fig), plot_pane(self.reference_fig),
                       sizing_mode="stretch_width")]

    def reset(self) -> None:
        """Clear for a new run."""
        self.source.data = empty(COLUMNS)
        self._info = None
        super().reset()

    def add_steps(self, steps: list[StepRecord], trace_info: RunInfo) -> None:
        """Append newly measured steps to both figures."""
        self._info = trace_info
        if steps:
            self.source.stream(kv_columns(steps, trace_info))
            self.text = self._describe()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw every step of a finished run."""
        self._info = RunInfo.from_trace(trace)
        self.source.data = kv_columns(trace.steps, self._info)
        self.text = self._describe()

    def _describe(self) -> str:
        """The text equivalent, at the step that allocated the most KV memory."""
        d, info = self.source.data, self._info
        if not d["step"] or info is None:
            return "The run produced no engine steps."
        used = [0.0 if u != u else u for u in d["used"]]  # NaN back to zero
        peak = max(range(len(used)), key=used.__getitem__)
        tokens = d["tokens"][peak]
        stored = tokens * info.bytes_per_token
        contiguous = max(0.0 if c != c else c for c in d["contiguous"])
        text = (f"**Measured (this model, {info.model}):** at its peak (step {d['step'][peak]}) "
                f"the cache allocated {fmt_bytes(used[peak])} of "
                f"{fmt_bytes(info.kv_bytes_capacity)} "
                f"({fmt_num(100 * used[peak] / info.kv_bytes_capacity)} % of capacity) for "
                f"{tokens} tokens, which fill {fmt_bytes(stored)}; the rest, "
                f"{fmt_bytes(used[peak] - stored)}, is empty slots in last pages. ")
        max_len = reserved_len(d, info)
        if contiguous and used[peak] and max_len:
            text += (f"A contiguous allocator that reserves the model's maximum length, {max_len} "
                     "tokens, for every running request (as the pre-paging servers in the "
                     "PagedAttention paper did) would have taken up to "
                     f"{fmt_bytes(contiguous)}, {fmt_num(contiguous / used[peak])}× the paged "
                     "peak. ")
        ref = kv_bytes(T=tokens, batch=1, **REFERENCE)
        B, T = d["seqs"][peak], d["T"][peak]
        return text + (f"**Formula, reference 80-layer model** (8 KV heads, d_head 128, fp16): "
                       f"the same B = {B} sequences of T = {fmt_num(T)} tokens on average "
                       f"(B·T = {tokens} tokens) would need {fmt_bytes(ref)} "
                       f"({fmt_num(ref / 1e9)} GB).")
