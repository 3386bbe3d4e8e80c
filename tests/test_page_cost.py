"""What a session's page costs the page process, held structurally (no timings): the number of
Bokeh models a whole page sends, and stylesheets shared across its components.

Every model is built, validated and serialised for each session, and forty sessions arrive within
forty seconds in a class (docs/classroom.md, "Page cost cut"); tools/page_cost.py measures the
same page in CPU seconds and Python calls.
"""
from __future__ import annotations

from collections import Counter

import panel as pn
import pytest
from bokeh.models import ImportedStyleSheet, Plot

from tools.page_cost import build_once

# 664 models before the cut of 2026-11-30, 583 after it, 269 with the plots in tabs (only the
# open tab is built); a little headroom for a new label.
MAX_MODELS = 320


@pytest.fixture(scope="module")
def built():
    pn.extension("katex")
    _times, doc, page = build_once({})
    return doc, page


@pytest.fixture(scope="module")
def page_doc(built):
    return built[0]


def figures_in(doc) -> list[Plot]:
    return [m for m in doc.models if isinstance(m, Plot)]


def plot_figures(plot) -> list[Plot]:
    """The figures a plot draws in (building them, if its tab has not been opened)."""
    return [part.object for whole in plot.parts() for part in whole.select(pn.pane.Bokeh)]


def test_a_whole_page_stays_under_its_model_budget(page_doc):
    models = list(page_doc.models)
    assert len(models) <= MAX_MODELS, Counter(type(m).__name__ for m in models).most_common(8)


def test_each_stylesheet_is_one_model_per_page(page_doc):
    urls = [m.url for m in page_doc.models if isinstance(m, ImportedStyleSheet)]
    assert urls and len(urls) == len(set(urls))


def test_only_the_open_plot_tab_is_built_and_a_tab_is_built_when_opened(built):
    doc, page = built
    demo, tabs = page.demo, page.demo.plot_tabs
    assert tabs.active == 0 and len(tabs) == 4
    assert demo.latency.built and demo.timeline.built
    closed = [demo.kv_memory, demo.page_map, demo.queue, demo.policy, demo.tpot_batch,
              demo.goodput_rate]
    assert not any(plot.built for plot in closed)  # no figure made for a tab nobody opened
    first = plot_figures(demo.latency) + plot_figures(demo.timeline)
    assert set(map(id, figures_in(doc))) == set(map(id, first))
    tabs.active = 2  # as a click on the tab does
    assert demo.queue.built and demo.policy.built and not demo.kv_memory.built
    third = plot_figures(demo.queue) + plot_figures(demo.policy)
    assert third and set(map(id, third)) <= set(map(id, figures_in(doc)))
    tabs.active = 0


def test_figures_keep_their_hover_tooltips_without_zoom_tools(built):
    _doc, page = built
    demo = page.demo
    figures = [fig for plot in (demo.latency, demo.timeline, demo.kv_memory, demo.page_map,
                                demo.queue, demo.policy, demo.tpot_batch, demo.goodput_rate)
               for fig in plot_figures(plot)]
    assert len(figures) == 12
    for fig in figures:
        assert [type(t).__name__ for t in fig.tools] == ["HoverTool"] * len(fig.tools)
        assert fig.tools, fig.title.text if fig.title else fig
