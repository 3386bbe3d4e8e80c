"""Protocol sessions (tools/load_protocol.py): real server sessions driven without a browser.

Starts its own `panel serve`, opens two sessions over Bokeh's websocket protocol with cheap settings
from the URL, moves each one's batch slider three times, and checks that every move was answered by
a finished summary table and that the server held both sessions while they lived.
"""
from __future__ import annotations

import pytest

from tools.load import diagnostics
from tools.load_protocol import ProtocolClass, _finished_table
from tests.browser.conftest import ARTIFACTS, lab_server

pytestmark = pytest.mark.browser  # it serves the app, like the browser tests (no chromium needed)
CHEAP = "batch=1&requests=1&context=16&page=16&output=2"


def test_the_clients_marks_are_the_pages_own() -> None:
    # The load clients find the status line by its class and read "done" by its first word; both
    # are written again there, so that a client need not import the page (and panel).
    import inspect

    from lab import demo_view
    from lab.demo_view import STATUS_TEXT
    from tools.load_protocol import DONE_PREFIX, STATUS_MARK

    assert STATUS_TEXT["done"].startswith(DONE_PREFIX)
    assert not any(text.startswith(DONE_PREFIX) for k, text in STATUS_TEXT.items() if k != "done")
    assert f'css_classes=["{STATUS_MARK}"]' in inspect.getsource(demo_view)


def test_finished_table_ignores_a_stale_one() -> None:
    assert _finished_table('&lt;table class=&quot;summary-table&quot;&gt;')
    assert not _finished_table('&lt;table class=&quot;summary-table stale&quot;&gt;')
    assert not _finished_table("&lt;p&gt;the page has no table yet&lt;/p&gt;")


@pytest.mark.timeout(300)
def test_protocol_sessions_move_and_get_measured_tables() -> None:
    ARTIFACTS.mkdir(exist_ok=True)  # the server's log goes there
    with lab_server(extra=["--liveness", "--plugins", "tools.diagnostics"]) as url:
        crowd = ProtocolClass(f"{url}?{CHEAP}", sessions=2, moves=3, think_s=0.2,
                              timeout_s=90, stagger_s=0.2, seed=0)
        crowd.wait_opened()
        snapshot = diagnostics(url)
        assert snapshot["sessions"] >= 2
        # Measured runs happen in the engine server: a page process with live, measured
        # sessions has never loaded torch.
        assert snapshot["torch_loaded"] is False
        crowd.start()
        tally = crowd.join()
    assert tally.opened == 2 and tally.errors == []
    assert len(tally.latency_ms) == 6 and all(ms > 0 for ms in tally.latency_ms)
