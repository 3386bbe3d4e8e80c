"""The physical KV pages at peak use, coloured by owner, with each sequence's empty slots marked.

Blocks are laid out by physical id in rows of 32; only the blocks up to the highest one in use
(plus a few free ones, at most 1024 cells) are drawn. In each request's last block a hatched overlay
covers the share of slots that are reserved but empty. Beside the grid, a table sets the measured
waste (`PageSnapshot.waste`) against the formula's ceil(T/P)*P - T (`engine.analytic.waste_tokens`).
The snapshot is the first step of peak KV use, the step whose waste the summary reports as
`waste_tokens_peak`, so the grid, its table and the summary's "Waste tokens" row show one number.
"""
from __future__ import annotations

import math
from typing import Any

import panel as pn
from bokeh.models import ColumnDataSource, FixedTicker, Range1d

from engine.analytic import waste_tokens
from engine.config import SLO
from engine.metrics import Summary
from engine.records import PageSnapshot, Trace
from widgets.base import PlotComponent
from widgets.style import (NEUTRAL, PALETTE, add_hover, empty, fmt_num, make_figure,
                           plot_pane)

COLS = 32  # blocks per row
MAX_CELLS = 1024
FREE_SHOWN = 8  # free blocks drawn past the highest one in use, for contrast
TABLE_ROWS = 10  # requests listed by name before the rest are summed up
CELL_COLUMNS = ("x", "y", "block", "owner", "slots", "color", "alpha", "label")
WASTE_COLUMNS = ("x", "y", "width", "block", "owner", "empty")
TOOLTIPS = [("block", "@block"), ("request", "@owner"), ("slots used", "@slots")]
TABLE_CSS = """
table.page-table {border-collapse: collapse; font-size: 13px;}
table.page-table th, table.page-table td {padding: 2px 8px; text-align: right;
  border-bottom: 1px solid color-mix(in srgb, currentColor 20%, transparent);}
table.page-table th {white-space: nowrap;}
table.page-table th[scope=row] {text-align: left; font-weight: normal;}
table.page-table tfoot th, table.page-table tfoot td {font-weight: bold;}
.swatch {display: inline-block; width: 10px; height: 10px; margin-right: 6px;}
"""


def request_colours(snap: PageSnapshot) -> dict[int, str]:
    """One palette colour per live request, in id order (repeating past the palette's size)."""
    return {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(sorted(snap.tables))}


def page_grid(snap: PageSnapshot) -> tuple[dict[str, list], dict[str, list], int]:
    """Cells and waste overlays for the grid, and the number of cells drawn."""
    owner = {b: rid for rid, blocks in snap.tables.items() for b in blocks}
    highest = max(owner, default=-1)
    shown = min(snap.num_blocks, MAX_CELLS, math.ceil((highest + 1 + FREE_SHOWN) / COLS) * COLS)
    colour = request_colours(snap)
    filled: dict[int, int] = {}
    first = {blocks[0]: rid for rid, blocks in snap.tables.items() if blocks}  # labelled cells
    for rid, blocks in snap.tables.items():
        for i, b in enumerate(blocks):
            filled[b] = min(snap.block_size, snap.tokens[rid] - i * snap.block_size)
    cells = empty(CELL_COLUMNS)
    for b in range(shown):
        rid = owner.get(b)
        cells["x"].append(b % COLS + 0.5)
        cells["y"].append(b // COLS + 0.5)
        cells["block"].append(b)
        cells["owner"].append("free" if rid is None else str(rid))
        cells["slots"].append("—" if rid is None else f"{filled[b]}/{snap.block_size}")
        cells["color"].append(NEUTRAL if rid is None else colour[rid])
        cells["alpha"].append(0.15 if rid is None else 0.9)
        cells["label"].append(str(first[b]) if b in first else "")
    waste = empty(WASTE_COLUMNS)
    for rid, blocks in snap.tables.items():
        w, last = snap.waste(rid), blocks[-1] if blocks else shown
        if w <= 0 or last >= shown:
            continue
        width = 0.92 * w / snap.block_size  # the cell is 0.92 wide; empty slots fill its right end
        waste["x"].append(last % COLS + 0.96 - width / 2)
        waste["y"].append(last // COLS + 0.5)
        waste["width"].append(width)
        waste["block"].append(last)
        waste["owner"].append(str(rid))
        waste["empty"].append(f"{w}/{snap.block_size}")
    return cells, waste, shown


class PageMap(PlotComponent):
    """A grid of the KV cache's physical blocks at peak, and measured vs formula waste."""

    plot_id = "page_map"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.waste_measured: int | None = None  # sum of snapshot.waste over live requests
        self.waste_formula: int | None = None  # sum of ceil(T/P)*P - T over the same requests
        self.cells = ColumnDataSource(data=empty(CELL_COLUMNS))
        self.waste = ColumnDataSource(data=empty(WASTE_COLUMNS))
        # Made here, for the figure's whole life: each run changes a property of these (a new
        # Bokeh model per run costs every open page a model replacement) whether or not the
        # figure is built yet.
        self._rows = Range1d(1, 0)
        self._row_ticks = FixedTicker(ticks=[])
        self._row_labels: dict[float, str] = {}
        self._height = 160
        self.table = pn.pane.HTML("", css_classes=["page-table"], stylesheets=[TABLE_CSS],
                                  width=400, margin=(10, 10))

    def _body(self) -> list[pn.viewable.Viewable]:
        self.fig = make_figure("KV pages at peak use", "block id within row",
                               "first id in row", x_range=Range1d(0, COLS),
                               y_range=self._rows, height=self._height)
        self.fig.grid.visible = False
        self.fig.xaxis.ticker = FixedTicker(ticks=[i + 0.5 for i in range(0, COLS, 4)])
        self.fig.xaxis.major_label_overrides = {i + 0.5: str(i) for i in range(0, COLS, 4)}
        self.fig.yaxis.ticker = self._row_ticks
        self.fig.yaxis.major_label_overrides = self._row_labels
        cells = self.fig.rect("x", "y", width=0.92, height=0.85, source=self.cells,
                              fill_color="color", fill_alpha="alpha", line_color=None)
        marks = self.fig.rect("x", "y", width="width", height=0.85, source=self.waste,
                              fill_color="white", fill_alpha=0.45, line_color=None,
                              hatch_pattern="right_diagonal_line", hatch_color="black",
                              hatch_alpha=0.8, hatch_scale=6, hatch_weight=1.5)
        self.fig.text("x", "y", text="label", source=self.cells, text_font_size="10px",
                      text_align="center", text_baseline="middle", text_color="black")
        add_hover(self.fig, [cells], TOOLTIPS)
        add_hover(self.fig, [marks], [("block", "@block"), ("request", "@owner"),
                                      ("empty slots (waste)", "@empty")])
        return [pn.Row(plot_pane(self.fig), self.table, sizing_mode="stretch_width")]

    def reset(self) -> None:
        """Clear for a new run."""
        self.cells.data = empty(CELL_COLUMNS)
        self.waste.data = empty(WASTE_COLUMNS)
        self.table.object = ""
        self.waste_measured = self.waste_formula = None
        super().reset()

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw the block tables at the step of peak KV use."""
        snap = trace.peak_snapshot
        if snap is None or not snap.tables:
            self.cells.data = empty(CELL_COLUMNS)
            self.waste.data = empty(WASTE_COLUMNS)
            self.table.object = ""
            self.text = "No KV pages were in use during this run."
            return
        cells, waste, shown = page_grid(snap)
        rows = shown // COLS
        self._rows.update(start=rows, end=0)
        ticks = [r + 0.5 for r in range(rows)]
        if self._row_ticks.ticks != ticks:  # unchanged rows send nothing to the browser
            self._row_ticks.ticks = ticks
            self._row_labels = {r + 0.5: str(r * COLS) for r in range(rows)}
        self._height = min(420, 130 + 28 * rows)
        if self.built:
            self.fig.yaxis.major_label_overrides = self._row_labels
            self.fig.height = self._height
        self.cells.data, self.waste.data = cells, waste
        self.waste_measured = sum(snap.waste(r) for r in snap.tables)
        self.waste_formula = sum(waste_tokens(t, snap.block_size) for t in snap.tokens.values())
        self.table.object = self._table(snap)
        self.text = self._describe(snap, shown)

    def _table(self, snap: PageSnapshot) -> str:
        """Per-request tokens, pages and waste, measured beside the formula."""
        P, colour, rows = snap.block_size, request_colours(snap), []
        for rid in sorted(snap.tables)[:TABLE_ROWS]:
            T = snap.tokens[rid]
            rows.append(
                f'<tr><th scope="row"><span class="swatch" style="background:{colour[rid]}">'
                f"</span>request {rid}</th><td>{T}</td><td>{len(snap.tables[rid])}</td>"
                f"<td>{snap.waste(rid)}</td><td>{waste_tokens(T, P)}</td></tr>")
        more = len(snap.tables) - TABLE_ROWS
        if more > 0:
            rows.append(f'<tr><th scope="row">… {more} more</th>{"<td></td>" * 4}</tr>')
        head = "".join(f'<th scope="col">{h}</th>' for h in
                       ("owner", "tokens T", "pages", "waste", "⌈T/P⌉·P − T"))
        pages = sum(len(b) for b in snap.tables.values())
        return (f'<table class="page-table"><caption>Empty slots at peak, P = {P}: measured '
                f"(waste) and formula</caption><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody><tfoot><tr><th scope=\"row\">all "
                f"{len(snap.tables)}</th><td>{sum(snap.tokens.values())}</td><td>{pages}</td>"
                f"<td>{self.waste_measured}</td><td>{self.waste_formula}</td></tr></tfoot>"
                "</table>")

    def _describe(self, snap: PageSnapshot, shown: int) -> str:
        """The text equivalent: pages, tokens and the two waste sums."""
        pages = sum(len(b) for b in snap.tables.values())
        tokens = sum(snap.tokens.values())
        agree = ("they agree" if self.waste_measured == self.waste_formula
                 else f"they differ by {abs(self.waste_measured - self.waste_formula)} tokens")
        text = (f"At peak KV use (step {snap.step_index}), {len(snap.tables)} requests held "
                f"{pages} of {snap.num_blocks} pages ({snap.block_size} tokens each) for {tokens} "
                f"tokens. **Measured waste: {self.waste_measured} tokens** at this step of peak "
                f"KV use (the summary's waste row); formula Σ(⌈T/P⌉·P − T): "
                f"{self.waste_formula} tokens; {agree}. That is "
                f"{fmt_num(100 * self.waste_measured / (pages * snap.block_size))} % of the "
                "allocated slots.")
        highest = max(b for blocks in snap.tables.values() for b in blocks)
        if highest >= shown:
            text += f" The grid shows blocks 0–{shown - 1}; blocks in use reach id {highest}."
        return text
