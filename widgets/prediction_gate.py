"""The prediction gate: asks what a control move will do, hides the measured result until the learner
commits a guess, then shows the verdict with the numbers before and after.

A view only: `lab.prediction.PredictionFlow` decides when to `ask` and what to `reveal` (the grading
lives there). The page wraps its results area with `cover(...)`, which shows a placeholder instead
of the wrapped results while `revealed` is False.
"""
from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import panel as pn
import param

from widgets.style import fmt_num, fmt_value

CSS = """
.gate-box {border-left: 4px solid var(--gate-accent, #E69F00); padding: 6px 14px; margin: 4px 0;}
.gate-box h4 {margin: 2px 0 6px; font-size: 1.05rem;}
.gate-note {opacity: .85; font-size: .93rem; margin: 4px 0;}
.gate-verdict.agreed {--gate-accent: #009E73;}
.gate-verdict.disagreed {--gate-accent: #D55E00;}
.gate-verdict.skipped {--gate-accent: #888888;}
.gate-headline {font-weight: 600; font-size: 1.05rem; margin: 2px 0 6px;}
table.gate-numbers {border-collapse: collapse; font-size: .93rem; margin: 4px 0 6px;}
table.gate-numbers th, table.gate-numbers td {padding: 2px 10px 2px 0; text-align: left;
  font-variant-numeric: tabular-nums;}
.gate-cover {border: 2px dashed color-mix(in srgb, currentColor 35%, transparent);
  border-radius: 8px; padding: 28px 16px; text-align: center; font-size: 1.02rem;}
.gate-idle {opacity: .8; font-size: .93rem; margin: 2px 0;}
"""
SKIP_CSS = """
:host .bk-btn, :host .bk-btn:hover {background: none !important; border-color: transparent !important;
  box-shadow: none !important; text-decoration: underline;
  color: inherit; opacity: .8; padding-left: 4px;}
"""


def _pct(change: float) -> str:
    """A relative change as a signed percentage ('from zero' for an infinite change)."""
    if change in (float("inf"), float("-inf")):
        return "a rise from zero" if change > 0 else "a fall from zero"
    return f"{change * 100:+.0f}%"


def numbers_html(numbers: Mapping[str, Any]) -> str:
    """The measured before/after numbers of a round as a small table."""
    n = numbers
    rows = [
        (html.escape(str(n["control"])),
         html.escape(f"{fmt_value(n['before_value'])} → {fmt_value(n['after_value'])}")),
        (html.escape(n["metric_label"]),
         f"{fmt_num(n['before'])} → {fmt_num(n['after'])} ({_pct(n['change'])})"),
    ]
    if n["lowered"]:
        rows.append(("graded as the reverse move", _pct(n["graded_change"])))
    noise = n.get("noise")
    rows.append(("counted as flat within",
                 f"±{fmt_num(100 * noise)}% (this setting's run-to-run spread)" if noise is not None
                 else "±10% (a fixed band: the repeats of these settings are still being measured)"))
    body = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in rows)
    return f'<table class="gate-numbers"><tbody>{body}</tbody></table>'


class PredictionGate(pn.viewable.Viewer):
    """Commit a prediction, then see the measurement: the question, the choices and the verdict."""

    messages = param.Dict(default={}, doc="The gate's texts (content/after.yaml `gate`).")
    asking = param.Boolean(default=False, doc="A question is open and waits for a choice.")
    revealed = param.Boolean(default=True, doc="Whether the covered results may be seen.")
    choice = param.String(default=None, allow_None=True, doc="The committed choice id.")
    skipped = param.Boolean(default=False, doc="The learner chose to see the result unguessed.")
    verdict_text = param.String(default="", doc="The last verdict, as plain text.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._labels: dict[str, str] = {}  # direction -> the choice's label, for the verdict
        self.question_pane = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width",
                                          margin=(0, 10))
        self.options = pn.widgets.RadioBoxGroup(options={}, value=None, inline=False,
                                                label="Your prediction", margin=(0, 22))
        self.commit_button = pn.widgets.Button(label="Commit prediction", color="primary",
                                               disabled=True, css_classes=["gate-commit"])
        self.skip_button = pn.widgets.Button(label="Skip prediction and show the result",
                                             stylesheets=[SKIP_CSS], css_classes=["gate-skip"])
        self.verdict_pane = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width",
                                         margin=(0, 10), css_classes=["gate-verdict-pane"])
        self.idle_pane = pn.pane.HTML(
            f'<p class="gate-idle">{html.escape(self.messages.get("idle", ""))}</p>',
            stylesheets=[CSS], sizing_mode="stretch_width", margin=(0, 10))
        self.commit_button.on_click(lambda _e: self.commit(self.options.value))
        self.skip_button.on_click(lambda _e: self.skip())
        self.options.param.watch(self._on_option, "value")
        self._layout = pn.Column(
            self.idle_pane,
            pn.Column(self.question_pane, self.options,
                      pn.Row(self.commit_button, self.skip_button), visible=self.param.asking,
                      sizing_mode="stretch_width", css_classes=["gate-ask"]),
            self.verdict_pane, sizing_mode="stretch_width", css_classes=["prediction-gate"],
            name="prediction-gate")

    def __panel__(self) -> pn.Column:
        return self._layout

    def ask(self, spec: Mapping[str, Any], before_value: Any, after_value: Any,
            others: tuple[str, ...] = (), keep_choice: bool = False,
            lowered: bool | None = None) -> None:
        """Open a question for one control (a predictions.yaml entry); hide the results.
        `lowered` says the move goes against the question's direction (by default: a smaller
        number)."""
        m = self.messages
        control = spec["control"]
        notes = []
        if lowered if lowered is not None else after_value < before_value:
            notes.append(m["lowered"].format(control=control, before=fmt_value(before_value),
                                             after=fmt_value(after_value)))
        if others:
            notes.append(m["several"].format(controls=", ".join((control, *others)),
                                             control=control))
        self._labels = {c["direction"]: c["label"] for c in spec["choices"]}
        options = {c["label"]: c["id"] for c in spec["choices"]}
        kept = self.choice if keep_choice and self.choice in options.values() else None
        self.question_pane.object = (
            f'<div class="gate-box"><h4>{html.escape(spec["question"])}</h4>'
            + "".join(f'<p class="gate-note">{html.escape(n)}</p>' for n in notes) + "</div>")
        self.options.param.update(options=options, value=kept, disabled=False)
        self.idle_pane.visible = False
        self.verdict_pane.object = ""
        self.param.update(choice=kept, skipped=False, asking=True, revealed=False,
                          verdict_text="")
        self._show_committed(kept is not None)

    def commit(self, choice_id: str | None) -> None:
        """Lock in a choice (the flow reveals once the run has finished too)."""
        if choice_id is None or not self.asking:
            return
        self._show_committed(True)  # before the choice lands: its watcher may reveal at once
        self.choice = choice_id

    def skip(self) -> None:
        """See the result without a prediction."""
        if self.asking:
            self.skipped = True

    def reveal(self, verdict: Any = None, skipped: bool = False, note: str = "") -> None:
        """Show the results, with the verdict (agreed, observed_direction, explanation, numbers)."""
        m = self.messages
        parts, kind, text = [], "skipped", ""
        if verdict is not None and not skipped:
            kind = "agreed" if verdict.agreed else "disagreed"
            text = m[kind]
            chosen = self._labels.get(verdict.numbers["chosen"], verdict.numbers["chosen"])
            observed = self._labels.get(verdict.observed_direction, verdict.observed_direction)
            parts.append(f'<p class="gate-headline">{"✓" if verdict.agreed else "✗"} '
                         f"{html.escape(text)}</p>"
                         f'<p class="gate-note">You predicted: {html.escape(chosen)}. '
                         f"Measured: {html.escape(observed)}.</p>")
        if note:
            parts.append(f'<p class="gate-note">{html.escape(note)}</p>')
            text = (text + " " + note).strip()
        if verdict is not None:
            parts.append(numbers_html(verdict.numbers))
            parts.append(f"<p>{html.escape(verdict.explanation)}</p>")
        self.verdict_pane.object = (
            f'<div class="gate-box gate-verdict {kind}" role="status" aria-live="polite">'
            + "".join(parts) + "</div>") if parts else ""
        self.idle_pane.visible = not parts
        self.param.update(asking=False, revealed=True, verdict_text=text)

    def cover(self, viewable: Any) -> pn.Column:
        """`viewable` behind the gate: a placeholder shows instead while the result is hidden."""
        placeholder = pn.pane.HTML(
            f'<div class="gate-cover">{html.escape(self.messages.get("placeholder", ""))}</div>',
            stylesheets=[CSS], sizing_mode="stretch_width", css_classes=["gate-placeholder"],
            visible=self.param.revealed.rx.not_())
        return pn.Column(placeholder,
                         pn.Column(viewable, visible=self.param.revealed,
                                   sizing_mode="stretch_width", css_classes=["gate-covered"]),
                         sizing_mode="stretch_width", css_classes=["gate-cover-area"])

    def _on_option(self, event: Any) -> None:
        self.commit_button.disabled = event.new is None or self.choice is not None

    def _show_committed(self, locked: bool) -> None:
        """Lock the radio buttons once a choice is in, and say that the result is on its way."""
        self.options.disabled = locked
        self.commit_button.disabled = locked or self.options.value is None
        self.commit_button.label = "Prediction committed" if locked else "Commit prediction"
        if locked:
            self.verdict_pane.object = (f'<p class="gate-note" role="status">'
                                        f'{html.escape(self.messages["committed"])}</p>')
