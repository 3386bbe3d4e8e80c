"""One periodic callback per browser session: the only way news from other threads reaches a page.

Runs stream from the engine server on a client thread and the classroom's state changes in another
process, but Bokeh models may only change on the session's own event loop. So nothing outside the
loop touches the page: threads leave what they learned in plain Python state (a `RunState` buffer,
the classroom client's latest view), and this session's `Ticker` calls its registered functions on
the loop every `period_ms`. Each function compares what it last showed with what is there now and
does nothing when they match, so an idle tick costs a few attribute reads. The period is also the
live-update throttle: a run's steps reach the plots at most once a period.

Without a server (tests, a notebook cell) no callback is scheduled; `tick()` runs the functions
once, so a test drives the page one tick at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import panel as pn

from widgets.base import served

log = logging.getLogger(__name__)


class Ticker:
    """The session's clock: `every(fn)` registers fn, called on the session's loop each period."""

    def __init__(self, period_ms: int) -> None:
        self.period_ms = period_ms
        self._functions: list[Callable[[], None]] = []
        self._callback = None
        if served():
            self._callback = pn.state.add_periodic_callback(self.tick, period=period_ms)

    def every(self, fn: Callable[[], None]) -> None:
        self._functions.append(fn)

    def tick(self) -> None:
        for fn in list(self._functions):
            try:
                fn()
            except Exception:  # one broken panel must not stop the others' updates
                log.exception("tick function %s failed", getattr(fn, "__qualname__", fn))

    def stop(self) -> None:
        if self._callback is not None:
            self._callback.stop()
            self._callback = None
