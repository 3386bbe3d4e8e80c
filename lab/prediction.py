"""Predict before you see: grading a learner's guess against two measured runs, and the flow that
asks the question when a control moves and reveals the result once a guess is committed.

The grading (`grade`) is plain Python over numbers and `content.predictions`: no Panel, no engine.
`PredictionFlow` holds one session's round (which control moved, the run before, the guess) and
tells a view what to show; `attach_prediction_gate` connects it to a `DemoController` and to the
`PredictionGate` widget. Only that last function imports Panel code, and only when called.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lab.content import CONTROLS, Content, to_plain

if TYPE_CHECKING:  # the widget imports Panel; the grading must not
    from lab.demo import DemoController
    from widgets.prediction_gate import PredictionGate


@dataclass(frozen=True)
class Verdict:
    """The outcome of one prediction: whether it matched, what was measured and why."""

    agreed: bool
    observed_direction: str  # one of lab.content.DIRECTIONS
    explanation: str  # why the metric moves that way, from predictions.yaml
    numbers: Mapping[str, Any] = field(default_factory=dict)  # control, metric, before/after, change


def metric_value(summary: Any, metric: str) -> float:
    """The graded number of a run summary, by its predictions.yaml metric name."""
    getters = {
        "tpot_p50_ms": lambda s: s.tpot_ms.p50,
        "ttft_p50_ms": lambda s: s.ttft_ms.p50,
        "waste_tokens": lambda s: s.waste_tokens_peak,
        "kv_gb": lambda s: s.kv_bytes_peak / 1e9,
    }
    if metric not in getters:
        raise KeyError(f"unknown prediction metric {metric!r}")
    return float(getters[metric](summary))


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; from a zero baseline any rise is +inf and no change is 0."""
    if before == 0:
        return 0.0 if after == 0 else math.copysign(math.inf, after)
    return (after - before) / abs(before)


def direction(change: float, thresholds: Mapping[str, Any]) -> str:
    """Name a relative change (already in the raising sense) with the thresholds' four words."""
    flat, little = float(thresholds["flat_below"]), float(thresholds["little_below"])
    if change <= -flat:
        return "down"
    if change < flat:
        return "flat"
    return "up_little" if change < little else "up_lot"


def grade(control: str, before_value: float, after_value: float, before_metric: float,
          after_metric: float, choice: str, content: Content) -> Verdict:
    """Grade a choice (a choice id or a direction) for one control move against the measurements.

    The questions are about raising a control. When it was lowered, the move is read the other way
    round, from the lower setting's run to the higher one's, so the change is measured against the
    same base either way: 8 -> 16 and 16 -> 8 over the same two runs get mirror verdicts.
    """
    spec = content.prediction(control)
    chosen = next((c["direction"] for c in spec["choices"] if choice in (c["id"], c["direction"])),
                  None)
    if chosen is None:
        raise KeyError(f"control {control!r} has no choice {choice!r}")
    raw = relative_change(before_metric, after_metric)
    lowered = after_value < before_value
    graded = relative_change(after_metric, before_metric) if lowered else raw
    observed = direction(graded, content.predictions["thresholds"])
    numbers = {"control": control, "before_value": before_value, "after_value": after_value,
               "metric": spec["metric"], "metric_label": spec["metric_label"],
               "before": before_metric, "after": after_metric, "change": raw,
               "graded_change": graded, "lowered": lowered, "chosen": chosen}
    return Verdict(agreed=chosen == observed, observed_direction=observed,
                   explanation=spec["explanations"][observed], numbers=numbers)


RUN_KEYS = (*CONTROLS, "model")  # the settings that shape a run; SLOs only re-judge it


@dataclass(frozen=True)
class Question:
    """An open round: the control asked about, the run it is measured against, and the settings
    whose run will answer it."""

    control: str
    before_value: float
    after_value: float
    before_metric: float
    target: Mapping[str, Any]  # the run-shaping settings of the run that answers the question
    skipped: bool = False  # the learner chose to see the result without a guess


def run_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The run-shaping part of the controls' values."""
    return {k: values[k] for k in RUN_KEYS}


def pick_control(before: Mapping[str, Any],
                 after: Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """The control a question should be about (the one that moved most, by ratio) and the others
    that moved with it; None when nothing moved or the model changed (no question fits)."""
    moved = [c for c in CONTROLS if before[c] != after[c]]
    if not moved or before["model"] != after["model"]:
        return None
    ratio = {c: abs(math.log(max(after[c], 1e-9) / max(before[c], 1e-9))) for c in moved}
    control = max(moved, key=lambda c: ratio[c])
    return control, tuple(c for c in moved if c != control)


class PredictionFlow:
    """One session's prediction rounds, driving a gate view (anything with the gate's methods).

    `baseline` is the last finished run (settings, summary): questions compare against it. A round
    closes when both the run for its settings and the learner's choice (or a skip) are in.
    """

    def __init__(self, content: Content, gate: "PredictionGate") -> None:
        self.content = content
        self.gate = gate
        self.baseline: tuple[dict[str, Any], Any] | None = None
        self.last_trace: Any = None
        self.question: Question | None = None
        self.result: Any = None  # the summary of the run that answers the open question
        gate.param.watch(lambda *_: self._settle(), ["choice"])
        gate.param.watch(self._on_skip, ["skipped"])

    def controls_changed(self, values: Mapping[str, Any]) -> None:
        """The learner moved controls: ask about the change from the last finished run."""
        settings = run_settings(values)
        q = self.question
        if q is not None and self.result is not None and dict(q.target) == settings:
            return  # its run already finished (a cached result can arrive before this call)
        self.result = None
        if self.baseline is not None and not self._open(settings):
            self.gate.reveal()

    def run_finished(self, values: Mapping[str, Any], trace: Any, summary: Any) -> None:
        """A run was drawn: a new trace answers the open round, or opens and answers one."""
        if trace is self.last_trace:
            return  # the same run redrawn (an SLO change): nothing new to grade
        self.last_trace = trace
        settings = run_settings(values)
        q = self.question
        opened = q is not None and dict(q.target) == settings
        if not opened and (self.baseline is None or not self._open(settings)):
            self.question = None
            self.baseline = (settings, summary)
            self.gate.reveal()  # the first run, or a run no question fits: show it at once
            return
        self.result = summary
        self.baseline = (settings, summary)
        self._settle()

    def run_stopped(self) -> None:
        """The change was refused or failed: there is no new measurement to grade."""
        if self.question is not None:
            self.question, self.result = None, None
            self.gate.reveal(note=self.content.after["gate"]["no_result"])

    def _open(self, settings: dict[str, Any]) -> bool:
        """Ask about the move from the baseline to `settings`; False when no question fits."""
        before, summary = self.baseline
        picked = pick_control(before, settings)
        if picked is None:
            self.question = None
            return False
        control, others = picked
        spec = self.content.prediction(control)
        old = self.question
        lowered = settings[control] < before[control]
        keep = (old is not None and old.control == control
                and (old.after_value < old.before_value) == lowered)
        self.question = Question(control, before[control], settings[control],
                                 metric_value(summary, spec["metric"]), settings)
        self.gate.ask(spec, before[control], settings[control], others, keep_choice=keep)
        return True

    def _on_skip(self, event: Any) -> None:
        if not event.new or self.question is None:
            return
        self.question = replace(self.question, skipped=True)
        if self.result is None:  # show the run as it streams; its numbers follow when it ends
            self.gate.reveal(note=self.content.after["gate"]["skipped"])
        else:
            self._settle()

    def _settle(self) -> None:
        """Reveal once both the new run and the learner's choice (or a skip) are in."""
        q, summary = self.question, self.result
        if q is None or summary is None or (self.gate.choice is None and not q.skipped):
            return
        skipped = q.skipped
        spec = self.content.prediction(q.control)
        verdict = grade(q.control, q.before_value, q.after_value, q.before_metric,
                        metric_value(summary, spec["metric"]),
                        self.gate.choice or spec["choices"][0]["id"], self.content)
        self.question, self.result = None, None
        self.gate.reveal(verdict=verdict, skipped=skipped,
                         note=self.content.after["gate"]["skipped"] if skipped else "")


def attach_prediction_gate(demo: "DemoController", content: Content) -> "PredictionGate":
    """Build a gate for this session's demo and wire it: control moves ask, finished runs answer."""
    from widgets.prediction_gate import PredictionGate  # Panel, so only when a page is built

    gate = PredictionGate(messages=to_plain(content.after["gate"]))
    flow = PredictionFlow(content, gate)
    state = demo.state

    def shown_settings() -> dict[str, Any]:
        key = demo.shown_key  # the run being drawn, which may lag the sliders
        return {"model": key.model, "batch": key.batch, "context": key.context,
                "page": key.page, "output": key.output}

    def on_controls(*_events: Any) -> None:
        flow.controls_changed(state.values())
        if state.status == "refused":  # the demo refused before this watcher ran
            flow.run_stopped()

    state.param.watch(on_controls, list(RUN_KEYS))
    state.param.watch(lambda e: flow.run_stopped() if e.new == "failed" else None, ["status"])
    demo.listeners.append(lambda trace, summary: flow.run_finished(shown_settings(), trace,
                                                                   summary))
    gate.flow = flow  # tests and the page reach the round through the gate
    return gate
