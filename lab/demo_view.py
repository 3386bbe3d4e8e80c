"""The demo section's layout: presets, sliders, run status, the device banner, the summary table
and the eight measured plots in four tabs, each plot with its text equivalent."""
from __future__ import annotations

import html

import panel as pn

from lab.content import Content
from lab.demo import DemoController
from lab.late import made_late
from lab.prediction import attach_prediction_gate
from lab.sections import section_heading
from widgets.inquiry import PLOT_TITLES

STATUS_TEXT = {
    "idle": "Waiting for the first run.",
    "queued": "Queued for the shared engine: {ahead} run(s) ahead of yours.",
    "running": "Measuring on the engine: {steps} steps so far.",
    "done": "Measured. Move a slider to run again.",
    "refused": "Not run: see the notice. The plots show the last measured run.",
    "failed": "The run failed: see the notice. The plots show the last measured run.",
}


def controls(demo: DemoController, content: Content) -> pn.Column:
    """Sliders bound to LabState (they report only on release: the extension is throttled), in
    three groups: the workload, the engine, and the targets."""
    s = demo.state
    kv_cap_mb = max(1, int(demo.limits.kv_budget_bytes // 2**20))
    groups = {
        "The workload": [
            pn.widgets.IntSlider.from_param(s.param.requests, label="Requests"),
            pn.widgets.FloatSlider.from_param(s.param.rate, label="Arrival rate (requests/s, 0 = all at once)",
                                   step=0.25),
            pn.widgets.Select.from_param(s.param.mix, label="Lengths (fixed, or mixed: lognormal)"),
            pn.widgets.IntSlider.from_param(s.param.context, label="Context length (prompt tokens)",
                                 step=16),
            pn.widgets.IntSlider.from_param(s.param.output, label="Output tokens"),
        ],
        "The engine": [
            pn.widgets.IntSlider.from_param(s.param.batch, label="Batch size (most running at once)"),
            pn.widgets.IntSlider.from_param(s.param.kv_mb, label="KV memory (MB)",
                                 end=min(kv_cap_mb, s.param.kv_mb.bounds[1])),
            pn.widgets.IntSlider.from_param(s.param.page, label="Page size (tokens per block)"),
            pn.widgets.IntSlider.from_param(s.param.chunk, label="Prefill chunk (tokens per step)", step=16),
            pn.widgets.Select.from_param(s.param.policy, label="Batching policy"),
            pn.widgets.Select.from_param(s.param.model, label="Model preset"),
        ],
        "The targets": [
            pn.widgets.FloatSlider.from_param(s.param.ttft_slo, label="TTFT SLO (ms)", step=10, end=5000),
            pn.widgets.FloatSlider.from_param(s.param.tpot_slo, label="TPOT SLO (ms)", step=1, end=500),
        ],
    }
    for w in (w for ws in groups.values() for w in ws):  # two columns on a wide screen
        w.sizing_mode = "stretch_width"
        w.styles = {"flex": "1 1 320px"}
    fixed = [w for name, w in zip(("batch", "kv_mb", "page", "chunk", "policy", "model"),
                                  groups["The engine"]) if name in demo.fixed_controls]
    for w in fixed:  # the deployment's own settings: shown, but not the lab's to change
        w.disabled = True
    if fixed:
        groups["The engine"].append(pn.pane.Markdown(
            "Batch is how many requests the lab keeps in flight at once. KV memory, page size, "
            "prefill chunk, policy and model belong to the deployment's configuration, which the "
            "lab does not change.", css_classes=["fixed-controls"], sizing_mode="stretch_width"))
    buttons = []
    for preset in content.presets:
        b = pn.widgets.Button(label=preset["label"], color="light",
                              description=preset["description"], css_classes=["preset-button"])
        b.on_click(lambda _e, v=dict(preset["values"]): s.apply(v))
        buttons.append(b)
    copy = pn.widgets.Button(label="Copy link to these settings", color="primary",
                             variant="outline", css_classes=["copy-link"])
    copy.js_on_click(code="""
        navigator.clipboard.writeText(window.location.href).then(
          () => { cb.label = 'Link copied'; setTimeout(() => { cb.label = 'Copy link to these settings'; }, 2000); },
          () => { cb.label = 'Copy failed: use the address bar'; });""", args={"cb": copy})
    again = pn.widgets.Button(label="Run again", color="light", css_classes=["run-again"],
                              description="Measure this setting once more: runs vary, and the "
                                          "gate grades a change against that spread")
    again.on_click(lambda _e: demo.run_again())
    parts = [pn.pane.Markdown("**Presets**", margin=(0, 10)),
             pn.FlexBox(*buttons, copy, again, gap="6px")]
    for title, widgets in groups.items():
        parts += [pn.pane.Markdown(f"**{title}**", margin=(6, 10, 0, 10)),
                  pn.FlexBox(*widgets, gap="4px 16px", css_classes=["sliders"])]
    return pn.Column(*parts, sizing_mode="stretch_width")


def status_line(demo: DemoController) -> pn.Row:
    s = demo.run

    texts = {**STATUS_TEXT, **dict(demo.status_text)}

    def text(status, ahead, steps):
        return texts[status].format(ahead=ahead, steps=steps)

    busy = pn.bind(lambda st: st in ("queued", "running"), s.param.status)
    return pn.Row(
        pn.indicators.LoadingSpinner(value=busy, size=20, label="", visible=busy, margin=(8, 6)),
        pn.pane.Markdown(pn.bind(text, s.param.status, s.param.queue_position, s.param.steps_done),
                         css_classes=["run-status"], margin=(0, 6)),
        sizing_mode="stretch_width")


# Plots whose body is two things side by side (two figures, a figure and a table): each takes a
# whole row of its tab, since half a row squeezed the page map's grid to a sliver beside its table.
WIDE_PLOTS = frozenset({"kv_memory", "page_map"})


def plot_card(title: str, plot, plot_id: str) -> pn.Column:
    """The plot's title, panes and text in one column: the plot's own column is not built (one
    Panel layout fewer per card, two for the stacked figures)."""
    return pn.Column(pn.pane.HTML(f'<h3 id="plot-{plot_id}" class="plot-title">'
                                  f'{html.escape(title)}</h3>', margin=(0, 10)),
                     *plot.parts(), name=plot_id, sizing_mode="stretch_width",
                     styles={"flex": "1 1 100%" if plot_id in WIDE_PLOTS else "1 1 480px"},
                     css_classes=["plot-card", f"plot-{plot_id}", "plot", plot_id])


# The demo's plots, two to a tab, each tab one question. Only the open tab is built for the
# browser (`pn.Tabs(dynamic=True)`), and a closed tab's plots build their figures only when it
# first opens: a plot is 50-80 Bokeh models and 25-40 ms of page-process CPU, for every session
# (docs/classroom.md, "Plots in tabs" and "Figures built when shown"). Plots in closed tabs still
# follow every run in Python (their sources, text and tables), so a tab opens on the current run.
PLOT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Latency and steps", ("latency", "timeline")),
    ("KV memory and pages", ("kv_memory", "page_map")),
    ("Queue and policies", ("queue", "policy")),
    ("Batch and rate sweeps", ("tpot_batch", "goodput_rate")),
)


def tab_content(demo: DemoController, plot_ids: tuple[str, ...]) -> pn.FlexBox:
    """One tab's plot cards, side by side on a wide screen."""
    plots = [getattr(demo, plot_id) for plot_id in plot_ids]
    return pn.FlexBox(*(plot_card(getattr(plot, "heading", None) or PLOT_TITLES[plot.plot_id],
                                  plot, plot.plot_id) for plot in plots),
                      gap="8px 20px", sizing_mode="stretch_width", css_classes=["plot-grid"])


def plot_tabs(demo: DemoController) -> pn.Tabs:
    """The demo's plots in their tabs; the first tab is open, each other tab holds a placeholder
    until it first opens, when its cards are made (`made_late`: styled like the first tab's) and
    the plots in them build their figures."""
    tabs = pn.Tabs(*((label, tab_content(demo, plot_ids) if index == 0 else pn.Spacer())
                     for index, (label, plot_ids) in enumerate(PLOT_GROUPS)),
                   dynamic=True, sizing_mode="stretch_width", css_classes=["plot-tabs"])
    built = {0}

    def build(event) -> None:
        index = event.new
        if index not in built and 0 <= index < len(PLOT_GROUPS):
            built.add(index)
            label, plot_ids = PLOT_GROUPS[index]
            tabs[index] = (label, made_late(lambda: tab_content(demo, plot_ids)))

    tabs.param.watch(build, "active")
    return tabs


def open_plot(tabs: pn.Tabs, plot_id: str) -> None:
    """Open the tab that holds `plot_id` (a link to a plot in a closed tab has nothing to reach)."""
    for index, (_label, plot_ids) in enumerate(PLOT_GROUPS):
        if plot_id in plot_ids:
            tabs.active = index
            return


def demo_section(demo: DemoController, content: Content, compact: bool = False) -> pn.Column:
    """The whole demo; `compact` (embed mode) drops the section heading and the intro text."""
    parts = [] if compact else [section_heading(content, "demo"),
                                pn.pane.Markdown(content.demo, sizing_mode="stretch_width")]
    gate = attach_prediction_gate(demo, content)
    demo.gate = gate  # tests and the classroom reach the session's gate here
    demo.plot_tabs = plot_tabs(demo)  # and the inquiry opens a plot's tab through it
    results = pn.Column(demo.summary, demo.plot_tabs, sizing_mode="stretch_width")
    parts += [demo.banner, demo.link_notice, controls(demo, content), status_line(demo),
              demo.notice, gate, gate.cover(results)]
    return pn.Column(*parts, sizing_mode="stretch_width", css_classes=["lab-section", "demo"])
