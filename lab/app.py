"""The lab's page: `panel serve lab/app.py`. Each browser session gets its own state and demo;
the engine service, the loaded models and the limits are shared by the whole process."""
from __future__ import annotations

import os

import panel as pn

from lab import gc_policy, shared
from lab.page import build_page

if pn.state.served:
    pn.extension("katex", throttled=True, notifications=False)
    query = {k: v[0].decode("utf-8", "replace") for k, v in pn.state.session_args.items() if v}
    page = build_page(service=shared.service(), shelf=shared.shelf(), limits=shared.limits(),
                      query=query,
                      links={"prerequisite": os.environ.get("LAB_PREREQ_URL", ""),
                             "next": os.environ.get("LAB_NEXT_URL", "")})
    # The template adds its roots and applies its theme one step at a time, and Bokeh recounts
    # the document's models after each (nine walks over ~860 models); count them once instead.
    with pn.state.curdoc.models.freeze():
        page.servable()
    gc_policy.settle_session()
    pn.state.on_session_destroyed(gc_policy.release_sessions)
