"""The lab's page: `panel serve lab/app.py` (or `python -m lab`, which also starts the engine
server). Each browser session gets its own state and demo; runs are measured by the engine server,
in its own process, and this process only builds and updates pages."""
from __future__ import annotations

import os

import panel as pn

from lab import shared
from lab.page import build_page
from lab.ticker import recount_models_once

if pn.state.served:
    pn.extension("katex", throttled=True, notifications=False)
    query = {k: v[0].decode("utf-8", "replace") for k, v in pn.state.session_args.items() if v}
    endpoint = shared.endpoint()  # LAB_ENDPOINT: server configuration, never the page's query
    # With an endpoint, an engine server is needed only for the classroom hub: one named by
    # LAB_ENGINE_URL, never one started here.
    classroom = endpoint is None or bool(os.environ.get("LAB_ENGINE_URL"))
    page = build_page(client=shared.engine_client() if endpoint is None else None,
                      limits=shared.limits(), traces=shared.traces(), query=query,
                      links={"prerequisite": os.environ.get("LAB_PREREQ_URL", ""),
                             "next": os.environ.get("LAB_NEXT_URL", "")},
                      endpoint=endpoint,
                      prompts=shared.endpoint_prompts() if endpoint is not None else None,
                      classroom=classroom)
    with recount_models_once():  # the template adds roots and a theme one at a time
        page.servable()
