"""Shareable state in the URL, and the compact demo inside another site's iframe."""
from __future__ import annotations

import http.server
import threading
from urllib.parse import parse_qs, urlparse

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import free_port, slider

pytestmark = pytest.mark.browser


def slider_titles(scope) -> list[str]:
    return [t.strip() for t in scope.locator(".bk-slider-title").all_inner_texts()]


def test_a_shared_link_restores_the_sliders(page: Page, lab_url: str):
    page.goto(lab_url + "?batch=12&context=96&page=8&output=20&ttft_slo=300&tpot_slo=40")
    expect(page.locator(".bk-slider-title", has_text="Batch size")).to_contain_text("12")
    titles = " | ".join(slider_titles(page))
    for expected in ("Batch size (most running at once): 12", "Context length (prompt tokens): 96",
                     "Page size (tokens per block): 8", "Output tokens: 20", "TTFT SLO (ms): 300",
                     "TPOT SLO (ms): 40"):
        assert expected in titles
    expect(page.locator(".copy-link button").first).to_be_visible()
    # Moving a slider writes the new value back into the address bar.
    handle = slider(page, "Output tokens")
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function("() => new URLSearchParams(location.search).get('output') === '21'",
                           timeout=30_000)
    query = parse_qs(urlparse(page.url).query)
    assert query["batch"] == ["12"] and query["page"] == ["8"]


@pytest.fixture
def host_site(lab_url: str):
    """A page on another origin (localhost, another port) that embeds the demo in an iframe."""
    app = lab_url.replace("/app", "/app?embed=demo&batch=2&context=32&output=8")
    html = (f'<!doctype html><title>Course</title><h1>Week 7</h1>'
            f'<iframe id="lab" src="{app}" width="1000" height="1600"></iframe>')

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}/"
    server.shutdown()


def test_the_demo_works_inside_an_iframe_on_another_origin(page: Page, host_site: str):
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(host_site)
    frame = page.frame_locator("#lab")
    # Compact: the demo alone, no page header or reading sections.
    expect(frame.locator(".run-status p").first).to_contain_text("Measured", timeout=90_000)
    assert frame.locator("h1.lab-title").count() == 0
    assert frame.locator("#intuition").count() == 0
    cells = frame.locator("table.summary-table td").all_inner_texts()
    assert cells and all(c.strip() not in ("", "—") for c in cells[:5])
    assert errors == [], errors

