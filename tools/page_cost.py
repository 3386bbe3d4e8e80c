"""What one session's page costs the page process: CPU seconds and Bokeh models.

Builds pages with the tests' stand-in engine client (no engine server, no browser) the way
lab/app.py does in a served session: the page's document is Panel's current one, `build_page`, then the template's `server_doc` into a fresh Bokeh document with
the model recount deferred to one walk (as `recount_models_once` does in a served session), then
the document's JSON, which is what the server sends the browser. Each stage is timed with
`time.process_time`. A busy neighbour on a 2-core box still moves those figures by 10-20 % (shared
caches and cores), so one more page is built under `cProfile` and its count of Python function
calls is reported too: that count does not depend on the box's load, and comparing two trees by it
shows a 5 % change that the CPU seconds cannot.

    PYTHONPATH=. .venv/bin/python -m tools.page_cost [--embed] [--pages N] [--json]

The first page pays one-off imports and caches; it is built and left out of the figures.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections import Counter

import panel as pn
from bokeh.document import Document

from lab.page import build_page
from lab.runs import Limits
from tests.fakes import FakeClient
from tests.labkit import TEST_ENGINE

TOP_TYPES = 12  # model types listed in the report


def build_once(query: dict[str, str]) -> tuple[dict[str, float], Document, pn.template.BaseTemplate]:
    """One page: CPU seconds per stage, the finished document and the page itself."""
    doc = Document()
    # As in a served session, the page is built with its document as Panel's current one: Panel
    # then makes one stylesheet model per CSS file for the document, not one per component (271
    # against 9 here).
    pn.state.curdoc = doc
    try:
        times, page = _stages(doc, query)
        return times, doc, page
    finally:
        pn.state.curdoc = None


def _stages(doc: Document, query: dict[str, str]) -> tuple[dict[str, float], pn.template.BaseTemplate]:
    t0 = time.process_time()
    # classroom=False: without LAB_INSTRUCTOR_TOKEN (the load tests) a page has no classroom bar,
    # and asking the hub would start an engine server.
    page = build_page(FakeClient(TEST_ENGINE), Limits(), query=query, classroom=False)
    t1 = time.process_time()
    with doc.models.freeze():  # the app's recount_models_once, outside a served session
        page.server_doc(doc)
    t2 = time.process_time()
    doc.to_json()
    t3 = time.process_time()
    return {"build": t1 - t0, "server_doc": t2 - t1, "serialise": t3 - t2, "total": t3 - t0}, page


def measure(pages: int, embed: bool) -> dict:
    """Median CPU seconds per stage over `pages` pages (after one warm-up), and the models."""
    query = {"embed": "demo"} if embed else {}
    build_once(query)
    runs = []
    for _ in range(pages):
        times, doc, _page = build_once(query)
        runs.append(times)
    profile = cProfile.Profile()
    profile.enable()
    build_once(query)
    profile.disable()
    models = list(doc.models)
    types = Counter(type(m).__name__ for m in models)
    return {"embed": embed, "pages": pages,
            "cpu_s": {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
            "python_calls": pstats.Stats(profile).total_calls,
            "models": len(models),
            "top_types": dict(types.most_common(TOP_TYPES))}


def report(result: dict) -> str:
    cpu = result["cpu_s"]
    lines = [f"page: {'?embed=demo' if result['embed'] else 'whole'}, "
             f"median of {result['pages']} builds (CPU seconds)",
             *(f"  {k:<11}{v:6.3f}" for k, v in cpu.items()),
             f"Python function calls: {result['python_calls']}",
             f"models: {result['models']}",
             *(f"  {n:<24}{c:4d}" for n, c in result["top_types"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embed", action="store_true", help="the ?embed=demo page alone")
    parser.add_argument("--pages", type=int, default=5, help="pages measured (after a warm-up)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    args = parser.parse_args(argv)
    pn.extension("katex")
    result = measure(args.pages, args.embed)
    print(json.dumps(result) if args.json else report(result))


if __name__ == "__main__":
    main()
