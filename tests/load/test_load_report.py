"""The load script end to end: a browser page and protocol sessions against a real server.

Starts its own `panel serve`, runs `python -m tools.load` with one browser session and two
protocol sessions at cheap settings, two moves each, and checks the report: every session opened,
every move measured with no error, the figures well formed, and the text table printable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tools.load import table
from tests.browser.conftest import ARTIFACTS, CHROMIUM, ROOT, lab_server

pytestmark = pytest.mark.browser
CHEAP = "batch=1&requests=1&context=16&page=16&output=2"


@pytest.mark.timeout(420)
def test_load_reports_browser_and_protocol_moves() -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with lab_server(extra=["--liveness", "--plugins", "tools.diagnostics"]) as url:
        done = subprocess.run(
            [sys.executable, "-m", "tools.load", "--url", f"{url}?{CHEAP}", "--sessions", "1",
             "--protocol-sessions", "2", "--moves", "2", "--think", "0.3", "--stagger", "0.2",
             "--timeout", "120", "--json"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=400)
    assert done.stdout, done.stderr[-2000:]
    result = json.loads(done.stdout)
    proto = result["protocol"]
    assert done.returncode == 0, result["error_samples"] + proto["error_samples"]
    assert result["opened"] == 1 and proto["opened"] == 2
    assert result["latency_ms"]["n"] == 2 and proto["latency_ms"]["n"] == 4
    assert proto["all_latency_ms"]["n"] == 6
    assert 0 < proto["all_latency_ms"]["p50"] <= proto["all_latency_ms"]["p95"]
    assert proto["open_s"]["n"] == 2 and proto["client_cpu_s"] >= 0
    assert result["diagnostics_after"]["sessions"] >= 1  # the server's own account was read
    assert "gen2" in result["diagnostics_after"]["gc"]
    # The page process reports the engine server's queue, which ran the warm-up's settings.
    assert result["diagnostics_after"]["engine_queue"]["runs_started"] >= 1
    text = table(result)
    assert "protocol moves p50 / p95" in text and "server CPU during opening" in text
