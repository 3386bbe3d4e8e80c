"""The common shape of every plot component: a body, a text equivalent, and reset/add_steps/show.

A subclass builds its Bokeh figures and sources in `__init__`, returns them from `_body`, and keeps
`text` (a plain-language equivalent with the key numbers) in step with what it draws. The methods
are called only on the server's event loop, so they mutate Bokeh sources directly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import panel as pn
import param

from engine.config import SLO
from engine.metrics import Summary
from engine.records import StepRecord, Trace
from widgets.style import WAITING, RunInfo


class PlotComponent(pn.viewable.Viewer):
    """A plot (or plots) with its text equivalent underneath."""

    plot_id: ClassVar[str] = "plot"  # stable id, shared with content/inquiry.yaml's `plot` keys

    text = param.String(default=WAITING, doc="What the plot shows now, in words and numbers.")

    def __init__(self, **params: Any) -> None:
        params.setdefault("name", self.plot_id)
        super().__init__(**params)
        self.text_pane = pn.pane.Markdown(
            self.text, name=f"{self.plot_id}-text", sizing_mode="stretch_width",
            css_classes=["plot-text", f"{self.plot_id}-text"], margin=(0, 10))
        self._layout: pn.Column | None = None

    @param.depends("text", watch=True)
    def _sync_text(self) -> None:
        self.text_pane.object = self.text

    def _body(self) -> pn.viewable.Viewable:
        """The plot area, built once by the subclass."""
        raise NotImplementedError

    def __panel__(self) -> pn.Column:
        if self._layout is None:
            self._layout = pn.Column(self._body(), self.text_pane, name=self.plot_id,
                                     css_classes=["plot", self.plot_id],
                                     sizing_mode="stretch_width")
        return self._layout

    def reset(self) -> None:
        """Clear for a new run."""
        self.text = WAITING

    def add_steps(self, steps: list[StepRecord], trace_info: RunInfo) -> None:
        """Stream newly measured steps; plots drawn only from finished runs ignore them."""

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw a finished run completely."""
        raise NotImplementedError
