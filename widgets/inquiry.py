"""Visual inquiry: which visible object should carry the first intuition? The learner picks a cue
and gets feedback that names, and links to, the demo plot that shows it.

The plots' headings carry ids `plot-<plot_id>`. Panel renders each pane in its own shadow root,
where a plain `#fragment` link cannot reach, so the link also scrolls by script, searching shadow
roots for the id.
"""
from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import panel as pn
import param

PLOT_TITLES = {"latency": "Latency per request", "timeline": "Step timeline",
               "kv_memory": "KV memory over steps", "page_map": "Page map",
               "queue": "Running and waiting", "policy": "Static against continuous batching",
               "tpot_batch": "TPOT against batch size",
               "goodput_rate": "Goodput against arrival rate"}  # the demo's plot headings
# Find an id anywhere in the document, shadow roots included, scroll to it and flash its card.
SCROLL_JS = (
    "const find=(r,id)=>{const e=r.getElementById?r.getElementById(id):null;if(e)return e;"
    "for(const n of r.querySelectorAll('*')){if(n.shadowRoot){const f=find(n.shadowRoot,id);"
    "if(f)return f;}}return null;};const t=find(document,this.dataset.target);"
    "if(t){t.scrollIntoView({behavior:'smooth',block:'start'});"
    "t.animate([{outline:'3px solid #E69F00'},{outline:'3px solid transparent'}],"
    "{duration:1800});return false;}return true;")
CSS = """
.inquiry-feedback {border-left: 4px solid #56B4E9; padding: 4px 14px; margin: 4px 0;}
.inquiry-feedback a {font-weight: 600;}
"""


def plot_anchor(plot_id: str) -> str:
    """The id of a demo plot's heading."""
    return f"plot-{plot_id}"


def feedback_html(cue: Mapping[str, Any]) -> str:
    """A cue's feedback and a link to the plot that shows it."""
    anchor = plot_anchor(cue["plot"])
    title = PLOT_TITLES.get(cue["plot"], cue["plot"])
    return (f'<div class="inquiry-feedback" role="status" aria-live="polite">'
            f'<p>{html.escape(cue["feedback"])}</p>'
            f'<p>See it in the demo: <a class="plot-link" href="#{anchor}" data-target="{anchor}" '
            f'onclick="{html.escape(SCROLL_JS)}">{html.escape(title)} ↑</a></p></div>')


class VisualInquiry(pn.viewable.Viewer):
    """The question, one button per cue, and feedback for the cue picked."""

    inquiry = param.Dict(default={}, doc="content/inquiry.yaml: question, prompt, cues.")
    cue = param.String(default=None, allow_None=True, doc="The id of the cue picked.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        cues = self.inquiry["cues"]
        self.buttons = pn.widgets.RadioButtonGroup.from_param(
            self.param.cue, options={c["label"]: c["id"] for c in cues}, orientation="vertical",
            color="primary", variant="outline", label="Cue", css_classes=["inquiry-cues"])
        self.buttons.value = None  # the group selects its first option; no cue is picked yet
        self.feedback = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width",
                                     css_classes=["inquiry-feedback-pane"])
        self._layout = pn.Column(
            pn.pane.Markdown(f"**{self.inquiry['question']}**\n\n{self.inquiry['prompt']}",
                             sizing_mode="stretch_width"),
            self.buttons, self.feedback, sizing_mode="stretch_width", css_classes=["inquiry"],
            name="inquiry")

    def __panel__(self) -> pn.Column:
        return self._layout

    def picked(self) -> Mapping[str, Any] | None:
        """The cue record picked, if any."""
        return next((c for c in self.inquiry["cues"] if c["id"] == self.cue), None)

    @param.depends("cue", watch=True)
    def _show(self) -> None:
        cue = self.picked()
        self.feedback.object = feedback_html(cue) if cue else ""
