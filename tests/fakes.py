"""Stand-ins shared by the lab's unit tests."""
from __future__ import annotations

from lab.runs import RunKey


class FakeService:
    """The engine service's surface as a DemoController uses it: records what a session asks
    for (every submission counted, foreground keys kept in order) and runs nothing."""

    def __init__(self) -> None:
        self.submitted = 0
        self.keys: list[RunKey] = []

    def submit(self, session, key, run, on_done, on_step=None, background=False) -> bool:
        self.submitted += 1
        if not background:
            self.keys.append(key)
        return False  # never answered from a cache

    def cached(self, key):
        return None

    def forget(self, session) -> None:
        pass

    def drop_background(self, session) -> None:
        pass

    def queue_position(self, session) -> int:
        return 0
