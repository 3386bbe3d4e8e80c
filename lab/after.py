"""The "After the first pass" section: the storyboard of the last run, visual inquiry, source cards,
claim review, the practice loop and the research room, each under an anchored heading.

Each panel is built for a session when its learner first opens it, from `content/` and the
session's `DemoController`: the storyboard is fed each new trace through `demo.listeners`; the
research prompt reads the demo's current settings.
"""
from __future__ import annotations

import html

import panel as pn

from lab.content import Content, to_plain
from lab.demo import DemoController
from lab.demo_view import open_plot
from lab.late import made_late
from lab.sections import html_pane, section_heading
from lab.state import LabState
from widgets.base import served
from widgets.inquiry import VisualInquiry
from widgets.practice import PracticeLoop
from widgets.research_room import ResearchRoom
from widgets.sources import ClaimReview, SourceCards
from widgets.storyboard import Storyboard


def demo_state_text(state: LabState) -> str:
    """The demo's settings as one compact line, e.g. 'batch=8 context=128 ... model=cpu-8m'."""
    def fmt(v: object) -> str:
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in state.values().items())


def panel_heading(content: Content, panel_id: str) -> pn.pane.HTML:
    """An h3 with the panel's id (the page's anchor) and its one-paragraph introduction."""
    p = content.panel(panel_id)
    return html_pane(f'<h3 id="{panel_id}" class="after-heading">{html.escape(p["heading"])}</h3>'
                     f'<p class="after-intro">{html.escape(p["intro"])}</p>',
                     css_classes=["after-head"])


class LazyPanel(pn.viewable.Viewer):
    """One panel of the section: its heading, and an "Open" button that builds its views the
    first time it is pressed. A page a learner reads once pays for no panel they never open
    (they are most of a page's Bokeh models, and each model is server work per session)."""

    def __init__(self, content: Content, panel_id: str, build) -> None:
        super().__init__()
        self.panel_id = panel_id
        self._build = build
        self.views: list | None = None
        heading = content.panel(panel_id)["heading"]
        self.button = pn.widgets.Button(label=f"Open: {heading}", color="light",
                                        css_classes=["after-open", f"after-open-{panel_id}"])
        self.button.on_click(lambda _e: self.open())
        self.layout = pn.Column(panel_heading(content, panel_id), self.button,
                                sizing_mode="stretch_width",
                                css_classes=["after-panel", f"after-{panel_id}"])

    def __panel__(self) -> pn.Column:
        return self.layout

    def open(self) -> list:
        """Build the panel's views (once) and show them in place of the button."""
        if self.views is None:
            self.views = made_late(self._build)
            self.layout.objects = [self.layout.objects[0], *self.views]
        return self.views


def after_first_pass(demo: DemoController, content: Content) -> pn.Column:
    """The whole section for one session. Each panel is built when first opened; the column's
    `panels` maps each panel id to its `LazyPanel`."""

    def storyboard() -> list:
        if demo.storyboard_note:  # an external engine exposes no steps
            return [pn.pane.Markdown(demo.storyboard_note, sizing_mode="stretch_width",
                                     css_classes=["storyboard-unexposed"])]
        board = Storyboard()
        if demo.trace is not None:
            board.show(demo.trace)

        def on_run(trace, _summary) -> None:
            if trace is not board.trace:  # an SLO change redraws the same trace: keep the step
                board.show(trace)

        demo.listeners.append(on_run)
        if served():
            pn.state.on_session_destroyed(lambda _ctx: board.close())
        return [pn.pane.Markdown(content.storyboard, sizing_mode="stretch_width"), board]

    def research() -> list:
        room = ResearchRoom(research=to_plain(content.research),
                            demo_state=lambda: demo_state_text(demo.state))
        demo.state.param.watch(lambda *_: room.refresh(), list(LabState.CONTROLS))
        return [room]

    def inquiry() -> list:
        view = VisualInquiry(inquiry=to_plain(content.inquiry))

        def open_cue_plot(_event) -> None:  # the feedback links to a plot: open its tab first
            cue = view.picked()
            if cue is not None and demo.plot_tabs is not None:
                open_plot(demo.plot_tabs, cue["plot"])
        view.param.watch(open_cue_plot, "cue")
        return [view]

    builders = {
        "storyboard": storyboard,
        "inquiry": inquiry,
        "sources": lambda: [SourceCards(sources=to_plain(content.sources))],
        "claims": lambda: [ClaimReview(claims=to_plain(content.claims),
                                       sources=to_plain(content.sources))],
        "practice": lambda: [PracticeLoop(items=to_plain(content.practice))],
        "research": research,
    }
    panels = {pid: LazyPanel(content, pid, build) for pid, build in builders.items()}
    column = pn.Column(
        section_heading(content, "after"),
        pn.pane.Markdown(content.after["intro"], sizing_mode="stretch_width"),
        *panels.values(), sizing_mode="stretch_width", css_classes=["lab-section", "after"])
    column.panels = panels
    return column
