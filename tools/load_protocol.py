"""Server sessions without a browser, for the load script: Bokeh's websocket protocol on the wire.

Each one is a real session on the server: the app runs, its document lives there, the session says
"document ready" the way a page does (so the demo's first run starts), and every slider move runs the
demo's code and sends its patches back. Only the client is thin. It keeps no copy of the document:
it reads the pulled document once to find the batch slider and the summary table, then reads the
server's patches as JSON and looks only at the table's text. Forty of them share one thread and one
event loop and cost a small part of a core, so a small machine can play a class against its own
server without starving it (forty chromium pages, or forty copies of the document, cannot).

What a move measures: from sending the batch slider's new value to the patch that puts a finished
(not "updating") summary table in its place, on the client's clock. The browser's drawing time is
not included; browser sessions in the same run give that.
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

BATCH_TITLE = "Batch size"  # the batch slider's title starts so
TABLE_MARK = "summary-table"  # the summary table's class; "summary-table stale" while a run is on
STATUS_MARK = "run-status"  # the status line's class (lab/demo_view.py)
DONE_PREFIX = "Measured"  # lab/demo_view.py STATUS_TEXT["done"] starts so
MAX_MESSAGE_BYTES = 64 << 20  # a pulled document with its plots' data fits with room to spare
# What a page sends once it has rendered: Panel runs the page's onload callbacks on it.
READY = {"kind": "MessageSent", "msg_type": "bokeh_event",
         "msg_data": {"type": "event", "name": "document_ready", "values": {"type": "map"}}}


@dataclass
class ProtocolTally:
    expected: int
    opened: int = 0
    open_s: list[float] = field(default_factory=list)  # connect to the first finished table
    latency_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    client_cpu_s: float = 0.0  # CPU the client thread used, all sessions together
    all_arrived: threading.Event = field(default_factory=threading.Event)
    _arrived: int = 0

    def error(self, session: int, what: str) -> None:
        self.errors.append(f"protocol session {session}: {what}")

    def arrived(self, opened: bool = False) -> None:
        """One session is done opening, or failed to."""
        self.opened += opened
        self._arrived += 1
        if self._arrived == self.expected:
            self.all_arrived.set()


def _finished_table(text: str) -> bool:
    return TABLE_MARK in text and f"{TABLE_MARK} stale" not in text


def websocket_url(url: str) -> str:
    """The app's page URL (`http://host/app?batch=1`) as its websocket URL, query kept: the query
    reaches the app as the session's arguments."""
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", parts.query, ""))


def walk_models(node: Any) -> Iterator[dict]:
    """Every model written out in full in a serialized document or patch (references skipped)."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("type") == "object" and "attributes" in item:
                yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class Wire:
    """One websocket speaking Bokeh's protocol: a message is a header, metadata and content frame,
    then a header and payload frame for each buffer (the client ignores buffers)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.sent = 0

    async def send(self, msgtype: str, content: dict) -> None:
        self.sent += 1
        for frame in ({"msgid": f"load-{self.sent}", "msgtype": msgtype}, {}, content):
            await self.conn.write_message(json.dumps(frame))

    async def receive(self) -> tuple[dict, str] | None:
        """The next whole message as its header and raw content, or None once the socket closed."""
        frames = []
        for _ in range(3):
            frame = await self.conn.read_message()
            if frame is None:
                return None
            frames.append(frame)
        header = json.loads(frames[0])
        for _ in range(2 * header.get("num_buffers", 0)):
            if await self.conn.read_message() is None:
                return None
        return header, frames[2]


class Session:
    """One student: the batch slider's id and value, and the summary table's latest text."""

    def __init__(self, i: int, url: str, timeout_s: float, tally: ProtocolTally) -> None:
        self.i, self.url, self.timeout_s, self.tally = i, url, timeout_s, tally
        self.wire: Wire | None = None
        self.slider: str | None = None
        self.value: int | None = None
        self.tables: dict[str, str] = {}  # model id -> text
        self.status_id: str | None = None
        self.status = ""  # the status line's text
        self.changed = asyncio.Event()
        self.reader: asyncio.Task | None = None

    @property
    def text(self) -> str:
        return next((t for t in self.tables.values() if TABLE_MARK in t), "")

    def _learn(self, models: Iterator[dict]) -> None:
        for m in models:
            attrs = m["attributes"]
            if m.get("name") == "Slider" and str(attrs.get("title", "")).startswith(BATCH_TITLE):
                self.slider, self.value = m["id"], attrs.get("value", self.value)
            if TABLE_MARK in str(attrs.get("text", "")):
                self.tables[m["id"]] = attrs["text"]
            if STATUS_MARK in (attrs.get("css_classes") or []):
                self.status_id, self.status = m["id"], str(attrs.get("text", ""))

    async def open(self) -> None:
        from bokeh.util.token import generate_jwt_token, generate_session_id
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        token = generate_jwt_token(generate_session_id())
        conn = await websocket_connect(HTTPRequest(websocket_url(self.url)),
                                       subprotocols=["bokeh", token],
                                       max_message_size=MAX_MESSAGE_BYTES)
        self.wire = Wire(conn)
        await self._expect("ACK")  # the server is ready for messages only once it says so
        await self.wire.send("PULL-DOC-REQ", {})
        content = await self._expect("PULL-DOC-REPLY")
        self._learn(walk_models(json.loads(content)["doc"]))
        if self.slider is None or not self.tables or self.status_id is None:
            raise LookupError("the page has no batch slider, summary table or status line")
        self.reader = asyncio.ensure_future(self._read())
        await self.wire.send("PATCH-DOC", {"events": [READY]})  # as a page does once drawn
        # Open means the first run is measured and shown, as for a browser page (tools/load.py).
        await self.until(lambda: DONE_PREFIX in self.status and _finished_table(self.text))

    async def _expect(self, msgtype: str) -> str:
        """The content of the next `msgtype` message; other messages before it are dropped."""
        while True:
            message = await self.wire.receive()
            if message is None:
                raise ConnectionError(f"the server closed the socket before its {msgtype}")
            header, content = message
            if header["msgtype"] == msgtype:
                return content
            if header["msgtype"] == "ERROR":
                raise ConnectionError(f"the server answered with an error: {content[:200]}")

    async def _read(self) -> None:
        """Follow the server's patches: the table's text, the slider's value, errors."""
        while True:
            message = await self.wire.receive()
            if message is None:
                return
            header, content = message
            if header["msgtype"] == "ERROR":
                self.tally.error(self.i, f"server error: {content[:200]}")
                continue
            if header["msgtype"] != "PATCH-DOC":
                continue
            watched = [self.slider, self.status_id, *self.tables]
            # Most patches carry plot data and touch neither: skip them without parsing.
            if TABLE_MARK not in content and not any(f'"{m}"' in content for m in watched):
                continue
            events = json.loads(content)["events"]
            for event in events:
                if event.get("kind") != "ModelChanged":
                    continue
                model, attr, new = event["model"]["id"], event["attr"], event.get("new")
                if model in self.tables and attr == "text":
                    self.tables[model] = new
                elif model == self.status_id and attr == "text":
                    self.status = str(new)
                elif model == self.slider and attr == "value":
                    self.value = new
            if TABLE_MARK in content:  # a new table model, made by a re-rendered pane
                self._learn(walk_models(events))
            self.changed.set()

    async def until(self, done) -> None:
        """Until `done()` holds; TimeoutError past the session's timeout."""
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if self.reader is not None and self.reader.done():
                raise ConnectionError("the server closed the socket")
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))

    async def move(self, step: int) -> float:
        """Move the batch slider by `step`; milliseconds until the table shows the new run."""
        before, value = self.text, self.value + step
        start = time.perf_counter()
        # The lab's sliders report on release (`throttled=True`): a page sends both properties.
        await self.wire.send("PATCH-DOC", {"events": [
            {"kind": "ModelChanged", "model": {"id": self.slider}, "attr": attr, "new": value}
            for attr in ("value", "value_throttled")]})
        self.value = value
        await self.until(lambda: _finished_table(self.text) and self.text != before)
        return (time.perf_counter() - start) * 1000

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.wire is not None:
            self.wire.conn.close()


async def play(i: int, url: str, moves: int, think_s: float, timeout_s: float, delay_s: float,
               seed: int, tally: ProtocolTally, go: asyncio.Event) -> None:
    """One session: open, wait for `go`, then `moves` moves, up first, then down, and so on
    (the settings the warm-up session ran)."""
    await asyncio.sleep(delay_s)
    session = Session(i, url, timeout_s, tally)
    start = time.monotonic()
    try:
        await asyncio.wait_for(session.open(), timeout_s)
    except Exception as err:  # refused, timed out or malformed: count it, the class goes on
        tally.error(i, f"open failed: {type(err).__name__}: {str(err)[:200]}")
        tally.arrived()
        session.close()
        return
    tally.open_s.append(time.monotonic() - start)
    tally.arrived(opened=True)
    rng = random.Random(seed * 1000 + i)
    await go.wait()
    for m in range(moves):
        await asyncio.sleep(rng.uniform(0.5, 1.5) * think_s)
        try:
            tally.latency_ms.append(await session.move(1 if m % 2 == 0 else -1))
        except asyncio.TimeoutError:
            shown = "updating" if f"{TABLE_MARK} stale" in session.text else "unchanged"
            tally.error(i, f"move timed out after {timeout_s:.0f} s (batch slider at "
                           f"{session.value}, summary table {shown})")
        except Exception as err:
            tally.error(i, f"move failed: {type(err).__name__}: {str(err)[:200]}")
            break
    session.close()


class ProtocolClass:
    """`sessions` protocol sessions on one thread's event loop, opened (`stagger_s` apart) as soon
    as it is made; `start()` their moves together, `join()` until each has made its moves or
    timed out."""

    def __init__(self, url: str, sessions: int, moves: int, think_s: float, timeout_s: float,
                 stagger_s: float, seed: int) -> None:
        self.tally = ProtocolTally(expected=sessions)
        self.args = (url, moves, think_s, timeout_s, stagger_s, seed)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.go: asyncio.Event | None = None
        self.ready = threading.Event()  # the loop and its `go` exist
        self.thread = threading.Thread(target=self._run, name="protocol-sessions", daemon=True)
        self.thread.start()
        if sessions == 0:
            self.tally.all_arrived.set()

    def _run(self) -> None:
        asyncio.run(self._main())
        self.tally.client_cpu_s = time.thread_time()

    async def _main(self) -> None:
        url, moves, think_s, timeout_s, stagger_s, seed = self.args
        self.loop, self.go = asyncio.get_running_loop(), asyncio.Event()
        self.ready.set()
        await asyncio.gather(*(play(i, url, moves, think_s, timeout_s, i * stagger_s, seed,
                                    self.tally, self.go) for i in range(self.tally.expected)))

    def wait_opened(self) -> None:
        self.tally.all_arrived.wait()

    def start(self) -> None:
        self.ready.wait()
        self.loop.call_soon_threadsafe(self.go.set)

    def join(self) -> ProtocolTally:
        self.thread.join()
        return self.tally
