"""tools/gc_policy.py: pages frozen out of the collector's full passes, reclaimed later."""
from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest

from tools.gc_policy import SessionGc, full_collect


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


@pytest.fixture
def policy():
    yield SessionGc()
    gc.unfreeze()  # leave the test process's collector as it was


def test_a_settled_page_is_out_of_reach_until_reclaimed(policy: SessionGc) -> None:
    page = Page()
    gone = weakref.ref(page)
    policy.settle_session()
    assert gc.get_freeze_count() > 0
    del page  # the session ended: the page is garbage, but frozen
    gc.collect()
    assert gone() is not None  # a full pass (Panel's after a session) does not see it
    assert policy.reclaim() > 0
    assert gone() is None
    assert gc.get_freeze_count() > 0  # frozen again after the reclaim


def test_full_collect_reaches_frozen_garbage_and_keeps_the_freeze_as_it_was(
        policy: SessionGc) -> None:
    page = Page()
    gone = weakref.ref(page)
    del page
    assert full_collect() > 0 and gone() is None
    assert gc.get_freeze_count() == 0  # a heap nobody froze is not frozen by counting
    page = Page()
    gone = weakref.ref(page)
    policy.settle_session()
    del page
    assert full_collect() > 0 and gone() is None
    assert gc.get_freeze_count() > 0


def test_sessions_ending_together_cost_one_reclaim(policy: SessionGc) -> None:
    async def end_three() -> list:
        handles = []
        for _ in range(3):
            policy.release_sessions(None)
            handles.append(policy.scheduled)
        return handles

    handles = run_on_a_loop(end_three)
    assert handles[0] is not None and handles.count(handles[0]) == 3


def test_a_reclaim_waits_out_the_minute_since_the_last_one(policy: SessionGc) -> None:
    async def delay_after_a_reclaim() -> float:
        policy.reclaim()
        policy.release_sessions(None)
        return policy.scheduled.when() - asyncio.get_running_loop().time()

    delay = run_on_a_loop(delay_after_a_reclaim)
    assert policy.every_s - 5 < delay <= policy.every_s
