"""Stand-ins shared by the lab's unit tests."""
from __future__ import annotations

from lab.engine_client import EngineInfo


class FakeClient:
    """The engine client's surface as a DemoController uses it: answers `info()` with a fixed
    device, records what a session asks to run, and measures nothing."""

    def __init__(self, engine: EngineInfo) -> None:
        self._engine = engine
        self.submitted = 0
        self.specs: list[dict] = []

    def info(self) -> EngineInfo:
        return self._engine

    def stream(self, session, runs, on_event, background=False, max_run_s=None):
        self.submitted += 1
        if not background:
            self.specs.extend(runs)
        return None
