"""Assemble one session's page: the reading sections, then the live demo.

`build_page` is called once per browser session by lab/app.py; it creates the session's LabState and
DemoController, wires clean-up to the session's end, and asks for the first run as the page is
built.
`?embed=demo` gives the demo alone, compact, for an iframe.
"""
from __future__ import annotations

import panel as pn

from lab import sections
from lab.after import after_first_pass
from lab.classroom_view import attach_classroom
from lab.content import load_content
from lab.demo import DemoController
from lab.demo_view import demo_section
from lab.endpoint_client import EndpointClient
from lab.endpoint_demo import EndpointDemoController
from lab.endpoint_prompts import PromptMaker
from lab.engine_client import EngineClient, TraceCache
from lab.runs import Limits
from lab.state import LabState
from widgets.base import served

MAX_WIDTH = 1180  # a comfortable reading width on a projector; narrower screens fill the width


URL_KEYS = LabState.CONTROLS
EMBED_CSS = "#header { display: none !important; } #main { padding-top: 0 !important; }"


def build_page(client: EngineClient | None, limits: Limits, traces: TraceCache | None = None,
               query: dict[str, str] | None = None,
               links: dict[str, str] | None = None, endpoint: EndpointClient | None = None,
               prompts: PromptMaker | None = None,
               classroom: bool = True) -> pn.template.BootstrapTemplate:
    """One session's page: the reading sections and the demo (or, with ?embed=demo, the demo
    alone), in a template whose light or dark theme also styles the Bokeh plots. With an
    `endpoint` (LAB_ENDPOINT) the demo measures it instead of the engine server `client`."""
    query = query or {}
    content = load_content()
    theme = "dark" if query.get("theme") == "dark" else "default"
    embed = query.get("embed") == "demo"
    state = LabState()
    notes = state.apply({k: v for k, v in query.items() if k in URL_KEYS})
    if endpoint is None:
        demo = DemoController(state, client, limits, traces)
    else:
        demo = EndpointDemoController(state, endpoint, limits, traces, prompts=prompts)
    if notes:
        demo.link_notice.show("This link's settings were adjusted: " + "; ".join(notes) + ".")
    # None unless instructor mode is on
    bar = attach_classroom(demo, content, query) if classroom else None
    if embed:
        body = [demo_section(demo, content, compact=True)]
    else:
        body = [sections.header(content, links or {}, theme), sections.structure(content),
                sections.intuition(content), sections.math_section(content),
                sections.code_section(content, state), demo_section(demo, content),
                after_first_pass(demo, content)]
    if bar is not None:
        body.insert(0, bar)
    page = pn.Column(*body, sizing_mode="stretch_width", max_width=MAX_WIDTH,
                     styles={"margin": "0 auto"}, stylesheets=[sections.CSS],
                     css_classes=["lab-page"])
    template = pn.template.BootstrapTemplate(
        title=content.page["breadcrumb"] + " · Serving Lab", theme=theme, main=[page],
        main_max_width=f"{MAX_WIDTH + 40}px", collapsed_sidebar=True,
        # Panel keeps every session's busy indicator in one process-wide list and flips them
        # all whenever any session is busy: each student's spinner flickered at every other
        # student's move, and with 40 sessions that was half the server's work for a move. The
        # demo's status line says what this session's run is doing.
        busy_indicator=None)
    if embed:
        template.config.raw_css.append(EMBED_CSS)
    template.demo = demo  # tests and later panels reach the session's controller here
    if served():
        pn.state.on_session_destroyed(lambda _ctx: demo.close())
        # Now, not once the browser has drawn the page: every listener (the gate, the storyboard)
        # is attached, and a setting this process already holds ships drawn with the page.
        demo.start()
        keep_url_in_sync(state)
    return template


def keep_url_in_sync(state: LabState) -> None:
    """Write the controls into the address bar as they change, so the URL is a shareable link."""
    def push(*_events) -> None:
        pn.state.location.update_query(**{k: state.values()[k] for k in URL_KEYS})
    state.param.watch(push, list(URL_KEYS))
