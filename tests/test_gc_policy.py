"""lab/gc_policy.py: pages frozen out of the collector's full passes, reclaimed when sessions end."""
from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from lab import gc_policy


class Page:
    """Stands in for a session's page: objects that refer to each other."""

    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def run_on_a_loop(coro_fn):
    """asyncio.run in a thread of its own: the browser tests leave a loop running in this one."""
    out = []
    worker = threading.Thread(target=lambda: out.append(asyncio.run(coro_fn())))
    worker.start()
    worker.join()
    return out[0]


@pytest.fixture(autouse=True)
def unfrozen():
    yield
    gc.unfreeze()  # leave the test process's collector as it was
    if gc_policy._scheduled is not None:
        gc_policy._scheduled = None


def test_a_settled_page_is_out_of_reach_until_reclaimed() -> None:
    page = Page()
    gone = weakref.ref(page)
    gc_policy.settle_session()
    assert gc.get_freeze_count() > 0
    del page  # the session ended: the page is garbage, but frozen
    gc.collect()
    assert gone() is not None  # a full pass (Panel's after a session) does not see it
    assert gc_policy.reclaim() > 0
    assert gone() is None
    assert gc.get_freeze_count() > 0  # frozen again after the reclaim


def test_sessions_ending_together_cost_one_reclaim() -> None:
    async def end_three() -> list:
        handles = []
        for _ in range(3):
            gc_policy.release_sessions(None)
            handles.append(gc_policy._scheduled)
        return handles

    handles = run_on_a_loop(end_three)
    assert handles[0] is not None and handles.count(handles[0]) == 3


def test_a_reclaim_waits_out_the_minute_since_the_last_one() -> None:
    async def delay_after_a_reclaim() -> float:
        gc_policy.reclaim()
        gc_policy.release_sessions(None)
        return gc_policy._scheduled.when() - asyncio.get_running_loop().time()

    delay = run_on_a_loop(delay_after_a_reclaim)
    assert gc_policy.RECLAIM_EVERY_S - 5 < delay <= gc_policy.RECLAIM_EVERY_S
