"""The classroom bars: a presenter bar for the instructor, a follow-and-poll bar for students.

`attach_classroom` picks the bar from the page's query: `?instructor=TOKEN` with the server's token
gives the presenter bar; anything else gives the student bar (a wrong token looks exactly like no
token). Without LAB_INSTRUCTOR_TOKEN on the engine server there is no bar at all. Each bar joins
the class through the process's `Classroom` client and registers with the session's ticker: once a
period, on the session's own loop, it reads the client's newest view and redraws widgets and Bokeh
sources if the class changed since its last draw. It leaves the class when the session ends.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import panel as pn
from bokeh.models import ColumnDataSource, FactorRange

from engine.metrics import Summary, summarize
from lab import shared
from lab.classroom import Classroom, ClassroomError, ClassView, Presenter
from lab.content import Content
from lab.demo import DemoController
from lab.prediction import grade, metric_value
from widgets.base import served
from widgets.style import MET, fmt_num, fmt_value, make_figure, plot_pane


@dataclass(frozen=True)
class Baseline:
    """The instructor's measured run when the poll opened: the setting and the graded metric."""

    control: str
    setting: Any  # a number, or an option name for mix and policy
    metric: float


class _Bar(pn.viewable.Viewer):
    """Joins the class, redraws from the session's ticker when the class changed, and leaves."""

    def __init__(self, demo: DemoController, hub: Classroom, **params) -> None:
        super().__init__(**params)
        self.demo, self.hub, self.session = demo, hub, demo.session
        self.drawn: tuple[str, int] | None = None  # (hub, serial) of the view drawn last
        self.layout: pn.Column
        demo.ticker.every(self.tick)

    def __panel__(self) -> pn.Column:
        return self.layout

    def tick(self) -> None:
        """Once a period, on the session's loop: redraw if the class moved since the last draw."""
        view = self.hub.view()
        if (view.hub, view.serial) != self.drawn:
            self.draw(view)

    def draw(self, view: ClassView) -> None:
        self.drawn = (view.hub, view.serial)
        self.refresh(view)

    def refresh(self, view: ClassView) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """The session ended: leave the class so the counts drop."""
        self.hub.leave(self.session)


class PresenterBar(_Bar):
    """Broadcast, poll, live histogram of committed predictions, reveal."""

    def __init__(self, demo: DemoController, presenter: Presenter, content: Content) -> None:
        super().__init__(demo, presenter.hub)
        self.presenter, self.content = presenter, content
        self.baseline: Baseline | None = None
        controls = [c["control"] for c in content.predictions["controls"]]
        self.control = pn.widgets.Select(label="Poll on the change of", options=controls,
                                         value=controls[0], width=170)
        demo.state.param.watch(self._on_control_moved, controls)
        buttons = {
            "broadcast": ("Broadcast my settings", "primary", "Every following student's sliders "
                          "take your values", self._broadcast),
            "poll": ("Open poll on this change", "warning", "Ask the class to predict the effect "
                     "of moving the chosen control", self._open_poll),
            "reveal": ("Reveal to everyone", "success", "Broadcast your settings and show the "
                       "measured result to every student", self._reveal),
            "end": ("End class session", "light", "Hide the classroom bar from students",
                    presenter.end),
        }
        self.buttons = {}
        for key, (label, kind, description, action) in buttons.items():
            b = pn.widgets.Button(label=label, color=kind, description=description,
                                  css_classes=[f"{key}-button"])
            b.on_click(lambda _e, act=action: self._act(act))
            self.buttons[key] = b
        self.status = pn.pane.Markdown("", css_classes=["presenter-status"], margin=(0, 10))
        self.message = pn.pane.Markdown("", css_classes=["presenter-message"], margin=(0, 10))
        self.counts = pn.pane.Markdown("", css_classes=["poll-counts"], margin=(0, 10),
                                       sizing_mode="stretch_width")
        first = content.prediction(controls[0])["choices"]
        self.source = ColumnDataSource(data={"label": [c["label"] for c in first],
                                             "count": [0] * len(first)})
        self.fig = make_figure("Class predictions", "students who committed", "", height=200,
                               y_range=FactorRange(factors=list(self.source.data["label"])))
        self.fig.hbar(y="label", right="count", source=self.source, height=0.7, color=MET)
        self.fig.x_range.start = 0
        self.layout = pn.Column(
            pn.pane.Markdown("**Presenter**", margin=(0, 10)), self.status,
            pn.FlexBox(self.buttons["broadcast"], self.control, self.buttons["poll"],
                       self.buttons["reveal"], self.buttons["end"], gap="6px",
                       align_items="flex-end"),
            self.message, plot_pane(self.fig, css_classes=["poll-histogram"]),
            self.counts, sizing_mode="stretch_width", css_classes=["classroom", "presenter-bar"],
            styles={"border": "2px solid #CC79A7", "border-radius": "6px", "padding": "4px"})
        self.draw(presenter.join(self.session))

    def _act(self, action) -> None:
        """A button's action, then a redraw; a hub that refused or is away says so here."""
        try:
            action()
        except ClassroomError as err:
            self.message.object = f"The class did not get that: {err}."
        self.tick()

    def _on_control_moved(self, *events) -> None:
        self.control.value = events[-1].name  # the poll asks about the control moved last

    def _broadcast(self) -> None:
        version = self.presenter.broadcast(self.demo.state.values())
        self.message.object = f"Broadcast {version} sent."

    def _summary(self) -> Summary | None:
        trace = self.demo.trace
        return None if trace is None else summarize(trace, self.demo.state.slo())

    def _open_poll(self) -> None:
        summary, key = self._summary(), self.demo.shown_key
        if summary is None or key is None:
            self.message.object = "Wait for your first measured run, then open the poll."
            return
        q = self.content.prediction(self.control.value)
        self.baseline = Baseline(q["control"], getattr(key, q["control"]),
                                 metric_value(summary, q["metric"]))
        self.presenter.open_poll(q["control"], q["question"],
                                 tuple((c["id"], c["label"]) for c in q["choices"]))
        self.message.object = (f"Poll open. Now move **{q['control']}**, wait for the measured "
                               "run, then reveal.")

    def _reveal(self) -> None:
        view, base, key = self.hub.view(), self.baseline, self.demo.shown_key
        if view.poll is None or base is None:
            self.message.object = "Open a poll first."
            return
        summary = self._summary()
        setting = None if key is None else getattr(key, base.control)
        if (summary is None or setting == base.setting or self.demo.run.status != "done"
                or key != self.demo.run_key()):
            self.message.object = (f"Move **{base.control}** away from {fmt_value(base.setting)} and "
                                   "wait until your run is measured, then reveal.")
            return
        self.presenter.broadcast(self.demo.state.values())
        self.presenter.reveal(self.result_text(view, base, setting, summary))
        self.message.object = "Result revealed to everyone."

    def result_text(self, view: ClassView, base: Baseline, setting: int,
                    summary: Summary) -> str:
        """The measured change in words: numbers, the grade, its explanation, the class's votes."""
        q = self.content.prediction(base.control)
        after = metric_value(summary, q["metric"])
        verdicts = {c["id"]: grade(base.control, base.setting, setting, base.metric, after, c["id"],
                                   self.content) for c in q["choices"]}
        observed = next(iter(verdicts.values()))
        label = next(c["label"] for c in q["choices"]
                     if c["direction"] == observed.observed_direction)
        right = sum(n for cid, n in view.votes.items() if cid in verdicts and verdicts[cid].agreed)
        change = f" ({(after - base.metric) / base.metric:+.0%})" if base.metric else ""
        return (f"Measured on {self.demo.trace.device}: {q['metric_label']} went from "
                f"{fmt_num(base.metric)} to {fmt_num(after)}{change} as {base.control} moved from "
                f"{fmt_value(base.setting)} to {fmt_value(setting)}. That counts as "
                f"\u201c{label}\u201d. {right} of {view.committed()} committed predictions said so."
                f"\n\n{observed.explanation}")

    def refresh(self, view: ClassView) -> None:
        self.status.object = (f"{view.members} student(s) here, {view.followers} following; "
                              f"broadcasts sent: {view.version}.")
        self.counts.object = poll_text(view)
        if view.poll is not None:
            labels = [label for _, label in view.poll.choices]
            if list(self.fig.y_range.factors) != labels:
                self.fig.y_range.factors = labels
            self.source.data = {"label": labels,
                                "count": [view.votes.get(cid, 0) for cid, _ in view.poll.choices]}


def poll_text(view: ClassView) -> str:
    """The histogram's text equivalent."""
    if view.poll is None:
        return "No poll is open."
    parts = "; ".join(f"{label}: {view.votes.get(cid, 0)}" for cid, label in view.poll.choices)
    state = "revealed" if view.revealed else "open"
    return (f"Poll on {view.poll.control} ({state}): {view.committed()} of {view.members} "
            f"student(s) committed. {parts}.")


class StudentBar(_Bar):
    """Follow the instructor (on by default), commit a prediction, read the revealed result."""

    def __init__(self, demo: DemoController, hub: Classroom, content: Content) -> None:
        super().__init__(demo, hub)
        self._applied: tuple[str, int] | None = None  # (hub, version) of the last broadcast applied
        self._poll_number = 0
        self.follow = pn.widgets.Switch(label="Follow the instructor", value=True,
                                        css_classes=["follow-switch"], width=50)
        self.follow_text = pn.pane.Markdown("", css_classes=["follow-text"], margin=(0, 10))
        self.question = pn.pane.Markdown("", css_classes=["poll-question"], margin=(0, 10))
        self.choices = pn.widgets.RadioBoxGroup(options={}, css_classes=["poll-choices"])
        self.commit = pn.widgets.Button(label="Commit prediction", color="primary",
                                        css_classes=["poll-commit"])
        self.committed = pn.pane.Markdown("", css_classes=["poll-committed"], margin=(0, 10))
        self.result = pn.pane.Alert("", alert_type="info", visible=False,
                                    css_classes=["poll-result"], sizing_mode="stretch_width")
        self.poll_box = pn.Column(self.question, self.choices, self.commit, self.committed,
                                  visible=False, sizing_mode="stretch_width")
        self.follow.param.watch(self._on_follow, "value")
        self.commit.on_click(lambda _e: self._commit())
        self.layout = pn.Column(
            pn.Row(self.follow, pn.pane.Markdown("**Follow the instructor**", margin=(0, 4)),
                   self.follow_text),
            self.poll_box, self.result, visible=False, sizing_mode="stretch_width",
            css_classes=["classroom", "student-bar"])
        self.draw(hub.join(self.session, following=True))

    def _on_follow(self, event) -> None:
        if event.new:
            self._applied = None  # catch up with the instructor's latest settings
        self.draw(self.hub.follow(self.session, event.new))

    def _commit(self) -> None:
        if self.choices.value is not None:
            self.hub.commit(self.session, self.choices.value)
        self.draw(self.hub.view())  # this session's own choice is not in the shared view

    def refresh(self, view: ClassView) -> None:
        self.layout.visible = view.active
        if self.follow.value and view.values and (view.hub, view.version) != self._applied:
            self._applied = (view.hub, view.version)
            self.demo.state.apply(dict(view.values))
        self.follow_text.object = ("your sliders move when the instructor broadcasts."
                                   if self.follow.value else
                                   "you explore on your own; switch on to rejoin the class.")
        poll = view.poll
        self.poll_box.visible = poll is not None
        if poll is not None and poll.number != self._poll_number:
            self._poll_number = poll.number
            self.question.object = f"**Predict:** {poll.question}"
            self.choices.param.update(options={label: cid for cid, label in poll.choices},
                                      value=None)
        mine = self.hub.committed_choice(self.session) if poll is not None else None
        closed = mine is not None or view.revealed
        self.choices.disabled = self.commit.disabled = closed
        labels = dict(poll.choices) if poll is not None else {}
        self.committed.object = (f"You predicted: {labels[mine]}." if mine is not None else
                                 "The poll closed before you committed." if view.revealed else "")
        self.result.param.update(object=view.result, visible=view.revealed)


def presenter_bar(demo: DemoController, presenter: Presenter, content: Content) -> PresenterBar:
    return PresenterBar(demo, presenter, content)


def student_bar(demo: DemoController, hub: Classroom, content: Content) -> StudentBar:
    return StudentBar(demo, hub, content)


def attach_classroom(demo: DemoController, content: Content, query: Mapping[str, str],
                     hub: Classroom | None = None) -> _Bar | None:
    """The bar this session shows (None when instructor mode is off); it leaves the class when the
    session is destroyed."""
    hub = hub if hub is not None else shared.classroom()
    if not hub.enabled:
        return None
    presenter = hub.presenter(query.get("instructor"))
    bar = (presenter_bar(demo, presenter, content) if presenter is not None
           else student_bar(demo, hub, content))
    if served():
        pn.state.on_session_destroyed(lambda _ctx: bar.close())
        if presenter is not None:
            pn.state.onload(hide_token)
    return bar


def hide_token() -> None:
    """Drop the token from the presenter's address bar, which a projector would show the class."""
    location = pn.state.location
    if location is not None:
        rest = {k: v for k, v in location.query_params.items() if k != "instructor"}
        location.search = "?" + urlencode(rest) if rest else ""
