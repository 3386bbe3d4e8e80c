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
"""
from __future__ import annotations

import gc
import time

from tornado.ioloop import IOLoop

RECLAIM_EVERY_S = 60.0  # at most one full collection this often while sessions end
RECLAIM_DELAY_S = 10.0  # after a session ends, so that sessions ending together cost one

_last_reclaim = float("-inf")
_scheduled = None  # the loop's handle of the next reclaim


def settle_session() -> None:
    """A session's page is built: collect the young garbage, then freeze everything left."""
    gc.collect(1)
    gc.freeze()


def release_sessions(*_args) -> None:
    """A session ended (called on the server's event loop): reclaim its page soon."""
    global _scheduled
    if _scheduled is not None:
        return  # the scheduled reclaim covers this session too
    delay = max(RECLAIM_DELAY_S, _last_reclaim + RECLAIM_EVERY_S - time.monotonic())
    _scheduled = IOLoop.current().call_later(delay, reclaim)


def reclaim() -> int:
    """Unfreeze, collect everything unreachable, freeze again; the number of objects freed."""
    global _last_reclaim, _scheduled
    _scheduled = None
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    _last_reclaim = time.monotonic()
    return freed
