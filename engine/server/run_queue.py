"""The queue of measured workload runs the engine server shares among the lab's sessions.

One thread owns the device and runs one job at a time. Sessions submit jobs; each session has at
most one job waiting, and a newer submission replaces (supersedes) it, cancelling it if it already
runs. Sessions are served round robin (fair queueing), and background work (sweeps) runs only when
no session's job waits. Finished traces are cached by configuration, so a setting anyone already
ran returns at once, and a session asking for a run already in flight joins it instead of starting
another. Queueing and the cache live here, beside the device, so every page process of a class
shares them (docs/classroom.md).

The queue calls the listener functions it is given from the worker thread (steps, the outcome) or
from the submitting thread (queue positions); `engine.server.lab_routes` turns those calls into
lines of a stream. Each listener carries a `tag` naming the stream it writes to, so a stream that
closes removes exactly its own listeners (`detach`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import ConfigError
from engine.llm_engine import Cancelled
from engine.records import Outcome, StepRecord, Trace

log = logging.getLogger(__name__)

StepFn = Callable[[StepRecord], None]
DoneFn = Callable[["Outcome"], None]
PositionFn = Callable[[int], None]


@dataclass
class Listener:
    session: str
    on_step: StepFn | None
    on_done: DoneFn
    on_position: PositionFn | None = None  # told the jobs ahead each time that number changes
    tag: object = None  # the stream this listener writes to (see `detach`)
    told: int = -1  # the last position it was told


@dataclass
class Job:
    key: object  # hashable run configuration; equal keys give equal runs
    run: Callable[[StepFn, threading.Event], Trace]  # executes on the worker thread
    background: bool = False
    listeners: list[Listener] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)  # replayed to late joiners
    cancel: threading.Event = field(default_factory=threading.Event)
    yielded: bool = False  # a background run stopped for a learner's run; it starts over later


class RunQueue:
    """A fair, cancellable, caching job queue in front of one worker thread."""

    def __init__(self, cache_size: int = 256) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, Job] = {}  # session -> its one waiting job
        self._order: deque[str] = deque()  # round robin over sessions with a waiting job
        self._background: deque[Job] = deque()
        self._current: Job | None = None
        self._notifying = 0  # finished jobs whose listeners are being told, for stats()
        self._cache: OrderedDict[object, Trace] = OrderedDict()
        self._cache_size = cache_size
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.runs_started = 0  # counts real engine runs, for tests and the admin view

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, session: str, key: object, run: Callable[[StepFn, threading.Event], Trace],
               on_done: DoneFn, on_step: StepFn | None = None, background: bool = False,
               on_position: PositionFn | None = None, tag: object = None) -> bool:
        """Ask for the run `key`; `on_done` gets its Outcome (at once when cached). True when the
        cache answered, before this returns."""
        listener = Listener(session, on_step, on_done, on_position, tag)
        with self._cond:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                if not background:  # the learner moved on: what they waited for is not wanted
                    self._supersede(session, keep=key)
            else:
                # A learner who changes a slider while queued keeps their place in line.
                place = self._order.index(session) if session in self._order else None
                if not background:
                    self._supersede(session, keep=key)
                job = self._find(key)
                if job is not None:  # already queued or running: join it
                    job.listeners = [l for l in job.listeners if l.session != session or background]
                    job.listeners.append(listener)
                    steps = list(job.steps)
                    if not background and job.background:
                        self._promote(job, session)
                else:
                    job = Job(key, run, background, [listener])
                    steps = []
                    if background:
                        self._background.append(job)
                    else:
                        self._waiting[session] = job
                        self._order.insert(len(self._order) if place is None else place, session)
                        self._yield_background()
                    self._ensure_worker()
                    self._cond.notify_all()
        if cached is not None:
            on_done(Outcome(trace=cached, cached=True))
            return True
        if on_step is not None:
            for step in steps:
                on_step(step)
        self._announce_positions()
        return False

    def _find(self, key: object) -> Job | None:
        if self._current is not None and self._current.key == key and not self._current.cancel.is_set():
            return self._current
        for job in (*self._waiting.values(), *self._background):
            if job.key == key:
                return job
        return None

    def _yield_background(self) -> None:
        """A learner now waits: stop a background run in progress (a sweep at a low arrival rate
        can take many seconds, mostly waiting for arrivals); it runs again from the start once
        nobody waits."""
        job = self._current
        if job is not None and job.background and not job.cancel.is_set():
            job.yielded = True
            job.cancel.set()

    def _promote(self, job: Job, session: str) -> None:
        """A session now waits on a background job: move it into that session's turn."""
        if job in self._background:
            self._background.remove(job)
            self._waiting[session] = job
            self._order.append(session)

    def _supersede(self, session: str, keep: object = None) -> None:
        """Drop `session` from the foreground jobs it listens to (but the one for `keep`); cancel
        jobs nobody wants any more."""
        jobs = list(self._waiting.values())
        if self._current is not None:
            jobs.append(self._current)
        for job in jobs:
            if keep is not None and job.key == keep:
                continue
            kept = [l for l in job.listeners if l.session != session]
            if len(kept) == len(job.listeners):
                continue
            dropped = [l for l in job.listeners if l.session == session]
            job.listeners = kept
            for l in dropped:
                self._notify(l, Outcome(cancelled=True))
            if self._waiting.get(session) is job:  # it waited in this session's turn
                place = self._order.index(session)
                del self._waiting[session]
                self._order.remove(session)
                if kept:  # others still want it: it keeps its place under one of them
                    heir = next((l.session for l in kept if l.session not in self._waiting), None)
                    if heir is None:
                        self._background.append(job)
                    else:
                        self._waiting[heir] = job
                        self._order.insert(place, heir)
            if not kept and not job.background:
                job.cancel.set()

    def drop_background(self, session: str) -> None:
        """Stop listening to `session`'s queued background jobs; drop those nobody wants."""
        with self._cond:
            for job in self._background:
                job.listeners = [l for l in job.listeners if l.session != session]
            for job in [j for j in self._background if not j.listeners]:
                self._background.remove(job)

    def forget(self, session: str) -> None:
        """A session closed: stop listening for it and cancel its unwanted work."""
        with self._cond:
            self._supersede(session)
        self.drop_background(session)
        self._announce_positions()

    def detach(self, tag: object) -> None:
        """A stream closed: drop the listeners it carried; cancel or drop jobs nobody wants now.
        Jobs others still listen to go on (a newer stream of the same session included)."""
        with self._cond:
            jobs = [*self._waiting.items()]
            for session, job in jobs:
                job.listeners = [l for l in job.listeners if l.tag is not tag]
                if not job.listeners:
                    del self._waiting[session]
                    self._order.remove(session)
            for job in list(self._background):
                job.listeners = [l for l in job.listeners if l.tag is not tag]
                if not job.listeners:
                    self._background.remove(job)
            current = self._current
            if current is not None:
                current.listeners = [l for l in current.listeners if l.tag is not tag]
                if not current.listeners and not current.background:
                    current.cancel.set()
        self._announce_positions()

    def _announce_positions(self) -> None:
        """Tell each waiting listener how many jobs go before its own, when that changed."""
        with self._cond:
            ahead = int(self._current is not None)
            due = []
            for i, session in enumerate(self._order):
                for l in self._waiting[session].listeners:
                    if l.on_position is not None and l.told != ahead + i:
                        l.told = ahead + i
                        due.append((l.on_position, ahead + i))
        for tell, position in due:
            try:
                tell(position)
            except Exception:
                log.exception("position listener failed")

    def queue_position(self, session: str) -> int:
        """0 when this session's job runs now (or it has none), else how many jobs go first."""
        with self._cond:
            if session not in self._order:
                return 0
            return list(self._order).index(session) + (self._current is not None)

    def cached(self, key: object) -> Trace | None:
        with self._cond:
            return self._cache.get(key)

    # -- the worker ----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)
            self._thread.start()

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._stopping and not self._order and not self._background:
                self._cond.wait(timeout=30.0)
                if not self._order and not self._background:
                    self._thread = None  # idle: let the thread end; a new submit restarts one
                    return None
            if self._stopping:
                return None
            if self._order:
                session = self._order.popleft()
                job = self._waiting.pop(session)
            else:
                job = self._background.popleft()
            self._current = job
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            self._announce_positions()
            outcome = self._execute(job)
            if outcome.cancelled and job.yielded:
                with self._cond:
                    self._current = None
                    twin = self._find(job.key)  # the learner may have asked for this very run
                    if twin is not None:
                        twin.listeners += job.listeners
                    elif job.listeners:  # still wanted: back to the front of the background
                        job.yielded, job.steps, job.cancel = False, [], threading.Event()
                        self._background.appendleft(job)
                continue
            # In one locked step: the result is cached, the job stops being current and its
            # listeners are taken. A session that asks for this key from now on finds the cache
            # (or, after a failure, starts a new run), and one that moves on no longer finds the
            # job to answer "cancelled": every listener hears exactly once.
            with self._cond:
                if outcome.trace is not None:
                    self._cache[job.key] = outcome.trace
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
                listeners, job.listeners = job.listeners, []
                self._current = None
                self._notifying += 1
            for listener in listeners:
                self._notify(listener, outcome)
            with self._cond:  # only now idle: wait_idle() then also covers the notifications
                self._notifying -= 1

    def _execute(self, job: Job) -> Outcome:
        def on_step(step: StepRecord) -> None:
            with self._cond:
                job.steps.append(step)
                listeners = [l for l in job.listeners if l.on_step is not None]
            for listener in listeners:
                try:
                    listener.on_step(step)
                except Exception:  # one session's broken page must not stop the run
                    log.exception("step listener failed")

        self.runs_started += 1
        try:
            return Outcome(trace=job.run(on_step, job.cancel))
        except Cancelled:
            return Outcome(cancelled=True)
        except ConfigError as err:
            return Outcome(error=str(err))
        except Exception as err:  # keep serving everyone else; say what went wrong
            log.exception("engine job failed")
            return Outcome(error=f"the engine failed on this setting ({type(err).__name__}: {err})")

    @staticmethod
    def _notify(listener: Listener, outcome: Outcome) -> None:
        try:
            listener.on_done(outcome)
        except Exception:
            log.exception("done listener failed")

    # -- lifecycle -----------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._order), "background": len(self._background),
                    "running": int(self._current is not None or self._notifying > 0),
                    "cached": len(self._cache),
                    "runs_started": self.runs_started,
                    "worker_alive": int(self._thread is not None and self._thread.is_alive())}

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            if self._current is not None:
                self._current.cancel.set()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing waits or runs (for tests and scripts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if not (s["waiting"] or s["background"] or s["running"]):
                return True
            time.sleep(0.02)
        return False
