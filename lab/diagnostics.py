"""A read-only JSON view of what one server process holds, for load and churn checks.

Served only when asked for: `panel serve lab/app.py --plugins lab.diagnostics` adds GET /diagnostics
(under --prefix if one is set). It reports counts only (sessions, threads, periodic callbacks, the
engine queue, the classroom hub, resident memory): no session ids, no query strings, no token.
`?deep=1` also collects garbage and counts the live per-session objects, to catch leaks; that walks
the whole heap, so it is for tests, not for polling. `gc` reports the garbage collector's pauses
since the plugin loaded: a collection of the oldest generation walks every live object, and while
it runs the event loop serves no session.
"""
from __future__ import annotations

import gc
import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import panel as pn
from tornado.web import RequestHandler

from engine.cpu_threads import blas_threads
from lab import shared


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Threads and resident memory (kB) of a process, from /proc/PID/status (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def thread_names() -> dict[str, int]:
    """Live Python threads grouped by name, with pool and counter suffixes removed."""
    return dict(Counter(re.sub(r"([-_]\d+)+$", "", t.name) for t in threading.enumerate()))


class GcPauses:
    """Count and time the garbage collector's passes, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._start: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            g, took = info["generation"], time.perf_counter() - self._start
            self.count[g] += 1
            self.total_s[g] += took
            self.max_s[g] = max(self.max_s[g], took)
            self._start = None

    def stats(self) -> dict:
        out = {f"gen{g}": {"count": self.count[g], "total_s": round(self.total_s[g], 3),
                           "max_s": round(self.max_s[g], 3)} for g in range(3)}
        out["frozen_objects"] = gc.get_freeze_count()  # lab/gc_policy.py keeps pages out of sight
        return out


GC_PAUSES = GcPauses()
gc.callbacks.append(GC_PAUSES)


def live_objects() -> dict[str, int]:
    """How many per-session objects are still alive after a full collection."""
    # Imported here, not at plugin load: the page's modules belong to the app's sessions.
    from lab.classroom_view import PresenterBar, StudentBar
    from lab.demo import DemoController
    from lab.state import LabState
    from lab.gc_policy import reclaim
    kinds = (LabState, DemoController, StudentBar, PresenterBar)
    reclaim()  # a full collection over the unfrozen heap: closed pages are really gone
    counts = Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds))
    return {k.__name__: counts.get(k.__name__, 0) for k in kinds}


def periodic_callbacks(server=None) -> int:
    """Running periodic callbacks: Panel's, plus those added on sessions' documents directly."""
    from bokeh.server.callbacks import PeriodicCallback
    count = sum(cb.running for cbs in pn.state._periodic.values() for cb in cbs)
    for path in (server.app_paths if server else ()):
        for session in server.get_sessions(path):
            count += sum(isinstance(cb, PeriodicCallback)
                         for cb in session.document.session_callbacks)
    return count


def snapshot(server=None, deep: bool = False) -> dict:
    """Everything the endpoint reports; `server` is the BokehTornado application, if any."""
    sessions = {path: len(server.get_sessions(path)) for path in server.app_paths} if server else {}
    status = proc_status()
    out = {
        "sessions": sum(sessions.values()), "sessions_by_app": sessions,
        "threads": status["Threads"], "python_threads": thread_names(),
        "rss_kb": status["VmRSS"], "peak_rss_kb": status["VmHWM"],
        "periodic_callbacks": periodic_callbacks(server),
        "panel_views": len(pn.state._views),
        "service": shared.service().stats(),
        "classroom": shared.classroom().stats(),
        "gc": GC_PAUSES.stats(),
        "blas_threads": blas_threads(),  # LAB_CPU_THREADS, once the first page has loaded
    }
    if deep:
        out["live_objects"] = live_objects()
    return out


class DiagnosticsHandler(RequestHandler):
    """GET /diagnostics: the snapshot as JSON."""

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        deep = self.get_argument("deep", "") == "1"
        self.write(json.dumps(snapshot(self.application, deep=deep)))


ROUTES = [(r"/diagnostics", DiagnosticsHandler, {})]  # what `panel serve --plugins` reads
