"""Shared look and numbers for the widgets: palette, figure factory, formatting and `RunInfo`.

Every plot is made by `make_figure`, so sizing, tools and theming stay alike: no background colour
is set anywhere, which lets Panel's light or dark theme colour the canvas. The palette is Okabe-Ito
(bokeh's `Colorblind`) without its black, which would vanish on a dark page.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import panel as pn
from bokeh.models import CustomJSTickFormatter, GlyphRenderer, HoverTool, Title
from bokeh.palettes import Colorblind8
from bokeh.plotting import figure

from engine.records import Trace

# Categorical colours, colour-blind safe and visible on light and dark canvases.
PALETTE: tuple[str, ...] = tuple(c for c in Colorblind8 if c != "#000000")
MET = "#0072B2"  # blue: a request that met every SLO
MISSED = "#D55E00"  # vermillion: a request that missed one
PREFILL = "#E69F00"  # orange: steps (or tokens) that carried prompt work
DECODE = "#56B4E9"  # sky blue: decode-only steps
TARGET = "#CC79A7"  # reddish purple: targets, floors and limits
NEUTRAL = "#888888"  # mid grey reads on white and on near-black alike

WAITING = "Waiting for a run…"
PLOT_HEIGHT = 230  # px; small multiples stacked two high still fit one screen

# Tick labels in bytes that pick MB or GB from the largest tick on the axis (decimal units).
_BYTES_TICKS_JS = """
    const top = Math.max(...ticks.map(Math.abs));
    const [div, unit] = top >= 1e9 ? [1e9, ' GB'] : [1e6, ' MB'];
    const v = tick / div;
    return v === 0 ? '0' : parseFloat(v.toPrecision(3)).toString() + unit;
"""


@dataclass(frozen=True)
class RunInfo:
    """What the step plots need to know about a run before its trace is complete."""

    block_size: int  # tokens per KV page (P)
    num_blocks: int  # pages in the cache
    kv_bytes_capacity: int  # bytes the whole KV cache holds
    block_bytes: int  # KV bytes of one page across all layers (K and V)
    device: str  # e.g. "CPU: 2 threads" or a GPU's name
    model: str  # preset name or checkpoint path

    @property
    def bytes_per_token(self) -> float:
        """KV bytes one cached token costs on this model."""
        return self.block_bytes / self.block_size

    @classmethod
    def from_trace(cls, trace: Trace) -> "RunInfo":
        """The run facts a finished trace carries."""
        return cls(block_size=trace.block_size, num_blocks=trace.num_blocks,
                   kv_bytes_capacity=trace.kv_bytes_capacity, block_bytes=trace.block_bytes,
                   device=trace.device, model=trace.model)


def make_figure(title: str | Title, x_label: str, y_label: str, height: int = PLOT_HEIGHT,
                **kwargs: Any) -> figure:
    """A themed-by-Panel figure that stretches to its column's width, with no tools of its own:
    `add_hover` gives it the one a reader uses, tooltips with the exact numbers. Zoom to a box
    and reset cost five models a figure (the zoom box is a full annotation), about 8 % of what a
    page's build and send cost the page process (tools/page_cost.py), for plots that fit their
    card as drawn; a toolbar holding only the hover tool is not shown."""
    p = figure(title=title, height=height, sizing_mode="stretch_width", tools="",
               toolbar_location=None, min_border_left=50, **kwargs)
    p.xaxis.axis_label = x_label
    p.yaxis.axis_label = y_label
    p.title.text_font_size = "13px"
    return p


def plot_pane(fig: figure, **params: Any) -> pn.pane.Bokeh:
    """A finished figure as a pane that stretches to its column's width.

    Each glyph method of a figure also makes a copy of its glyph for "not selected" and one for
    "muted"; nothing on this page selects or mutes, and Bokeh's browser side derives both
    itself when they are left "auto". Leaving them so takes two models per renderer (some
    fifty per page) off what every session builds and sends."""
    for renderer in fig.renderers:  # the figure's own list: no walk over its whole graph
        if isinstance(renderer, GlyphRenderer):
            renderer.update(nonselection_glyph="auto", muted_glyph="auto")
    return pn.pane.Bokeh(fig, sizing_mode="stretch_width", **params)


def legend_below(fig: figure, ncols: int) -> None:
    """Move a figure's legend under the plot area, where it hides no data."""
    legend = fig.legend[0]
    fig.center.remove(legend)
    legend.update(ncols=ncols, label_text_font_size="11px", border_line_alpha=0, padding=2,
                  spacing=8, margin=4, location="center")
    fig.add_layout(legend, "below")


def bytes_ticks() -> CustomJSTickFormatter:
    """A fresh tick formatter for an axis in bytes (a Bokeh model belongs to one document)."""
    return CustomJSTickFormatter(code=_BYTES_TICKS_JS)


def add_hover(p: figure, renderers: list, tooltips: list[tuple[str, str]]) -> HoverTool:
    """Hover tooltips on the given renderers only (lines and spans stay quiet)."""
    tool = HoverTool(renderers=renderers, tooltips=tooltips)
    p.add_tools(tool)
    return tool


def empty(columns: tuple[str, ...]) -> dict[str, list]:
    """Fresh, empty columns for a source (new lists each time: sources extend them in place)."""
    return {k: [] for k in columns}


def fmt_num(x: float | int, sig: int = 3) -> str:
    """A number with at least `sig` significant digits, in fixed notation down to 1e-4."""
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 10**sig):
        return str(int(x))
    if x == 0 or not math.isfinite(x):
        return f"{0:.{sig - 1}f}" if x == 0 else str(x)
    if abs(x) < 1e-4:
        return f"{x:.{sig - 1}e}"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def fmt_value(x: Any) -> str:
    """A control's value as the page shows it: numbers by `fmt_num`, option names as they are."""
    return fmt_num(x) if isinstance(x, (int, float)) else str(x)


def fmt_bytes(n: float) -> str:
    """Decimal megabytes below 1 GB, gigabytes from there, with three significant digits."""
    return f"{fmt_num(n / 1e9)} GB" if n >= 1e9 else f"{fmt_num(n / 1e6)} MB"


def fmt_ms(x: float) -> str:
    """Milliseconds with three significant digits and the unit."""
    return f"{fmt_num(x)} ms"
