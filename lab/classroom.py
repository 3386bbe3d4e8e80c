"""The page process's side of the classroom: a client of the hub in the engine server.

A class may be served by several page processes, so the class itself lives in the engine server
(`engine/server/classroom_hub.py`; the API is in docs/classroom.md). Each page process has one
`Classroom` (`lab.shared.classroom()`). One daemon thread holds the hub's event stream and keeps
the newest `ClassView`; joins, follows, commits and the instructor's actions are short HTTP posts,
whose answers also carry the newest view. Nothing here touches a page: each bar reads `view()` from
its session's ticker (lab/ticker.py), on the session's loop, and redraws when the view's (hub,
serial) moved.

If the engine server goes away, the thread reconnects with growing waits, then joins this process's
sessions again (a restarted server starts an empty hub); meanwhile `view()` keeps the last view and
`stats()` says the stream is down. Instructor powers exist only as a `Presenter`, which holds the
token to send it in a header; it is never logged.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from engine.server.classroom import NO_CLASS, ClassView, Poll, stats
from engine.server.classroom_hub import TOKEN_HEADER

log = logging.getLogger(__name__)

ENGINE_URL = "http://127.0.0.1:8000"  # `python -m engine serve`'s default address
REQUEST_TIMEOUT_S = 5.0  # a post on loopback answers in milliseconds; past this, give up
STREAM_TIMEOUT_S = 40.0  # the hub sends a line at least every 15 s; silence this long: reconnect
FIRST_RETRY_S, LAST_RETRY_S = 0.5, 10.0  # waits between reconnects double from one to the other


class ClassroomError(Exception):
    """The hub refused a request (`status` is its HTTP status) or could not be reached (None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Classroom:
    """This page process's link to the class: its newest view, and its sessions' requests."""

    def __init__(self, engine_url: str = ENGINE_URL) -> None:
        url = urlsplit(engine_url)
        self._connection_class = (http.client.HTTPSConnection if url.scheme == "https"
                                  else http.client.HTTPConnection)
        self._address = url.netloc
        self._root = url.path.rstrip("/") + "/lab/classroom/"
        self.client = uuid.uuid4().hex  # names this process to the hub; not secret
        self._lock = threading.Lock()
        self._view: ClassView | None = None
        self._members: dict[str, tuple[dict, str | None]] = {}  # session -> (join body, token)
        self._choices: dict[str, tuple[str, int, str]] = {}  # session -> (hub, poll, choice)
        # A session's join, leave and join-again reach the hub in the order they were decided:
        # the stream thread's join-again could otherwise land after the session's leave and
        # count a student who had gone. Striped, so a hub that is slow to answer holds up a
        # sixteenth of the sessions, not all of them.
        self._session_locks = tuple(threading.Lock() for _ in range(16))
        self._thread: threading.Thread | None = None
        self._stream: http.client.HTTPConnection | None = None
        self._stop = threading.Event()
        self.connected = False  # the event stream is open

    @classmethod
    def from_env(cls) -> Classroom:
        return cls(os.environ.get("LAB_ENGINE_URL") or ENGINE_URL)

    @property
    def enabled(self) -> bool:
        """Instructor mode is on: the engine server was started with LAB_INSTRUCTOR_TOKEN."""
        return self.view().enabled

    def presenter(self, token: object) -> Presenter | None:
        """Instructor powers for the right token; None for a wrong, missing or non-text one."""
        if not isinstance(token, str) or not token or not self.enabled:
            return None
        try:
            self.post("instructor", {}, token)
        except (ClassroomError, UnicodeEncodeError):  # a lone surrogate cannot even be sent
            return None
        return Presenter(self, token)

    # -- sessions ------------------------------------------------------------------------------
    def join(self, session: str, following: bool = True) -> ClassView:
        """Count a student session in; it stays in until `leave` (or this process's stream ends)."""
        return self._join(session, {"following": following, "instructor": False}, None)

    def _session_lock(self, session: str) -> threading.Lock:
        return self._session_locks[hash(session) % len(self._session_locks)]

    def _join(self, session: str, body: dict, token: str | None) -> ClassView:
        body = {"session": session, "client": self.client, **body}
        with self._session_lock(session):
            with self._lock:
                self._members[session] = (body, token)
            self._post_quietly("join", body, token)
        return self.view()

    def leave(self, session: str) -> None:
        with self._session_lock(session):
            with self._lock:
                self._members.pop(session, None)
                self._choices.pop(session, None)
            self._post_quietly("leave", {"session": session})

    def follow(self, session: str, following: bool) -> ClassView:
        with self._lock:
            if session in self._members:
                self._members[session][0]["following"] = following
        return self._post_quietly("follow", {"session": session, "following": following})

    def commit(self, session: str, choice: str) -> bool:
        """Commit a session's prediction for the open poll; False if the hub refused it."""
        try:
            answer = self.post("commit", {"session": session, "choice": choice})
        except ClassroomError as err:
            log.info("prediction not committed: %s", err)
            return False
        view = ClassView.from_json(answer["view"])
        with self._lock:
            self._choices[session] = (view.hub, view.poll.number, answer["choice"])
        return True

    def committed_choice(self, session: str) -> str | None:
        """The choice this session committed for the poll open now, if any."""
        view = self.view()
        with self._lock:
            mine = self._choices.get(session)
        if mine is None or view.poll is None or mine[:2] != (view.hub, view.poll.number):
            return None
        return mine[2]

    # -- reading -------------------------------------------------------------------------------
    def view(self) -> ClassView:
        """The newest view this process has; asked for once before the stream's first line."""
        self._start()
        with self._lock:
            view = self._view
        if view is None:
            try:
                self._keep(ClassView.from_json(self._request("GET", "view")))
            except ClassroomError:
                return NO_CLASS
            with self._lock:
                view = self._view
        return view

    def stats(self) -> dict[str, int]:
        """Counts for the diagnostics endpoint (no session ids, no token)."""
        return stats(self.view()) | {"connected": int(self.connected)}

    def _keep(self, view: ClassView) -> None:
        """Keep `view` unless a newer one of the same hub is already here."""
        with self._lock:
            old = self._view
            if old is None or old.hub != view.hub or view.serial >= old.serial:
                self._view = view

    # -- HTTP ----------------------------------------------------------------------------------
    def post(self, action: str, body: dict, token: str | None = None) -> dict:
        """POST one action; returns the hub's answer, whose view is kept. Raises ClassroomError."""
        answer = self._request("POST", action, body, token)
        self._keep(ClassView.from_json(answer["view"]))
        return answer

    def _post_quietly(self, action: str, body: dict, token: str | None = None) -> ClassView:
        """A session's bookkeeping post: a hub that is down or restarting must not break a page
        (the stream thread joins the sessions again once it is back)."""
        try:
            self.post(action, body, token)
        except ClassroomError as err:
            log.warning("classroom %s not sent: %s", action, err)
        return self.view()

    def _request(self, method: str, action: str, body: dict | None = None,
                 token: str | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers[TOKEN_HEADER] = quote(token, safe="")
        conn = self._connection_class(self._address, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request(method, self._root + action,
                         None if body is None else json.dumps(body).encode(), headers)
            response = conn.getresponse()
            status, answer = response.status, json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise ClassroomError(f"the engine server did not answer ({type(err).__name__})") \
                from None
        finally:
            conn.close()
        if status != 200:
            raise ClassroomError(answer.get("error", f"HTTP {status}"), status)
        return answer

    # -- the event stream ----------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._listen, name="classroom-events",
                                            daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        """Hold the event stream for as long as this process lives, reconnecting when it drops."""
        wait = FIRST_RETRY_S
        while not self._stop.is_set():
            try:
                self._read_stream()
            except (OSError, http.client.HTTPException, ValueError, ClassroomError) as err:
                log.debug("classroom stream: %s", type(err).__name__)
            if self.connected:
                wait = FIRST_RETRY_S  # it was up: try again soon
            self.connected = False
            self._stop.wait(wait)
            wait = min(2 * wait, LAST_RETRY_S)

    def _read_stream(self) -> None:
        conn = self._connection_class(self._address, timeout=STREAM_TIMEOUT_S)
        with self._lock:
            self._stream = conn
        try:
            conn.request("GET", f"{self._root}events?client={self.client}")
            response = conn.getresponse()
            if response.status != 200:
                raise ClassroomError(f"HTTP {response.status}", response.status)
            self.connected = True
            self._join_again()
            while not self._stop.is_set():
                line = response.readline()
                if not line:
                    return  # the server closed the stream
                message = json.loads(line)
                if "view" in message:
                    self._keep(ClassView.from_json(message["view"]))
        finally:
            with self._lock:
                self._stream = None
            conn.close()

    def _join_again(self) -> None:
        """After (re)connecting: this process's sessions, as the hub may have dropped them."""
        with self._lock:
            members = list(self._members.items())
        for session, (body, token) in members:
            with self._session_lock(session):
                if session in self._members:  # not left in the meantime
                    self._post_quietly("join", body, token)

    def close(self) -> None:
        """Stop the stream thread (tests; a served process keeps it until it exits)."""
        self._stop.set()
        with self._lock:
            stream, thread = self._stream, self._thread
        if stream is not None and stream.sock is not None:
            try:
                stream.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's blocked read
            except OSError:
                pass
        if thread is not None:
            thread.join(5)


class Presenter:
    """What a verified instructor may do; only `Classroom.presenter` makes one."""

    def __init__(self, hub: Classroom, token: str) -> None:
        self.hub = hub
        self._token = token

    def __repr__(self) -> str:
        return "Presenter()"  # never the token

    def join(self, session: str) -> ClassView:
        """Count the instructor's own session in: it shows the class is on."""
        return self.hub._join(session, {"following": False, "instructor": True}, self._token)

    def broadcast(self, values: Mapping[str, object]) -> int:
        """Send slider values to every following student; returns the new version."""
        return self.hub.post("broadcast", {"values": dict(values)}, self._token)["version"]

    def open_poll(self, control: str, question: str,
                  choices: tuple[tuple[str, str], ...]) -> Poll:
        """Open a new poll (closing any earlier one and its reveal)."""
        body = {"control": control, "question": question, "choices": [list(c) for c in choices]}
        return Poll.from_json(self.hub.post("poll", body, self._token)["poll"])

    def reveal(self, result: str) -> None:
        """Show the measured result to everyone and close the poll to new commitments."""
        self.hub.post("reveal", {"result": result}, self._token)

    def end(self) -> None:
        """End the class session: students stop seeing the bar; sessions stay joined."""
        self.hub.post("end", {}, self._token)
