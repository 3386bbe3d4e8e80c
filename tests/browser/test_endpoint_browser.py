"""The lab pointed at an external OpenAI-compatible endpoint (LAB_ENDPOINT), in a real browser.

`python -m engine serve` on loopback stands in for a vLLM deployment: once with its /metrics, where
the TTFT and TPOT the lab measures on the client must agree within 15% with the means of the
server's own histograms over the same run (their _sum and _count, read before and after it), and
once with `--no-metrics`, where the page must still measure, say that the KV panel has nothing to
draw, and log no console error. The page servers start no engine server of their own.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from lab.prometheus_text import interval_mean, read_sample
from tests.browser.conftest import ARTIFACTS, CHROMIUM, ROOT, free_port, open_tab, serve
from tests.serverkit import get, wait_until

pytestmark = pytest.mark.browser
# Prompts long enough that TTFT (prefill) dwarfs the few milliseconds a request spends in HTTP.
SETTINGS = "?embed=demo&batch=4&requests=8&context=512&output=32"


@contextlib.contextmanager
def endpoint(*flags: str):
    """`python -m engine serve` (cpu-8m, one thread, no lab routes) as the external endpoint."""
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log = open(ARTIFACTS / f"endpoint-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--model", "cpu-8m", "--host", "127.0.0.1",
         "--port", str(port), "--cpu-threads", "1", "--max-num-seqs", "8", "--no-lab", *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
        stderr=subprocess.STDOUT)

    def healthy() -> bool:
        try:
            return get(port, "/health", timeout=1)[0] == 200
        except OSError:
            return False
    try:
        assert wait_until(healthy, timeout=60, every=0.2), "engine serve did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(20)


@contextlib.contextmanager
def endpoint_lab(url: str):
    """A page server measuring `url`; no LAB_ENGINE_URL, so no engine server and no classroom."""
    port = free_port()
    proc = serve("lab/app.py", port, env={"LAB_ENDPOINT": url, "LAB_ENGINE_URL": "",
                                          "LAB_MAX_RUN_S": "30"}, extra=["--liveness"])
    try:
        yield f"http://127.0.0.1:{port}/app"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def measured():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    with endpoint() as url, endpoint_lab(url) as app:
        yield url, app


@pytest.fixture(scope="module")
def unmetered():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    with endpoint("--no-metrics") as url, endpoint_lab(url) as app:
        yield url, app


def open_demo(page: Page, app: str) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app + SETTINGS)
    expect(page.locator(".run-status").first).to_contain_text("Measured on the endpoint",
                                                              timeout=120_000)
    return errors


def row(page: Page, label: str) -> str:
    return page.locator("table.summary-table tr", has_text=label).locator("td").inner_text()


def text_of(page: Page, css: str) -> str:
    return " ".join(page.locator(css + " p").all_inner_texts())


def server_means(url: str) -> tuple[float, float] | None:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        s = read_sample(resp.read().decode(), 0.0)
    return s.ttft, s.itl


def test_client_ttft_and_tpot_agree_with_the_endpoints_own_histograms(page: Page, measured):
    url, app = measured
    errors = open_demo(page, app)
    banner = page.locator(".device-banner").first
    expect(banner).to_contain_text("127.0.0.1")
    expect(banner).to_contain_text("cpu-8m")
    expect(banner).to_contain_text("/tokenize")
    # The page's own reading of the endpoint's histograms for its first run.
    for client, server in (("TTFT mean, client (ms)", "TTFT mean, endpoint's /metrics (ms)"),
                           ("TPOT mean, client (ms)", "ITL mean, endpoint's /metrics (ms)")):
        assert float(row(page, client)) == pytest.approx(float(row(page, server)), rel=0.15)
    # A second measurement, with the server's histograms read by this test around it.
    first_ttft = row(page, "TTFT mean, client (ms)")
    ttft0, itl0 = server_means(url)
    page.locator(".run-again button").click()
    expect(page.locator("table.summary-table tr", has_text="TTFT mean, client (ms)")
           .locator("td")).not_to_have_text(first_ttft, timeout=120_000)
    expect(page.locator(".run-status").first).to_contain_text("Measured on the endpoint")
    ttft1, itl1 = server_means(url)
    (server_ttft, n), (server_itl, _) = interval_mean(ttft0, ttft1), interval_mean(itl0, itl1)
    assert n == 8
    client_ttft, client_tpot = (float(row(page, "TTFT mean, client (ms)")),
                                float(row(page, "TPOT mean, client (ms)")))
    print(f"client TTFT {client_ttft} ms, server {server_ttft * 1e3:.3f} ms; "
          f"client TPOT {client_tpot} ms, server ITL {server_itl * 1e3:.3f} ms")
    assert client_ttft == pytest.approx(server_ttft * 1e3, rel=0.15)
    assert client_tpot == pytest.approx(server_itl * 1e3, rel=0.15)
    open_tab(page, "KV memory and pages")
    expect(page.locator(".kv_memory-text").first).to_contain_text("Peak KV cache use")
    expect(page.locator(".page_map-text").first).to_contain_text("does not expose")
    page.locator(".demo").first.screenshot(path=str(ARTIFACTS / "endpoint_demo.png"))
    assert errors == [], errors


def test_an_endpoint_without_metrics_still_measures_and_says_so(page: Page, unmetered):
    _url, app = unmetered
    errors = open_demo(page, app)
    assert float(row(page, "TTFT p50 (ms)")) > 0 and float(row(page, "TPOT p50 (ms)")) > 0
    assert row(page, "KV GB (measured)") == "not exposed"
    assert "does not expose" in text_of(page, ".timeline-text")
    open_tab(page, "KV memory and pages")
    expect(page.locator(".kv_memory-text").first).to_contain_text("missing or unreadable")
    open_tab(page, "Queue and policies")
    expect(page.locator(".queue-text").first).to_contain_text("missing or unreadable")
    assert errors == [], errors
