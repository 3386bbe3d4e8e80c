"""A notice area for messages the learner must see (a rejected setting, a busy server, an error).

It takes no space while empty. Messages are shown as plain text, never as markup.
"""
from __future__ import annotations

from typing import Any

import panel as pn
import param

LEVELS = ("info", "warning", "danger", "success")


class Notice(pn.viewable.Viewer):
    """A visible message, hidden when there is none."""

    message = param.String(default="", doc="The message shown; empty hides the notice.")
    level = param.Selector(default="warning", objects=list(LEVELS), doc="How urgent it is.")

    def __init__(self, **params: Any) -> None:
        params.setdefault("name", "notice")
        super().__init__(**params)
        self.alert = pn.pane.Alert("", alert_type=self.level, visible=False,
                                   css_classes=["notice"], name="notice",
                                   sizing_mode="stretch_width", renderer="markdown")
        self._sync()

    def __panel__(self) -> pn.pane.Alert:
        return self.alert

    @param.depends("message", "level", watch=True)
    def _sync(self) -> None:
        self.alert.param.update(object=_plain(self.message), alert_type=self.level,
                                visible=bool(self.message))

    def show(self, message: str, level: str = "warning") -> None:
        """Show a message at a level (info, warning, danger or success)."""
        if level not in LEVELS:
            raise ValueError(f"notice level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.param.update(message=message, level=level)

    def clear(self) -> None:
        """Hide the notice."""
        self.message = ""


def _plain(message: str) -> str:
    """Escape Markdown and HTML so a message (which may echo user input) shows as typed."""
    out = message.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_{}[]()#+-!|":
        out = out.replace(ch, "\\" + ch)
    return out
