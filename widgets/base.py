"""The common shape of every plot component: a body, a text equivalent, and reset/add_steps/show.

A subclass makes in `__init__` its data sources and the few small models its updates change (spans,
ranges, titles, tickers), and builds its figures around them in `_body`, which runs the first time
the plot is shown: a plot in a closed tab costs no figure until the tab opens (docs/classroom.md,
"Figures built when shown"). It keeps `text` (a plain-language equivalent with the key numbers) in
step with what it draws. A plot given
a `run` (a `RunState`) follows it: a new run clears it, streamed steps extend it, a finished run
(or the same run under new targets) is drawn whole. The run state changes only on the session's
event loop (lab/ticker.py), so these methods mutate Bokeh sources directly.
"""
from __future__ import annotations

from typing import Any, ClassVar

import panel as pn
import param

from engine.config import SLO
from engine.metrics import Summary
from engine.records import StepRecord, Trace
from widgets.run_state import RunState
from widgets.style import WAITING, RunInfo


def served() -> bool:
    """True inside a `panel serve` session: the page has an event loop and a browser (and
    session callbacks, periodic or on destruction, may be registered)."""
    doc = pn.state.curdoc
    return doc is not None and doc.session_context is not None


class TextedView(pn.viewable.Viewer):
    """Panes built the first time they are shown, with a text equivalent (`text`) at the bottom:
    what the demo's plots and the policy comparison share."""

    plot_id: ClassVar[str] = "plot"  # stable id, shared with content/inquiry.yaml's `plot` keys

    text = param.String(default=WAITING, doc="What the view shows now, in words and numbers.")

    def __init__(self, **params: Any) -> None:
        params.setdefault("name", self.plot_id)
        super().__init__(**params)
        self.text_pane = pn.pane.Markdown(
            self.text, name=f"{self.plot_id}-text", sizing_mode="stretch_width",
            css_classes=["plot-text", f"{self.plot_id}-text"], margin=(0, 10))
        self._layout: pn.Column | None = None
        self._parts: list[pn.viewable.Viewable] | None = None

    @param.depends("text", watch=True)
    def _sync_text(self) -> None:
        self.text_pane.object = self.text

    def _build(self) -> list[pn.viewable.Viewable]:
        """Every pane, top to bottom, the text pane last: made once, when first shown."""
        raise NotImplementedError

    @property
    def built(self) -> bool:
        """Whether the panes (and their figures) exist yet."""
        return self._parts is not None

    def parts(self) -> list[pn.viewable.Viewable]:
        """The panes, for a layout that holds them itself (the demo's cards do: a Panel layout is
        several Bokeh and Panel objects per session); built on the first call."""
        if self._parts is None:
            self._parts = self._build()
        return self._parts

    def __panel__(self) -> pn.Column:
        if self._layout is None:
            self._layout = pn.Column(*self.parts(), name=self.plot_id,
                                     css_classes=["plot", self.plot_id],
                                     sizing_mode="stretch_width")
        return self._layout


class PlotComponent(TextedView):
    """A plot (or plots) with its text equivalent underneath."""

    heading: ClassVar[str | None] = None  # the card's title, where not the plot id's usual one

    run = param.ClassSelector(class_=RunState, default=None,
                              doc="The session's run this plot follows (None: drawn by hand)")

    def _body(self) -> list[pn.viewable.Viewable]:
        """The plot area's panes, top to bottom: the figures, built once, when first shown."""
        raise NotImplementedError

    def _build(self) -> list[pn.viewable.Viewable]:
        return [*self._body(), self.text_pane]

    @param.depends("run.cleared", watch=True)
    def _follow_new_run(self) -> None:
        self.reset()

    @param.depends("run.new_steps", watch=True)
    def _follow_steps(self) -> None:
        if self.run.new_steps and self.run.info is not None:
            self.add_steps(self.run.new_steps, self.run.info)

    @param.depends("run.summary", watch=True)
    def _follow_result(self) -> None:
        run = self.run
        if run.summary is not None and run.trace is not None:
            self.show(run.trace, run.summary, run.slo)

    def reset(self) -> None:
        """Clear for a new run."""
        self.text = WAITING

    def add_steps(self, steps: list[StepRecord], trace_info: RunInfo) -> None:
        """Stream newly measured steps; plots drawn only from finished runs ignore them."""

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Draw a finished run completely."""
        raise NotImplementedError
