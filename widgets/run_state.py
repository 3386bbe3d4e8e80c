"""Where one session's run stands, as param parameters the plots depend on.

The demo's controller sets these, once per tick of the session's ticker, from the events the
engine server streamed; it never calls a plot. Each plot declares what it follows
(`widgets.base.PlotComponent`): `cleared` empties it for a new run, `new_steps` streams the steps of
the last tick, `summary` (set together with `trace` and `slo`) draws a finished run whole.
"""
from __future__ import annotations

import param

from engine.config import SLO
from engine.metrics import Summary
from engine.records import Trace
from widgets.style import RunInfo

STATUSES = ("idle", "queued", "running", "done", "refused", "failed")


class RunState(param.Parameterized):
    """One session's latest run: its status and what it measured so far."""

    status = param.Selector(default="idle", objects=list(STATUSES),
                            doc="Where the latest run stands")
    notice = param.String(default="", doc="Why the latest run did not run or failed")
    queue_position = param.Integer(default=0, bounds=(0, None),
                                   doc="Runs ahead of this one in the engine server's queue")
    steps_done = param.Integer(default=0, bounds=(0, None), doc="Steps streamed so far")
    cleared = param.Event(doc="A new run started: plots drawn from steps start empty")
    info = param.ClassSelector(class_=RunInfo, default=None,
                               doc="The running run's cache shape, for the step plots")
    new_steps = param.List(default=[], doc="Steps that arrived since the last tick, in order")
    trace = param.ClassSelector(class_=Trace, default=None, doc="The finished run shown")
    slo = param.ClassSelector(class_=SLO, default=None, doc="The targets it is judged against")
    summary = param.ClassSelector(class_=Summary, default=None,
                                  doc="Its metrics under `slo`; set last, so plots draw once")
