"""Predict before you see: grading a learner's guess against two measured runs, and the flow that
asks the question when a control moves and reveals the result once a guess is committed.

The grading (`grade`) is plain Python over numbers and `content.predictions`: no Panel, no engine.
`PredictionFlow` holds one session's round (which control moved, the run before, the guess) and
tells a view what to show; `attach_prediction_gate` connects it to a `DemoController` and to the
`PredictionGate` widget. Only that last function imports Panel code, and only when called.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.metrics import summarize
from lab.content import CONTROLS, Content, to_plain
from lab.runs import RunKey

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
        "tpot_p90_ms": lambda s: s.tpot_ms.p90,
        "ttft_p50_ms": lambda s: s.ttft_ms.p50,
        "ttft_p90_ms": lambda s: s.ttft_ms.p90,
        "waste_tokens": lambda s: s.waste_tokens_peak,
        "kv_gb": lambda s: s.kv_bytes_peak / 1e9,
        "throughput_tok_s": lambda s: s.throughput_tok_s,
        "duration_s": lambda s: s.duration_s,
    }
    if metric not in getters:
        raise KeyError(f"unknown prediction metric {metric!r}")
    return float(getters[metric](summary))


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; from a zero baseline any rise is +inf and no change is 0."""
    if before == 0:
        return 0.0 if after == 0 else math.copysign(math.inf, after)
    return (after - before) / abs(before)


def spread(values: list[float]) -> float | None:
    """Run-to-run spread of repeated measurements of one setting: (max - min) / median, or None
    with fewer than two."""
    if len(values) < 2:
        return None
    ordered = sorted(values)
    middle = ordered[len(ordered) // 2] if len(ordered) % 2 else sum(
        ordered[len(ordered) // 2 - 1:len(ordered) // 2 + 1]) / 2
    return (ordered[-1] - ordered[0]) / abs(middle) if middle else None


def direction(change: float, thresholds: Mapping[str, Any], noise: float | None = None) -> str:
    """Name a relative change (already in the raising sense) with the thresholds' four words. With
    a measured `noise` (the settings' run-to-run spread) a change inside it is flat; without one,
    the fixed `flat_below` stands in."""
    flat = float(thresholds["flat_below"]) if noise is None else noise
    little = max(float(thresholds["little_below"]), flat)
    if change <= -flat:
        return "down"
    if change < flat:
        return "flat"
    return "up_little" if change < little else "up_lot"


def grade(control: str, before_value: float, after_value: float, before_metric: float,
          after_metric: float, choice: str, content: Content,
          noise: float | None = None) -> Verdict:
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
    lowered = setting_number(control, after_value) < setting_number(control, before_value)
    graded = relative_change(after_metric, before_metric) if lowered else raw
    observed = direction(graded, content.predictions["thresholds"], noise)
    numbers = {"control": control, "before_value": before_value, "after_value": after_value,
               "metric": spec["metric"], "metric_label": spec["metric_label"],
               "before": before_metric, "after": after_metric, "change": raw,
               "graded_change": graded, "lowered": lowered, "chosen": chosen,
               "noise": noise}
    return Verdict(agreed=chosen == observed, observed_direction=observed,
                   explanation=spec["explanations"][observed], numbers=numbers)


RUN_KEYS = (*CONTROLS, "model")  # the settings that shape a run; SLOs only re-judge it


@dataclass(frozen=True)
class Question:
    """An open round: the control asked about, the run it is measured against, and the settings
    whose run will answer it."""

    control: str
    before_value: Any  # a number, or an option's name for mix and policy
    after_value: Any
    before_metric: float
    target: Mapping[str, Any]  # the run-shaping settings of the run that answers the question
    base: Mapping[str, Any] = field(default_factory=dict)  # the settings it is measured against
    skipped: bool = False  # the learner chose to see the result without a guess


def run_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The run-shaping part of the controls' values."""
    return {k: values[k] for k in RUN_KEYS}


# Controls that take a name: their options in the order the questions call "raising".
ORDERED_CHOICES = {"mix": ("fixed", "mixed"), "policy": ("continuous", "static")}


def setting_number(control: str, value: Any) -> float:
    """A control's value on the scale its question reads as "raising": an option's place for the
    named controls, infinity for a rate of 0 (every request at once is the heaviest load)."""
    if control in ORDERED_CHOICES:
        return float(ORDERED_CHOICES[control].index(value) + 1)
    if control == "rate" and value == 0:
        return math.inf
    return float(value)


def pick_control(before: Mapping[str, Any],
                 after: Mapping[str, Any]) -> tuple[str, tuple[str, ...]] | None:
    """The control a question should be about (the one that moved most, by ratio) and the others
    that moved with it; None when nothing moved or the model changed (no question fits)."""
    moved = [c for c in CONTROLS if before[c] != after[c]]
    if not moved or before["model"] != after["model"]:
        return None

    def log_ratio(c: str) -> float:
        a, b = setting_number(c, after[c]), setting_number(c, before[c])
        if math.isinf(a) or math.isinf(b):
            return math.inf
        return abs(math.log(max(a, 1e-9) / max(b, 1e-9)))
    ratio = {c: log_ratio(c) for c in moved}
    control = max(moved, key=lambda c: ratio[c])
    return control, tuple(c for c in moved if c != control)


class PredictionFlow:
    """One session's prediction rounds, driving a gate view (anything with the gate's methods).

    `baseline` is the last finished run (settings, summary): questions compare against it. A round
    closes when both the run for its settings and the learner's choice (or a skip) are in.
    """

    def __init__(self, content: Content, gate: "PredictionGate",
                 noise_of: Callable[[Mapping[str, Any], str], float | None] | None = None) -> None:
        """`noise_of(settings, metric)` answers the run-to-run spread of a setting's metric (None
        until it was measured at least twice); without it the fixed flat threshold is used."""
        self.content = content
        self.gate = gate
        self.noise_of = noise_of
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

        def is_lowered(a: Any, b: Any) -> bool:
            return setting_number(control, b) < setting_number(control, a)
        lowered = is_lowered(before[control], settings[control])
        keep = (old is not None and old.control == control
                and is_lowered(old.before_value, old.after_value) == lowered)
        self.question = Question(control, before[control], settings[control],
                                 metric_value(summary, spec["metric"]), settings, dict(before))
        self.gate.ask(spec, before[control], settings[control], others, keep_choice=keep,
                      lowered=lowered)
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
                        self.gate.choice or spec["choices"][0]["id"], self.content,
                        noise=self._noise(q, spec["metric"]))
        self.question, self.result = None, None
        self.gate.reveal(verdict=verdict, skipped=skipped,
                         note=self.content.after["gate"]["skipped"] if skipped else "")


    def _noise(self, q: Question, metric: str) -> float | None:
        """The larger run-to-run spread of the two settings, of those measured at least twice."""
        if self.noise_of is None:
            return None
        spreads = [x for x in (self.noise_of(q.base, metric), self.noise_of(q.target, metric))
                   if x is not None]
        return max(spreads, default=None)


def attach_prediction_gate(demo: "DemoController", content: Content) -> "PredictionGate":
    """Build a gate for this session's demo and wire it: control moves ask, finished runs answer."""
    from widgets.prediction_gate import PredictionGate  # Panel, so only when a page is built

    gate = PredictionGate(messages=to_plain(content.after["gate"]))

    def noise_of(settings: Mapping[str, Any], metric: str) -> float | None:
        traces = demo.repeats(RunKey(**settings))
        return spread([metric_value(summarize(t), metric) for t in traces])

    flow = PredictionFlow(content, gate, noise_of)
    state = demo.state

    def shown_settings() -> dict[str, Any]:
        key = demo.shown_key  # the run being drawn, which may lag the sliders
        return {k: getattr(key, k) for k in RUN_KEYS}

    def on_controls(*_events: Any) -> None:
        flow.controls_changed(demo.run_key().to_json())  # as the run sees them
        if demo.run.status == "refused":  # the demo refused before this watcher ran
            flow.run_stopped()

    # Controls the engine behind the page does not take (an external endpoint's) ask nothing.
    state.param.watch(on_controls, [k for k in RUN_KEYS if k not in demo.fixed_controls])
    demo.run.param.watch(lambda e: flow.run_stopped() if e.new == "failed" else None, ["status"])
    demo.listeners.append(lambda trace, summary: flow.run_finished(shown_settings(), trace,
                                                                   summary))
    gate.flow = flow  # tests and the page reach the round through the gate
    return gate
