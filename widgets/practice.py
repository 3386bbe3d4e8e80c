"""The practice loop: a prompt to predict, hints revealed one at a time, and a rubric to check the
answer against. Exercises come from content/practice.yaml; the learner's answers stay in the
session's widgets only.
"""
from __future__ import annotations

import html
from typing import Any

import panel as pn
import param

CSS = """
.practice-prompt {font-size: 1.02rem; border-left: 4px solid #0072B2; padding: 4px 14px;}
.practice-hints {margin: 4px 0 4px 1.2em; padding: 0;}
.practice-hints li {margin: 3px 0;}
.practice-score {font-weight: 600;}
"""


class PracticeLoop(pn.viewable.Viewer):
    """Predict, take hints one by one, then tick the rubric items the answer meets."""

    items = param.List(default=[], doc="content/practice.yaml: prompt, hints, rubric per item.")
    index = param.Integer(default=0, bounds=(0, None), doc="The exercise shown.")
    hints_shown = param.Integer(default=0, bounds=(0, None), doc="Hints revealed so far.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.picker = pn.widgets.RadioButtonGroup.from_param(
            self.param.index, options={f"Exercise {i + 1}": i for i in range(len(self.items))},
            color="primary", variant="outline", label="Exercise", visible=len(self.items) > 1)
        self.prompt = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width")
        self.answer = pn.widgets.TextAreaInput(
            label="Your prediction and why", placeholder="Write it before you open a hint.",
            rows=4, sizing_mode="stretch_width", css_classes=["practice-answer"])
        self.hint_button = pn.widgets.Button(color="primary", variant="outline",
                                             css_classes=["practice-hint-button"])
        self.hint_button.on_click(lambda _e: self.show_hint())
        self.hints = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width",
                                  css_classes=["practice-hints-pane"])
        self.rubric = pn.widgets.CheckBoxGroup(options=[], value=[], inline=False,
                                               label="Rubric", css_classes=["practice-rubric"])
        self.score = pn.pane.HTML("", stylesheets=[CSS], sizing_mode="stretch_width")
        self.rubric.param.watch(lambda _e: self._score(), "value")
        self._answers: dict[int, str] = {}
        self._layout = pn.Column(
            self.picker, self.prompt, self.answer, self.hint_button, self.hints,
            pn.pane.Markdown("**Check your answer.** Tick what it really does:",
                             sizing_mode="stretch_width", margin=(10, 10, 0, 10)),
            self.rubric, self.score, sizing_mode="stretch_width", css_classes=["practice"],
            name="practice")
        self._load()

    def __panel__(self) -> pn.Column:
        return self._layout

    @property
    def item(self) -> Any:
        return self.items[min(self.index, len(self.items) - 1)]

    def show_hint(self) -> None:
        """Reveal the next hint, if one is left."""
        self.hints_shown = min(self.hints_shown + 1, len(self.item["hints"]))

    def visible_hints(self) -> list[str]:
        """The hints revealed so far, in order."""
        return list(self.item["hints"][:self.hints_shown])

    @param.depends("index", watch=True)
    def _load(self) -> None:
        """Show an exercise afresh: its prompt, no hints, an unticked rubric, its saved answer."""
        previous = getattr(self, "_shown", None)
        if previous is not None:
            self._answers[previous] = self.answer.value
        self._shown = self.index
        self.prompt.object = f'<p class="practice-prompt">{html.escape(self.item["prompt"])}</p>'
        self.answer.value = self._answers.get(self.index, "")
        self.rubric.param.update(options=list(self.item["rubric"]), value=[])
        self.hints_shown = 0
        self._hints()
        self._score()

    @param.depends("hints_shown", watch=True)
    def _hints(self) -> None:
        total = len(self.item["hints"])
        shown = self.visible_hints()
        self.hints.object = ('<ol class="practice-hints">' + "".join(
            f"<li>{html.escape(h)}</li>" for h in shown) + "</ol>") if shown else ""
        done = len(shown) >= total
        self.hint_button.label = (f"All {total} hints shown" if done
                                 else f"Show hint {len(shown) + 1} of {total}")
        self.hint_button.disabled = done

    def _score(self) -> None:
        total = len(self.item["rubric"])
        self.score.object = (f'<p class="practice-score">{len(self.rubric.value)} of {total} '
                             "rubric items met.</p>")
