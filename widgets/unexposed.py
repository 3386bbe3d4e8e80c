"""A panel's place when the engine behind the page does not expose what it draws.

An external deployment (LAB_ENDPOINT) is measured from the outside: its steps, block tables and
scheduler are not visible, so the panels drawn from them say so in one sentence instead of
drawing anything. The sentence is also the panel's text equivalent.
"""
from __future__ import annotations

from typing import Any

import panel as pn

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.base import PlotComponent


class Unexposed(PlotComponent):
    """One sentence in place of a plot; it never changes with the runs."""

    def __init__(self, plot_id: str, sentence: str, **params: Any) -> None:
        self.plot_id = plot_id  # the panel it stands in for, so headings and links still match
        super().__init__(text=sentence, **params)
        self.sentence = sentence

    def _body(self) -> list[pn.viewable.Viewable]:
        return []

    def reset(self) -> None:
        """Nothing to clear: the sentence stays."""

    def show(self, trace: Trace, summary: Summary, slo: SLO) -> None:
        """Nothing to draw."""
