"""The classroom hub: what an instructor shares with every student session of one server process.

One `Classroom` per process (`lab.shared.classroom()`) holds the broadcast slider state and its
version, the prediction poll with each session's committed choice, and the revealed result. Sessions
register a plain callable with `join`; the hub calls it as `listener(kind)` from whichever thread
made the change, outside its lock. The hub knows nothing of Panel or Bokeh: the page side hops each
call onto its own session's event loop and reads the hub's current `view()` there, so calls that
arrive late or out of order cannot apply stale state.

Instructor powers exist only as a `Presenter`, which `presenter(token)` hands out when the token
matches LAB_INSTRUCTOR_TOKEN (compared in constant time). With the variable unset or empty nobody is
an instructor. The token is never logged, stored in a view or echoed.
"""
from __future__ import annotations

import hmac
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

log = logging.getLogger(__name__)

Listener = Callable[[str], None]  # called with the kind of change: see KINDS
KINDS = ("broadcast", "poll", "votes", "reveal", "presence", "end")


@dataclass(frozen=True)
class Poll:
    """A prediction question on one control, with the choices a student may commit to."""

    number: int  # counts polls in this process, so a view can tell a new poll from the last one
    control: str  # batch, context, page or output
    question: str
    choices: tuple[tuple[str, str], ...]  # (choice id, label), in the order shown


@dataclass(frozen=True)
class ClassView:
    """A consistent snapshot of the class, safe to read on any thread."""

    version: int  # broadcasts made so far; a follower applies a version once
    values: Mapping[str, object]  # the last broadcast slider values (empty before any)
    poll: Poll | None
    votes: Mapping[str, int]  # choice id -> sessions that committed to it
    revealed: bool
    result: str  # the measured result the instructor revealed ("" until then)
    active: bool  # a class session is on: students see the classroom bar
    members: int  # student sessions joined
    followers: int  # student sessions following the instructor
    instructors: int  # instructor sessions open

    def committed(self) -> int:
        return sum(self.votes.values())


@dataclass
class Member:
    listener: Listener
    following: bool
    instructor: bool


@dataclass
class _Class:
    """The mutable class state behind the hub's lock."""

    on: bool = False
    version: int = 0
    values: dict = field(default_factory=dict)
    polls: int = 0
    poll: Poll | None = None
    choice: dict[str, str] = field(default_factory=dict)  # session -> committed choice id
    revealed: bool = False
    result: str = ""


class Classroom:
    """The process-wide, thread-safe hub between one instructor and many students."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token.encode("utf-8", "surrogatepass") if token else None
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._class = _Class()

    @classmethod
    def from_env(cls) -> "Classroom":
        return cls(os.environ.get("LAB_INSTRUCTOR_TOKEN") or None)

    @property
    def enabled(self) -> bool:
        """Instructor mode is on: the server was started with LAB_INSTRUCTOR_TOKEN."""
        return self._token is not None

    def presenter(self, token: object) -> "Presenter | None":
        """Instructor powers for the right token; None for a wrong, missing or non-text one."""
        if self._token is None or not isinstance(token, str) or not token:
            return None
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token):
            return None
        return Presenter(self)

    # -- sessions ------------------------------------------------------------------------------
    def join(self, session: str, listener: Listener, following: bool = True) -> ClassView:
        """Register a student session; its listener hears every change meant for it."""
        return self._join(session, Member(listener, following, instructor=False))

    def _join(self, session: str, member: Member) -> ClassView:
        with self._lock:
            self._members[session] = member
            if member.instructor:
                self._class.on = True
        self._emit("presence")
        return self.view()

    def leave(self, session: str) -> None:
        """A session ended: forget it (its committed vote stays counted)."""
        with self._lock:
            gone = self._members.pop(session, None)
        if gone is not None:
            self._emit("presence")

    def follow(self, session: str, following: bool) -> ClassView:
        with self._lock:
            member = self._members.get(session)
            if member is not None and not member.instructor:
                member.following = bool(following)
        self._emit("presence", instructors_only=True)
        return self.view()

    def commit(self, session: str, choice: str) -> bool:
        """Commit a session's prediction for the open poll: once, before the reveal."""
        with self._lock:
            c = self._class
            if (c.poll is None or c.revealed or session in c.choice
                    or choice not in {cid for cid, _ in c.poll.choices}):
                return False
            c.choice[session] = choice
        self._emit("votes", instructors_only=True)
        return True

    def committed_choice(self, session: str) -> str | None:
        with self._lock:
            return self._class.choice.get(session)

    def view(self) -> ClassView:
        with self._lock:
            c = self._class
            votes = {cid: 0 for cid, _ in c.poll.choices} if c.poll else {}
            for choice in c.choice.values():
                votes[choice] = votes.get(choice, 0) + 1
            students = [m for m in self._members.values() if not m.instructor]
            return ClassView(
                version=c.version, values=MappingProxyType(dict(c.values)), poll=c.poll,
                votes=MappingProxyType(votes), revealed=c.revealed, result=c.result, active=c.on,
                members=len(students), followers=sum(m.following for m in students),
                instructors=len(self._members) - len(students))

    def stats(self) -> dict[str, int]:
        """Counts for the diagnostics endpoint and tests (no session ids, no token)."""
        v = self.view()
        return {"members": v.members, "followers": v.followers, "instructors": v.instructors,
                "version": v.version, "poll_open": int(v.poll is not None and not v.revealed),
                "committed": v.committed(), "active": int(v.active)}

    # -- telling sessions ----------------------------------------------------------------------
    def _emit(self, kind: str, followers_only: bool = False,
              instructors_only: bool = False) -> None:
        with self._lock:
            targets = [m.listener for m in self._members.values()
                       if (not followers_only or (m.following and not m.instructor))
                       and (not instructors_only or m.instructor)]
        for listener in targets:
            try:
                listener(kind)
            except Exception:  # one closed or broken page must not stop the others
                log.exception("classroom listener failed on %s", kind)


class Presenter:
    """What a verified instructor may do. Only `Classroom.presenter` makes one."""

    def __init__(self, hub: Classroom) -> None:
        self.hub = hub

    def join(self, session: str, listener: Listener) -> ClassView:
        """Register the instructor's own session: it hears votes and presence, not broadcasts."""
        return self.hub._join(session, Member(listener, following=False, instructor=True))

    def broadcast(self, values: Mapping[str, object]) -> int:
        """Send slider values to every following student; returns the new version."""
        hub = self.hub
        with hub._lock:
            c = hub._class
            c.version += 1
            c.values = dict(values)
            c.on = True
            version = c.version
        hub._emit("broadcast", followers_only=True)
        hub._emit("presence", instructors_only=True)
        return version

    def open_poll(self, control: str, question: str,
                  choices: tuple[tuple[str, str], ...]) -> Poll:
        """Open a new poll (closing any earlier one and its reveal)."""
        hub = self.hub
        with hub._lock:
            c = hub._class
            c.polls += 1
            c.poll = Poll(c.polls, control, question, tuple((str(i), str(l)) for i, l in choices))
            c.choice.clear()
            c.revealed, c.result, c.on = False, "", True
            poll = c.poll
        hub._emit("poll")
        return poll

    def reveal(self, result: str) -> None:
        """Show the measured result to everyone and close the poll to new commitments."""
        hub = self.hub
        with hub._lock:
            hub._class.revealed, hub._class.result = True, result
        hub._emit("reveal")

    def end(self) -> None:
        """End the class session: students stop seeing the bar; sessions stay joined."""
        hub = self.hub
        with hub._lock:
            hub._class = _Class(version=hub._class.version, polls=hub._class.polls)
        hub._emit("end")
