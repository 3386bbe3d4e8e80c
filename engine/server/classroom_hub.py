"""The classroom hub over HTTP: JSON actions, the current view, one event stream per page process.

`routes(hub)` gives the URL patterns under /lab/classroom/ for the engine server's application; the
API table is in docs/classroom.md. Each page process holds one `GET /lab/classroom/events` stream:
newline-delimited JSON, a `{"view": ...}` line when it connects and whenever the class changes (a
burst of changes sends the newest view once), and a `{"keepalive": true}` line when it has been
quiet for KEEPALIVE_S. When a process's last stream closes, its sessions leave the class.

Every action is a POST with a JSON object body and answers `{"view": ...}` plus what it made; bad
input answers 400 with `{"error": ...}`, and a refused change 403 or 409. Instructor actions need
the token in the `X-Instructor-Token` header (UTF-8, percent-encoded); the answer to a wrong one
never says more than that it is needed, and no answer or log line contains it.
"""
from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from urllib.parse import unquote_to_bytes

import tornado.web
from tornado.httputil import responses
from tornado.iostream import StreamClosedError

from engine.server.classroom import ClassroomHub, HubError

__all__ = ["ClassroomHub", "routes", "TOKEN_HEADER"]

TOKEN_HEADER = "X-Instructor-Token"
KEEPALIVE_S = 15.0  # an idle stream still gets a line this often, so both ends see it is alive
MAX_BODY_BYTES = 64 * 1024  # a revealed result with its explanation is a few kB
MAX_ID = 128  # session, client and choice ids, control names, labels: short strings
MAX_TEXT = 16 * 1024  # a question or a revealed result
MAX_VALUES = 64  # slider values in one broadcast
MAX_CHOICES = 16  # choices in one poll
OFF = "instructor mode is off: the engine server has no LAB_INSTRUCTOR_TOKEN"
NOT_INSTRUCTOR = "this needs the instructor's token"

Action = Callable[[ClassroomHub, dict, bool], dict]  # (hub, body, authorised) -> extra answer


def text(body: dict, name: str, limit: int = MAX_ID) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise HubError(f"'{name}' must be a non-empty string of at most {limit} characters")
    return value


def flag(body: dict, name: str, default: bool | None = None) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise HubError(f"'{name}' must be true or false")
    return value


def slider_values(body: dict) -> dict:
    values = body.get("values")
    if not isinstance(values, dict) or len(values) > MAX_VALUES or not all(
            len(k) <= MAX_ID and is_scalar(v) for k, v in values.items()):
        raise HubError(f"'values' must map at most {MAX_VALUES} control names to numbers or "
                       f"strings of at most {MAX_ID} characters")
    return values


def is_scalar(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (bool, int)) or (isinstance(value, str) and len(value) <= MAX_ID)


def poll_choices(body: dict) -> tuple[tuple[str, str], ...]:
    choices = body.get("choices")
    pairs = isinstance(choices, list) and 0 < len(choices) <= MAX_CHOICES and all(
        isinstance(c, list) and len(c) == 2
        and all(isinstance(s, str) and 0 < len(s) <= MAX_ID for s in c) for c in choices)
    if not pairs or len({c[0] for c in choices}) != len(choices):
        raise HubError(f"'choices' must be 1 to {MAX_CHOICES} [id, label] pairs of non-empty "
                       f"strings of at most {MAX_ID} characters, with distinct ids")
    return tuple((cid, label) for cid, label in choices)


# -- the actions: each checks its body, changes the hub and returns what it adds to the answer --
def join(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    instructor = flag(body, "instructor", False)
    if instructor and not authorised:
        raise HubError(NOT_INSTRUCTOR, 403)
    hub.join(text(body, "session"), text(body, "client"),
             flag(body, "following", not instructor), instructor)
    return {}


def leave(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    hub.leave(text(body, "session"))
    return {}


def follow(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    hub.follow(text(body, "session"), flag(body, "following"))
    return {}


def commit(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    return {"choice": hub.commit(text(body, "session"), text(body, "choice"))}


def check(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    return {}  # the handler already checked the token: that is the whole answer


def broadcast(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    return {"version": hub.broadcast(slider_values(body))}


def open_poll(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    poll = hub.open_poll(text(body, "control"), text(body, "question", MAX_TEXT),
                         poll_choices(body))
    return {"poll": asdict(poll)}


def reveal(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    hub.reveal(text(body, "result", MAX_TEXT))
    return {}


def end(hub: ClassroomHub, body: dict, authorised: bool) -> dict:
    hub.end()
    return {}


# path -> (the action, whether only the instructor may call it)
ACTIONS: dict[str, tuple[Action, bool]] = {
    "join": (join, False), "leave": (leave, False), "follow": (follow, False),
    "commit": (commit, False), "instructor": (check, True), "broadcast": (broadcast, True),
    "poll": (open_poll, True), "reveal": (reveal, True), "end": (end, True),
}


class HubHandler(tornado.web.RequestHandler):
    def initialize(self, hub: ClassroomHub) -> None:
        self.hub = hub

    def write_error(self, status_code: int, **kwargs) -> None:
        """Tornado's own errors (405, an uncaught exception) as JSON too."""
        self.finish({"error": responses.get(status_code, "error").lower()})


class ActionHandler(HubHandler):
    """POST /lab/classroom/<action>: one change to the class."""

    def initialize(self, hub: ClassroomHub, act: Action, instructor_only: bool) -> None:
        super().initialize(hub)
        self.act, self.instructor_only = act, instructor_only

    def post(self) -> None:
        try:
            if not self.hub.enabled:
                raise HubError(OFF, 403)
            header = self.request.headers.get(TOKEN_HEADER)
            authorised = header is not None and self.hub.authorised(unquote_to_bytes(header))
            if self.instructor_only and not authorised:
                raise HubError(NOT_INSTRUCTOR, 403)
            extra = self.act(self.hub, self.body(), authorised)
        except HubError as err:
            self.set_status(err.status)
            self.finish({"error": str(err)})
            return
        self.finish({**extra, "view": self.hub.view().to_json()})

    def body(self) -> dict:
        if len(self.request.body) > MAX_BODY_BYTES:
            raise HubError(f"the body is larger than {MAX_BODY_BYTES // 1024} KiB", 413)
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:  # UnicodeDecodeError is one too
            raise HubError("the body is not JSON") from None
        if not isinstance(body, dict):
            raise HubError("the body must be a JSON object")
        return body


class ViewHandler(HubHandler):
    """GET /lab/classroom/view: the class as it is now."""

    def get(self) -> None:
        self.finish(self.hub.view().to_json())


class EventsHandler(HubHandler):
    """GET /lab/classroom/events?client=ID: the page process's one stream of views."""

    def initialize(self, hub: ClassroomHub) -> None:
        super().initialize(hub)
        self.changed = asyncio.Event()

    async def get(self) -> None:
        client = self.get_query_argument("client", "")
        if not client or len(client) > MAX_ID:
            self.set_status(400)
            self.finish({"error": f"'client' must be a non-empty id of at most {MAX_ID} "
                                  "characters"})
            return
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-cache")
        aio = asyncio.get_running_loop()
        stop = self.hub.subscribe(lambda: aio.call_soon_threadsafe(self.changed.set))
        self.hub.stream_opened(client)
        try:
            while not self.request.connection.stream.closed():
                self.changed.clear()  # before reading the view, so no change slips between
                await self.send({"view": self.hub.view().to_json()})
                while not await self.wait_for_change():
                    await self.send({"keepalive": True})
        except StreamClosedError:
            pass
        finally:
            stop()
            self.hub.stream_closed(client)

    async def wait_for_change(self) -> bool:
        try:
            await asyncio.wait_for(self.changed.wait(), KEEPALIVE_S)
            return True
        except asyncio.TimeoutError:
            return False

    async def send(self, message: dict) -> None:
        self.write(json.dumps(message) + "\n")
        await self.flush()

    def on_connection_close(self) -> None:
        self.changed.set()  # wake the loop so it sees the closed stream and ends


def routes(hub: ClassroomHub) -> list[tuple]:
    """The hub's URL patterns under /lab/classroom/, for a Tornado application."""
    args = {"hub": hub}
    return [(r"/lab/classroom/view", ViewHandler, args),
            (r"/lab/classroom/events", EventsHandler, args),
            *[(rf"/lab/classroom/{name}", ActionHandler,
               args | {"act": act, "instructor_only": instructor_only})
              for name, (act, instructor_only) in ACTIONS.items()]]
