"""A read-only JSON view of what one server process holds, for load and churn checks.

A Panel plugin, served only when asked for: `PYTHONPATH=. panel serve lab/app.py --plugins
tools.diagnostics` (or `python -m lab --plugins tools.diagnostics`) adds GET /diagnostics to a page
process (under --prefix if one is set). It reports counts only (sessions, threads, periodic
callbacks, resident memory, and, once a page has connected this process to the engine server, the
server's run queue and this process's view of the classroom): no session ids, no query strings, no
token. `?deep=1` also collects garbage and counts the live
per-session objects, documents and running periodic callbacks, to catch leaks; that walks the whole
heap, so it is for tests, not for polling. `gc` reports the garbage collector's pauses since the
endpoint was first asked: a collection of the oldest generation walks every live object, and while
it runs the event loop serves no session.

Everything is read through public API (Bokeh's server sessions and their documents, `gc`, /proc);
nothing here reads Panel's private registries, so a Panel release cannot silently change a count.
"""
from __future__ import annotations

import gc
import json
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from tornado.web import RequestHandler

from lab import shared
from lab.engine_client import EngineUnavailable
from tools.gc_policy import full_collect


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
    """Count and time the garbage collector's passes, per generation, once `watch` is called."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._start: float | None = None

    def watch(self) -> None:
        """Start timing the collector's passes (gc.callbacks); calling it again changes nothing."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

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
        out["frozen_objects"] = gc.get_freeze_count()  # tools/gc_policy.py keeps pages out of sight
        return out


def heap_counts() -> dict:
    """After a full collection: the per-session objects still alive, and the Bokeh documents and
    running Panel periodic callbacks alive, per-session or not (Panel keeps one of its own)."""
    # Imported here, not at plugin load: the page's modules belong to the app's sessions.
    from bokeh.document import Document
    from panel.io.callbacks import PeriodicCallback
    from lab.classroom_view import PresenterBar, StudentBar
    from lab.demo import DemoController
    from lab.state import LabState
    full_collect()  # frozen pages included: closed pages are really gone
    objects = gc.get_objects()
    kinds = (LabState, DemoController, StudentBar, PresenterBar)
    # A callback started outside any session, or left running after one, is found only here.
    return {"live_objects": {k.__name__: sum(isinstance(o, k) for o in objects) for k in kinds},
            "documents": sum(isinstance(o, Document) for o in objects),
            "running_periodic_callbacks": sum(isinstance(o, PeriodicCallback) and o.running
                                              for o in objects)}


def periodic_callbacks(server=None) -> int:
    """Periodic callbacks on the live sessions' documents (Panel's session-scoped ones included)."""
    from bokeh.server.callbacks import PeriodicCallback
    return sum(isinstance(cb, PeriodicCallback)
               for path in (server.app_paths if server else ())
               for session in server.get_sessions(path)
               for cb in session.document.session_callbacks)


def engine_queue() -> dict | None:
    """The engine server's run queue (its GET /lab/info), or None before any page of this process
    made the engine client (asking would start an engine server) or when the server is gone."""
    if shared.engine_client.cache_info().currsize == 0:
        return None
    try:
        return shared.engine_client().get_json("/lab/info")["queue"]
    except EngineUnavailable:
        return None


def classroom() -> dict | None:
    """This process's view of the classroom hub, or None before any page made the client."""
    if shared.classroom.cache_info().currsize == 0:
        return None
    return shared.classroom().stats()  # a hub out of reach reads as no class, not an error


def snapshot(server=None, deep: bool = False, pauses: GcPauses | None = None) -> dict:
    """Everything the endpoint reports; `server` is the BokehTornado application, if any."""
    sessions = {path: len(server.get_sessions(path)) for path in server.app_paths} if server else {}
    status = proc_status()
    out = {
        "sessions": sum(sessions.values()), "sessions_by_app": sessions,
        "threads": status["Threads"], "python_threads": thread_names(),
        "rss_kb": status["VmRSS"], "peak_rss_kb": status["VmHWM"],
        "periodic_callbacks": periodic_callbacks(server),
        "engine_queue": engine_queue(),
        "classroom": classroom(),
        "gc": pauses.stats() if pauses else None,
        # The page process measures nothing: the engine server owns torch and the device.
        "torch_loaded": "torch" in sys.modules,
    }
    if deep:
        out.update(heap_counts())
    return out


class DiagnosticsHandler(RequestHandler):
    """GET /diagnostics: the snapshot as JSON."""

    def initialize(self, pauses: GcPauses) -> None:
        self.pauses = pauses

    def get(self) -> None:
        self.pauses.watch()  # from the first request on: loading the plugin changes nothing
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        deep = self.get_argument("deep", "") == "1"
        self.write(json.dumps(snapshot(self.application, deep=deep, pauses=self.pauses)))


# What `panel serve --plugins` reads; the one GcPauses is the endpoint's, shared by its requests.
ROUTES = [(r"/diagnostics", DiagnosticsHandler, {"pauses": GcPauses()})]
