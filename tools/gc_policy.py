"""Keep the garbage collector's full passes off a busy classroom server's event loop.

A full collection walks every object the process holds. With forty sessions open that is about
1.4 s, and while it runs the event loop serves nobody: every slider move in flight waits. Most of
those objects are the sessions' pages, which live exactly as long as their sessions. So:

- once a session's page is built, the live heap is frozen (`gc.freeze()`), and the collector's
  later passes, automatic or Panel's own after a session ends, skip it and stay short;
- when sessions end, their pages are reclaimed by one full collection over the unfrozen heap, at
  most once a minute (`RECLAIM_EVERY_S`) however many students come and go, and the heap is frozen
  again after it.

Measured on the 2-core CPU machine (docs/classroom.md): 38 protocol sessions opened and moved three
times each cost 11 full collections, 6.4 s in all and the longest 1.43 s, without this policy.

The app does not apply the policy itself; a server that wants it makes one `SessionGc` and calls
`settle_session` after each page is built and `release_sessions` when a session ends.
`full_collect` alone is what the diagnostics plugin uses to count what is really left.
"""
from __future__ import annotations

import gc
import time

from tornado.ioloop import IOLoop

RECLAIM_EVERY_S = 60.0  # at most one full collection this often while sessions end
RECLAIM_DELAY_S = 10.0  # after a session ends, so that sessions ending together cost one


def full_collect() -> int:
    """Collect everything unreachable, frozen or not; the number of objects freed. A heap that
    was frozen is frozen again afterwards, and one that was not stays unfrozen."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    freed = gc.collect()
    if frozen:
        gc.freeze()
    return freed


class SessionGc:
    """The policy for one server process: when to freeze the heap and when to reclaim it."""

    def __init__(self, every_s: float = RECLAIM_EVERY_S, delay_s: float = RECLAIM_DELAY_S) -> None:
        self.every_s, self.delay_s = every_s, delay_s
        self.last_reclaim = float("-inf")  # monotonic time of the last full collection
        self.scheduled = None  # the event loop's handle of the next reclaim, if one is due

    def settle_session(self) -> None:
        """A session's page is built: collect the young garbage, then freeze everything left."""
        gc.collect(1)
        gc.freeze()

    def release_sessions(self, *_args) -> None:
        """A session ended (called on the server's event loop): reclaim its page soon."""
        if self.scheduled is not None:
            return  # the scheduled reclaim covers this session too
        delay = max(self.delay_s, self.last_reclaim + self.every_s - time.monotonic())
        self.scheduled = IOLoop.current().call_later(delay, self.reclaim)

    def reclaim(self) -> int:
        """Unfreeze, collect everything unreachable, freeze again; the number of objects freed."""
        self.scheduled = None
        freed = full_collect()
        gc.freeze()  # also when nothing was frozen yet: the policy keeps the heap frozen
        self.last_reclaim = time.monotonic()
        return freed
