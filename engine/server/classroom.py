"""The classroom's state: what an instructor shares with every student page, in the engine server.

A class may be served by several page processes (`panel serve --num-procs N`), so what they share
lives in the one engine server they all talk to: one `ClassroomHub` holds the broadcast slider
values and their version, the prediction poll with each session's committed choice, the reveal,
and who is here. `engine.server.classroom_hub` puts it on HTTP; the page processes' client
(`lab/classroom.py`) turns each `ClassView` into widgets. Nothing here knows of HTTP, Panel or the
lab.

The hub changes only on the server's event loop (every handler runs there), so it has no lock; it
tells the event streams through `subscribe`. Instructor powers need LAB_INSTRUCTOR_TOKEN in the
engine server's environment; the token is compared in constant time and never put in a view.
"""
from __future__ import annotations

import hmac
import os
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType


class HubError(Exception):
    """A change the hub refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Poll:
    """A prediction question on one control, with the choices a student may commit to."""

    number: int  # counts this hub's polls, so a page can tell a new poll from the last one
    control: str  # batch, context, page or output
    question: str
    choices: tuple[tuple[str, str], ...]  # (choice id, label), in the order shown

    @classmethod
    def from_json(cls, data: Mapping) -> Poll:
        return cls(int(data["number"]), data["control"], data["question"],
                   tuple((str(cid), str(label)) for cid, label in data["choices"]))


@dataclass(frozen=True)
class ClassView:
    """A snapshot of the class: what every page may see (no session ids, no token)."""

    hub: str  # this hub's id; a restarted engine server has a new hub whose counts start again
    serial: int  # changes so far: a page redraws when (hub, serial) moved since its last draw
    enabled: bool  # the engine server has an instructor token: instructor mode is on
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

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(values=dict(self.values), votes=dict(self.votes),
                   poll=None if self.poll is None else asdict(self.poll))
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> ClassView:
        known = {f.name for f in fields(cls)}  # a newer server may send more; ignore it
        out = {k: v for k, v in data.items() if k in known}
        out.update(values=MappingProxyType(dict(data["values"])),
                   votes=MappingProxyType(dict(data["votes"])),
                   poll=None if data["poll"] is None else Poll.from_json(data["poll"]))
        return cls(**out)


# What a page shows before it has heard from any hub: no class, instructor mode off.
NO_CLASS = ClassView("", 0, False, 0, MappingProxyType({}), None, MappingProxyType({}), False, "",
                     False, 0, 0, 0)


@dataclass
class Member:
    client: str  # the page process that joined it: its members go when its last stream closes
    following: bool
    instructor: bool


@dataclass
class _Class:
    """The class's state between a start and an `end`."""

    on: bool = False
    version: int = 0
    values: dict = field(default_factory=dict)
    polls: int = 0
    poll: Poll | None = None
    choice: dict[str, str] = field(default_factory=dict)  # session -> committed choice id
    revealed: bool = False
    result: str = ""


class ClassroomHub:
    """One instructor, many students, across every page process of a class."""

    def __init__(self, token: str | None = None) -> None:
        self._token = token.encode("utf-8", "surrogatepass") if token else None
        self.id = uuid.uuid4().hex[:12]
        self.serial = 0
        self._members: dict[str, Member] = {}
        self._streams: Counter[str] = Counter()  # open event streams per page process
        self._class = _Class()
        self._subscribers: list[Callable[[], None]] = []

    @classmethod
    def from_env(cls) -> ClassroomHub:
        """The hub of an engine server started with (or without) LAB_INSTRUCTOR_TOKEN."""
        return cls(os.environ.get("LAB_INSTRUCTOR_TOKEN") or None)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def authorised(self, token: str | bytes | None) -> bool:
        """Whether `token` is the instructor's (never a missing or empty one, nor with none set)."""
        if isinstance(token, str):
            token = token.encode("utf-8", "surrogatepass")
        if self._token is None or not token:
            return False
        return hmac.compare_digest(token, self._token)

    def subscribe(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call fn() after every change; returns the function that stops it."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def _changed(self) -> None:
        self.serial += 1
        for fn in list(self._subscribers):
            fn()

    # -- sessions ------------------------------------------------------------------------------
    def join(self, session: str, client: str, following: bool = True,
             instructor: bool = False) -> None:
        """Count a session in (again, after its page process reconnected); the caller checked
        the token of an instructor."""
        member = Member(client, following, instructor)
        if self._members.get(session) == member and (self._class.on or not instructor):
            return  # a page process joining its sessions again after reconnecting: no news
        self._members[session] = member
        if instructor:
            self._class.on = True
        self._changed()

    def leave(self, session: str) -> None:
        """A session ended: forget it (a vote it committed stays counted)."""
        if self._members.pop(session, None) is not None:
            self._changed()

    def follow(self, session: str, following: bool) -> None:
        member = self._members.get(session)
        if member is not None and not member.instructor and member.following != following:
            member.following = following
            self._changed()

    def commit(self, session: str, choice: str) -> str:
        """Commit a session's prediction for the open poll: once, before the reveal."""
        c = self._class
        if c.poll is None:
            raise HubError("no poll is open", 409)
        if choice not in {cid for cid, _ in c.poll.choices}:
            raise HubError("that is not a choice of the open poll")
        if c.revealed:
            raise HubError("the poll was revealed: it takes no more predictions", 409)
        if session in c.choice:
            raise HubError("this session already committed a prediction", 409)
        c.choice[session] = choice
        self._changed()
        return choice

    def stream_opened(self, client: str) -> None:
        self._streams[client] += 1

    def stream_closed(self, client: str) -> None:
        """A page process's stream ended; with its last one gone, so are its sessions (it joins
        them again when it reconnects)."""
        self._streams[client] -= 1
        if self._streams[client] > 0:
            return
        del self._streams[client]
        gone = [s for s, m in self._members.items() if m.client == client]
        for session in gone:
            del self._members[session]
        if gone:
            self._changed()

    # -- the instructor (the handlers check the token) -----------------------------------------
    def broadcast(self, values: Mapping[str, object]) -> int:
        """Send slider values to every following student; returns the new version."""
        c = self._class
        c.version += 1
        c.values = dict(values)
        c.on = True
        self._changed()
        return c.version

    def open_poll(self, control: str, question: str,
                  choices: tuple[tuple[str, str], ...]) -> Poll:
        """Open a new poll, closing any earlier one and its reveal."""
        c = self._class
        c.polls += 1
        c.poll = Poll(c.polls, control, question, tuple(choices))
        c.choice.clear()
        c.revealed, c.result, c.on = False, "", True
        self._changed()
        return c.poll

    def reveal(self, result: str) -> None:
        """Show the measured result to everyone and close the poll to new predictions."""
        self._class.revealed, self._class.result = True, result
        self._changed()

    def end(self) -> None:
        """End the class session: students stop seeing the bar; sessions stay joined."""
        self._class = _Class(version=self._class.version, polls=self._class.polls)
        self._changed()

    # -- reading -------------------------------------------------------------------------------
    def view(self) -> ClassView:
        c = self._class
        votes = {cid: 0 for cid, _ in c.poll.choices} if c.poll else {}
        for choice in c.choice.values():
            votes[choice] = votes.get(choice, 0) + 1
        students = [m for m in self._members.values() if not m.instructor]
        return ClassView(
            hub=self.id, serial=self.serial, enabled=self.enabled, version=c.version,
            values=MappingProxyType(dict(c.values)), poll=c.poll, votes=MappingProxyType(votes),
            revealed=c.revealed, result=c.result, active=c.on, members=len(students),
            followers=sum(m.following for m in students),
            instructors=len(self._members) - len(students))

    def stats(self) -> dict[str, int]:
        """Counts for diagnostics and tests (no session ids, no token)."""
        return stats(self.view()) | {"streams": sum(self._streams.values())}


def stats(view: ClassView) -> dict[str, int]:
    """A view's counts, as the diagnostics endpoints report them."""
    return {"members": view.members, "followers": view.followers,
            "instructors": view.instructors, "version": view.version,
            "poll_open": int(view.poll is not None and not view.revealed),
            "committed": view.committed(), "active": int(view.active)}

