"""The concept page in a real browser against a real server and engine: it loads cleanly, shows
every section and its formulas, and its measured numbers respond to the sliders."""
from __future__ import annotations

import math
import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import ARTIFACTS, open_tab
from tests.browser.conftest import slider as slider_handle

pytestmark = pytest.mark.browser
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")
SLIDERS = {"batch": "Batch size", "context": "Context length", "page": "Page size",
           "output": "Output tokens"}  # the sliders' titles


def watch(page: Page) -> tuple[list[str], list[str]]:
    """Collect console errors and any request that leaves this machine."""
    errors: list[str] = []
    external: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith(LOCAL) else external.append(r.url))
    return errors, external


def summary(page: Page) -> dict[str, str]:
    """The summary table, row label -> displayed value."""
    rows = page.locator("table.summary-table tr")
    out = {}
    for i in range(rows.count()):
        row = rows.nth(i)
        if row.locator("th").count() and row.locator("td").count():
            out[row.locator("th").first.inner_text().strip()] = row.locator("td").first.inner_text().strip()
    return out


def wait_measured(page: Page, timeout: float = 90_000) -> None:
    expect(page.locator(".run-status").first).to_contain_text("Measured", timeout=timeout)


def move(page: Page, slider: str, key: str, presses: int) -> None:
    """Move a slider with the keyboard, as a learner using arrows would."""
    handle = slider_handle(page, SLIDERS[slider])
    handle.focus()
    for _ in range(presses):
        handle.press(key)


def wait_for(page: Page, label: str, ok, timeout: float = 90_000) -> str:
    """Poll the summary until `ok(value of label)` holds on a finished run; return that value.
    Several keyboard steps send several runs (each supersedes the last), so intermediate results
    may show first."""
    deadline = page.evaluate("Date.now()") + timeout
    while page.evaluate("Date.now()") < deadline:
        value = summary(page).get(label, "—")
        status = page.locator(".run-status p").first.inner_text()
        if value != "—" and "Measured" in status and ok(value):
            return value
        page.wait_for_timeout(250)
    raise AssertionError(f"{label} never satisfied the check; last {summary(page).get(label)}, "
                         f"status {page.locator('.run-status p').first.inner_text()!r}")


@pytest.fixture
def loaded(page: Page, lab_url: str):
    errors, external = watch(page)
    page.goto(lab_url + "?batch=4&requests=4&context=64&output=16&page=16")
    wait_measured(page)
    return page, errors, external


def test_page_loads_clean_with_every_section_and_formulas(loaded):
    page, errors, external = loaded
    for section in ("intuition", "math", "code", "demo"):
        expect(page.locator(f"#{section}")).to_have_count(1)
    headings = page.locator("h2.section-heading").all_inner_texts()
    assert [h.split()[0] for h in headings[:4]] == ["01", "02", "03", "04"]
    assert page.locator(".katex").count() >= 4
    expect(page.locator("h1.lab-title")).to_contain_text("LLM Serving at Scale")
    expect(page.locator(".device-banner").first).to_contain_text("Measured on CPU")
    values = summary(page)
    for label in ("TTFT p50 (ms)", "TPOT p50 (ms)", "KV GB (measured)", "Waste tokens (measured)",
                  "Goodput (req/s)"):
        assert label in values and values[label] != "—"
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    assert errors == [], errors
    assert external == [], external


def test_batch_slider_changes_measured_tpot_and_kv(page: Page, lab_url: str):
    errors, _ = watch(page)
    page.goto(lab_url + "?batch=4&requests=16&context=64&output=16&page=16")
    wait_measured(page)
    before = summary(page)
    move(page, "batch", "End", 1)  # 4 -> 64: all 16 requests run at once
    kv_before = float(before["KV GB (measured)"])
    # Four times the sequences of the same length hold four times the pages.
    wait_for(page, "KV GB (measured)", lambda v: math.isclose(float(v), 4 * kv_before, rel_tol=0.01))
    assert summary(page)["TPOT p50 (ms)"] != before["TPOT p50 (ms)"]
    assert errors == [], errors


def test_page_size_changes_waste_as_the_formula_says(loaded):
    page, errors, _ = loaded
    move(page, "page", "End", 1)  # 16 -> 256 tokens per page
    # 4 requests grow from 64 to 79 cached tokens; the peak of the sum of ceil(T/P)*P - T:
    expected = 4 * max(math.ceil(t / 256) * 256 - t for t in range(64, 80))
    wait_for(page, "Waste tokens (measured)", lambda v: int(float(v)) == expected)
    tab = page.locator(".bk-tab", has_text="KV memory and pages").first
    skip = page.locator(".gate-skip button")  # a move may ask for a prediction: skip it
    expect(tab.or_(skip).first).to_be_visible()
    if skip.is_visible():
        skip.click()
    open_tab(page, "KV memory and pages")
    expect(page.locator(".page_map-text").first).to_contain_text("Measured waste")
    text = page.locator(".page_map-text p").first.inner_text()
    measured, formula = (int(x) for x in re.search(
        r"Measured waste: (\d+) tokens.*?; formula .*?: (\d+) tokens", text).groups())
    assert measured == formula
    assert errors == [], errors


# Counts shadow roots that load Bootstrap's whole stylesheet, and finds a heading's font size.
STANDALONE_CSS_JS = """() => {
  let n = 0;
  const walk = (root) => { for (const el of root.querySelectorAll('*')) { if (el.shadowRoot) {
    if (el.shadowRoot.querySelector('link[href*="bootstrap.min.css"]')) n++;
    walk(el.shadowRoot); } } };
  walk(document); return n; }"""
HEADING_SIZE_JS = """(id) => {
  const find = (root) => { const el = root.querySelector('#' + id); if (el) return el;
    for (const n of root.querySelectorAll('*')) { if (n.shadowRoot) {
      const f = find(n.shadowRoot); if (f) return f; } } return null; };
  const el = find(document); return el ? getComputedStyle(el).fontSize : null; }"""


def test_plots_and_panels_made_after_the_page_are_styled_like_it(loaded):
    """A plot tab, or an "after the first pass" panel, is made when first opened; it must look
    like what was made with the page (lab/late.py), not carry Bootstrap's stand-alone CSS."""
    page, errors, _ = loaded
    first = page.evaluate(HEADING_SIZE_JS, "plot-latency")
    standalone = page.evaluate(STANDALONE_CSS_JS)  # the first tab's two text panes among them
    open_tab(page, "KV memory and pages")
    expect(page.locator(".kv_memory-text").first).to_be_visible()
    assert page.evaluate(HEADING_SIZE_JS, "plot-kv_memory") == first
    page.locator(".after-open-storyboard button").first.click()
    expect(page.locator(".storyboard-counter").first).to_be_visible()
    assert page.evaluate(STANDALONE_CSS_JS) <= standalone
    assert errors == [], errors
