"""One periodic callback per browser session: the only way news from other threads reaches a page.

Runs stream from the engine server on a client thread and the classroom's state changes in another
process, but Bokeh models may only change on the session's own event loop. So nothing outside the
loop touches the page: threads leave what they learned in plain Python state (a `RunState` buffer,
the classroom client's latest view), and this session's `Ticker` calls its registered functions on
the loop every `period_ms`. Each function compares what it last showed with what is there now and
does nothing when they match, so an idle tick costs a few attribute reads. The period is also the
live-update throttle: a run's steps reach the plots at most once a period.

The callback is the session document's own (`Document.add_periodic_callback`, Bokeh's public API),
not Panel's `pn.state.add_periodic_callback`: Panel's wrapper marks the whole process busy and idle
again on every call, and with ten idle sessions ticking four times a second that cost 2.0 s of
server CPU in 20 s, against 0.11 s for the document's own (`panel serve` on the 2-core box, every
setting cached, 2026-11-30). At forty students that is 40% of a core for nothing.

Without a server (tests, a notebook cell) no callback is scheduled; `tick()` runs the functions
once, so a test drives the page one tick at a time.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import panel as pn

from widgets.base import served

log = logging.getLogger(__name__)


@contextmanager
def recount_models_once() -> Iterator[None]:
    """Changes made inside count the session document's models once, at the end.

    Bokeh answers every change that carries models (a pane's new HTML with its stylesheets, new
    children) by walking the whole document, about a thousand models here, to recount them. A
    finished run updates about fifteen panes, so a session's first run cost 63 walks, 18 of the
    33 s of server CPU that three sessions took (cProfile of build, first run and sweeps against a
    running engine server, 2-core box, 2026-11-30). Bokeh's public `Document.models.freeze()`
    defers the walks to one at the end; it is used only around work that changes something,
    since it always walks once when it ends. Outside a served session it does nothing.
    """
    if not served():
        yield
        return
    freeze = pn.state.curdoc.models.freeze()
    freeze.__enter__()
    try:
        yield
    finally:  # Bokeh's freeze has no finally of its own: leave it even when the work raised
        freeze.__exit__(None, None, None)


class Ticker:
    """The session's clock: `every(fn)` registers fn, called on the session's loop each period."""

    def __init__(self, period_ms: int) -> None:
        self.period_ms = period_ms
        self._functions: list[Callable[[], None]] = []
        self._callback = None
        self._doc = None
        if served():
            self._doc = pn.state.curdoc
            self._callback = self._doc.add_periodic_callback(self.tick, period_ms)

    def every(self, fn: Callable[[], None]) -> None:
        self._functions.append(fn)

    def tick(self) -> None:
        for fn in list(self._functions):
            try:
                fn()
            except Exception:  # one broken panel must not stop the others' updates
                log.exception("tick function %s failed", getattr(fn, "__qualname__", fn))

    def stop(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            try:
                self._doc.remove_periodic_callback(callback)
            except ValueError:  # the session already dropped its callbacks
                pass
