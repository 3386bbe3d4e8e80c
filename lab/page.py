"""Assemble one session's page: the reading sections, then the live demo.

`build_page` is called once per browser session by lab/app.py; it creates the session's LabState and
DemoController, wires clean-up to the session's end, and starts the first run once the page loads.
`?embed=demo` gives the demo alone, compact, for an iframe.
"""
from __future__ import annotations

import panel as pn

from lab import sections
from lab.content import load_content
from lab.demo import DemoController
from lab.demo_view import demo_section
from lab.runs import Limits, ModelShelf
from lab.service import EngineService
from lab.state import LabState

MAX_WIDTH = 1180  # a comfortable reading width on a projector; narrower screens fill the width


def build_page(service: EngineService, shelf: ModelShelf, limits: Limits,
               query: dict[str, str] | None = None,
               links: dict[str, str] | None = None) -> pn.viewable.Viewable:
    query = query or {}
    content = load_content()
    theme = "dark" if query.get("theme") == "dark" else "light"
    state = LabState()
    demo = DemoController(state, service, shelf, limits)
    if pn.state.curdoc is not None:
        demo.bind_document(pn.state.curdoc)
        pn.state.on_session_destroyed(lambda _ctx: demo.close())
        pn.state.onload(demo.start)
    if query.get("embed") == "demo":
        body = [demo_section(demo, content, compact=True)]
    else:
        body = [sections.header(content, links or {}, theme), sections.structure(content),
                sections.intuition(content), sections.math_section(content),
                sections.code_section(content, state), demo_section(demo, content)]
    page = pn.Column(*body, sizing_mode="stretch_width", max_width=MAX_WIDTH,
                     styles={"margin": "0 auto", "padding": "0 12px"}, stylesheets=[sections.CSS],
                     css_classes=["lab-page", theme])
    page.demo = demo  # tests and later panels reach the session's controller through the page
    return page
