"""The "After the first pass" section: the storyboard of the last run, visual inquiry, source cards,
claim review, the practice loop and the research room, each under an anchored heading.

Built once per session from `content/` and the session's `DemoController`: the storyboard is fed
each new trace through `demo.listeners`; the research prompt reads the demo's current settings.
"""
from __future__ import annotations

import html

import panel as pn

from lab.content import Content, to_plain
from lab.demo import DemoController
from widgets.base import served
from lab.sections import html_pane, section_heading
from lab.state import LabState
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


def after_first_pass(demo: DemoController, content: Content) -> pn.Column:
    """The whole section for one session; its parts are reachable as attributes of the column."""
    storyboard = Storyboard()
    if demo.trace is not None:
        storyboard.show(demo.trace)

    def on_run(trace, _summary) -> None:
        if trace is not storyboard.trace:  # an SLO change redraws the same trace: keep the step
            storyboard.show(trace)

    demo.listeners.append(on_run)
    research = ResearchRoom(research=to_plain(content.research),
                            demo_state=lambda: demo_state_text(demo.state))
    demo.state.param.watch(lambda *_: research.refresh(), list(LabState.CONTROLS))
    if served():
        pn.state.on_session_destroyed(lambda _ctx: storyboard.close())
    parts = {
        "storyboard": [pn.pane.Markdown(content.storyboard, sizing_mode="stretch_width"),
                       storyboard],
        "inquiry": [VisualInquiry(inquiry=to_plain(content.inquiry))],
        "sources": [SourceCards(sources=to_plain(content.sources))],
        "claims": [ClaimReview(claims=to_plain(content.claims),
                               sources=to_plain(content.sources))],
        "practice": [PracticeLoop(items=to_plain(content.practice))],
        "research": [research],
    }
    column = pn.Column(
        section_heading(content, "after"),
        pn.pane.Markdown(content.after["intro"], sizing_mode="stretch_width"),
        *[pn.Column(panel_heading(content, pid), *views, sizing_mode="stretch_width",
                    css_classes=["after-panel", f"after-{pid}"])
          for pid, views in parts.items()],
        sizing_mode="stretch_width", css_classes=["lab-section", "after"])
    column.storyboard, column.research = storyboard, research
    column.inquiry, column.practice = parts["inquiry"][0], parts["practice"][0]
    return column
