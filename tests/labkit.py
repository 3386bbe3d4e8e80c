"""Helpers for the lab's tests: a real engine server (lab routes, CPU) on a thread of the test
process, a DemoController wired to it, and `settle`, which ticks a session until a condition holds.

Ticks are driven by hand here (no `panel serve`, so no periodic callback): `settle` calls the
session's ticker, which is what the served page's periodic callback does every period.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from engine.analytic import DeviceProbe
from lab.engine_client import EngineClient, EngineInfo
from lab.runs import Limits
from tests.serverkit import AppThread

# A fixed device for the tests of pure checks (no server needed): a slow 2-thread CPU.
TEST_ENGINE = EngineInfo(device_type="cpu", device="CPU: 1 thread",
                         probe=DeviceProbe("CPU: 1 thread", bandwidth_gbs=10.0,
                                           matmul_tflops=0.1),
                         kv_cap_bytes=256 * 2**20, max_run_s=20.0)


@contextmanager
def lab_engine(max_run_s: float = 60.0):
    """A client of a fresh engine server on a thread, measuring on this machine's CPU."""
    from engine.server.lab_routes import LabRuns, routes

    lab = LabRuns(device="cpu", kv_cap_bytes=256 * 2**20, max_run_s=max_run_s)
    app = AppThread(routes(lab))
    try:
        yield EngineClient(app.url), lab
    finally:
        lab.stop()
        app.close()


def make_demo(client: EngineClient, state, limits: Limits | None = None):
    from lab.demo import DemoController
    from lab.engine_client import TraceCache
    from lab.ticker import Ticker

    return DemoController(state, client, limits or Limits(), TraceCache(), Ticker(250))


def settle(demo, until=None, timeout: float = 120.0) -> bool:
    """Tick `demo` until `until()` (default: its run is no longer queued or running)."""
    until = until or (lambda: demo.run.status not in ("queued", "running"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        demo.ticker.tick()
        if until():
            return True
        time.sleep(0.02)
    return False


def queue_idle(lab, timeout: float = 180.0) -> bool:
    """The engine server's queue has nothing waiting or running (background runs included)."""
    return lab.queue.wait_idle(timeout)


def settle_all(demo, lab, timeout: float = 300.0) -> bool:
    """Tick `demo` until its run and every background run it asked for have come back, and the
    engine server's queue is idle."""
    def all_back() -> bool:
        return (demo.run.status not in ("queued", "running") and not demo._background_done
                and not demo._inbox and lab.queue.stats()["waiting"] == 0
                and lab.queue.stats()["background"] == 0 and lab.queue.stats()["running"] == 0)
    return settle(demo, all_back, timeout)
