"""Server sessions without a browser, for the load script: Bokeh's own websocket client.

Each one is a real session on the server (the app runs, its document lives there, every slider move
runs the demo's code and sends its patches back), driven from Python over Bokeh's protocol instead
of by a chromium page. A browser spends most of its CPU laying out and drawing; forty of them on the
server's own two cores starve the server they are meant to measure. These clients only decode the
patches, so one machine can play a class while most of its CPU stays with the server.

What a move measures: from setting the batch slider's value in the client's copy of the document
to the patch that puts a finished (not "updating") summary table into it, on the client's clock.
The browser's own drawing time is not included; the browser sessions of the same run give that.
"""
from __future__ import annotations

import asyncio
import importlib
import pkgutil
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit, urlunsplit

BATCH_TITLE = "Batch size"  # the batch slider's title starts so
TABLE_MARK = "summary-table"
CLIENT_RECURSION = 200_000
CLIENT_STACK_BYTES = 512 << 20  # virtual: only the pages a deep stack touches are ever used  # the summary table's class; "summary-table stale" while a run is on


def register_models() -> None:
    """Make every model class the lab's documents hold known to this process's Bokeh."""
    import panel.models

    for mod in pkgutil.iter_modules(panel.models.__path__):
        importlib.import_module(f"panel.models.{mod.name}")
    importlib.import_module("lab.page")  # the lab's own components define their models on import


@dataclass
class ProtocolTally:
    expected: int
    opened: int = 0
    latency_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    all_arrived: threading.Event = field(default_factory=threading.Event)
    _arrived: int = 0

    def error(self, session: int, what: str) -> None:
        with self.lock:
            self.errors.append(f"protocol session {session}: {what}")

    def arrived(self, opened: bool = False) -> None:
        """One session is done opening, or failed to."""
        with self.lock:
            self.opened += opened
            self._arrived += 1
            if self._arrived == self.expected:
                self.all_arrived.set()


def _finished_table(text: str) -> bool:
    return TABLE_MARK in text and f"{TABLE_MARK} stale" not in text


def run_session(i: int, url: str, moves: int, think_s: float, timeout_s: float,
                delay_s: float, seed: int, tally: ProtocolTally, go: threading.Event) -> None:
    """One session, in its own thread and event loop: open, wait for `go`, then `moves` moves."""
    from bokeh.client import pull_session

    asyncio.set_event_loop(asyncio.new_event_loop())  # bokeh's client runs the thread's loop
    time.sleep(delay_s)
    parts = urlsplit(url)  # a query (`?batch=1&...`) reaches the app as the session's arguments
    try:
        session = pull_session(url=urlunsplit(parts._replace(query="")),
                               arguments=dict(parse_qsl(parts.query)) or None)
    except Exception as err:  # refused or timed out: count it, the class goes on
        tally.error(i, f"open failed: {type(err).__name__}: {str(err)[:200]}")
        tally.arrived()
        return
    tally.arrived(opened=True)
    doc = session.document
    slider = next((m for m in doc.models if type(m).__name__ == "Slider"
                   and str(getattr(m, "title", "")).startswith(BATCH_TITLE)), None)
    tables = [m for m in doc.models if TABLE_MARK in str(getattr(m, "text", ""))]
    if slider is None or not tables:
        tally.error(i, "the page has no batch slider or summary table")
        session.close()
        return
    rng = random.Random(seed * 1000 + i)
    # The first move goes up, the next down, and so on: the settings the warm-up session ran.
    state = {"left": moves, "at": None, "step": -1, "deadline": None, "before": ""}

    def move() -> None:
        if state["left"] == 0:
            session.close()
            return
        state["left"] -= 1
        state["step"] = -state["step"]
        value = slider.value + state["step"]
        state["before"] = tables[0].text
        state["at"] = time.perf_counter()
        state["deadline"] = doc.add_timeout_callback(expired, int(timeout_s * 1000))
        slider.value = value
        # The lab's sliders report on release (`throttled=True`): a browser then sets
        # value_throttled too. Bokeh keeps that property read-only in Python, so set it the way
        # an incoming message would; the change still goes to the server.
        slider.set_from_json("value_throttled", value)

    def next_move() -> None:
        doc.add_timeout_callback(move, int(rng.uniform(0.5, 1.5) * think_s * 1000))

    def when_class_starts() -> None:  # the loop keeps running (and answering pings) meanwhile
        if go.is_set():
            next_move()
        else:
            doc.add_timeout_callback(when_class_starts, 100)

    def expired() -> None:
        state["deadline"] = None
        tally.error(i, f"move timed out after {timeout_s:.0f} s")
        state["at"] = None
        next_move()

    def on_text(_attr, _old, new) -> None:
        if state["at"] is None or not _finished_table(new) or new == state["before"]:
            return
        ms = (time.perf_counter() - state["at"]) * 1000
        state["at"] = None
        if state["deadline"] is not None:
            doc.remove_timeout_callback(state["deadline"])
            state["deadline"] = None
        with tally.lock:
            tally.latency_ms.append(ms)
        next_move()

    for table in tables:
        table.on_change("text", on_text)
    when_class_starts()
    try:
        # Bokeh 3 keeps its client's blocking loop private ("for testing"); a load test is that.
        session._loop_until_closed()
    except Exception as err:  # a client-side failure is this session's error, not the run's end
        tally.error(i, f"client loop failed: {type(err).__name__}: {str(err)[:200]}")


class ProtocolClass:
    """`sessions` protocol sessions, opened (`stagger_s` apart) as soon as it is made; `start()`
    their moves together, `join()` until every one has made its moves or timed out."""

    def __init__(self, url: str, sessions: int, moves: int, think_s: float, timeout_s: float,
                 stagger_s: float, seed: int) -> None:
        register_models()
        self.tally = ProtocolTally(expected=sessions)
        self.go = threading.Event()
        # Bokeh's client handles each incoming message one Python call deeper than the last, so
        # a session that receives a few thousand patches overflows the default recursion limit.
        # Deep stacks for these threads only, and a limit to match.
        sys.setrecursionlimit(max(sys.getrecursionlimit(), CLIENT_RECURSION))
        previous = threading.stack_size(CLIENT_STACK_BYTES)
        try:
            self.threads = [threading.Thread(target=run_session, name=f"protocol-{i}",
                                             daemon=True,
                                             args=(i, url, moves, think_s, timeout_s,
                                                   i * stagger_s, seed, self.tally, self.go))
                            for i in range(sessions)]
            for t in self.threads:
                t.start()  # a thread takes its stack size when it starts
        finally:
            threading.stack_size(previous)


    def wait_opened(self) -> None:
        self.tally.all_arrived.wait()

    def start(self) -> None:
        self.go.set()

    def join(self) -> ProtocolTally:
        for t in self.threads:
            t.join()
        return self.tally
