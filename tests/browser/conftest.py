"""Browser tests: a real `panel serve` of the lab, driven by Playwright in Debian's chromium.

The server runs on a free local port with the tiny test model limits; chromium is launched from
/usr/bin/chromium (Playwright cannot download browsers here) with the flags this sandbox needs.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]
ARTIFACTS = ROOT / "test-results"

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app: str, port: int, env: dict[str, str] | None = None,
          extra: list[str] | None = None) -> subprocess.Popen:
    """Start `panel serve` and wait until it answers."""
    cmd = [sys.executable, "-m", "panel", "serve", app, "--port", str(port), "--address",
           "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
           "--allow-websocket-origin", f"localhost:{port}", *(extra or [])]
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"server-{port}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited early; see {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/liveness", timeout=1)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("panel serve did not come up within 60 s")


@pytest.fixture(scope="session")
def lab_url():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with lab_server() as url:
        yield url


@contextlib.contextmanager
def engine_server(env: dict[str, str] | None = None):
    """`python -m engine serve` measuring on the CPU, as `python -m lab` starts it; yields its URL."""
    from lab.engine_client import EngineClient
    from lab.engine_process import start_engine, stop_engine

    env = {**os.environ, "LAB_DEVICE": "cpu", "LAB_MAX_RUN_S": "30", **(env or {})}
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"engine-{free_port()}.log", "w")
    engine, url = start_engine(env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        EngineClient(url).wait_ready(timeout_s=120)
        yield url
    finally:
        stop_engine(engine)


@contextlib.contextmanager
def lab_server(env: dict[str, str] | None = None, extra: list[str] | None = None,
               engine_url: str | None = None):
    """Serve lab/app.py on a free port, with an engine server of its own measuring on the CPU
    (as `python -m lab` does) unless `engine_url` names one; yields the app's URL."""
    if engine_url is None:
        with engine_server(env) as url:
            with lab_server(env, extra, url) as app:
                yield app
        return
    env = {**os.environ, "LAB_DEVICE": "cpu", "LAB_MAX_RUN_S": "30", **(env or {}),
           "LAB_ENGINE_URL": engine_url}
    port = free_port()
    proc = serve("lab/app.py", port, env=env, extra=extra or ["--liveness"])
    try:
        # One request first, so the server's one-time work (imports, content, the first page
        # build) is not charged to whichever test happens to run first.
        urllib.request.urlopen(f"http://127.0.0.1:{port}/app", timeout=180).read()
        yield f"http://127.0.0.1:{port}/app"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def slider(scope, label: str):
    """The handle of the slider whose title starts with `label` (a page or an iframe's frame)."""
    return scope.locator(".bk-input-group", has_text=label).locator(".noUi-handle")


def open_tab(scope, label: str) -> None:
    """Open the demo's plot tab named `label` (lab/demo_view.py PLOT_GROUPS): the plots of a
    closed tab are not in the page until it is opened."""
    scope.locator(".bk-tab", has_text=label).first.click()


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture
def page(page):
    """Playwright's page, with timeouts sized for a shared 2-core machine running the engine."""
    page.set_default_navigation_timeout(120_000)
    page.set_default_timeout(60_000)
    return page
