"""The workload plots in a real browser: the goodput-against-rate curve with its knee, and TPOT
against batch over both roofline floors, drawn from the background sweeps of a real server.

The server gets a short LAB_MAX_RUN_S so the rate sweep keeps only rates whose arrivals fit in a
few seconds, and the page asks for a small workload: both sweeps finish within a minute or two on
a 2-core machine. The plots' data are read through BokehJS's public document API.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import ARTIFACTS, CHROMIUM, lab_server, open_tab

pytestmark = pytest.mark.browser
SETTINGS = "?embed=demo&batch=4&requests=4&context=32&output=8&page=16"

RENDERED = """(name) => {
  for (const doc of window.Bokeh.documents) {
    const model = doc.get_model_by_name(name);
    if (model == null) continue;
    const source = model.data_source;
    return {visible: model.visible, points: source ? source.get_length() : null,
            location: model.location ?? null};
  }
  return null;
}"""


@pytest.fixture(scope="module")
def quick_lab():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    with lab_server(env={"LAB_MAX_RUN_S": "6"}) as url:
        yield url


@pytest.fixture
def demo(page: Page, quick_lab: str) -> tuple[Page, list[str]]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(quick_lab + SETTINGS)
    expect(page.locator(".run-status").first).to_contain_text("Measured", timeout=120_000)
    return page, errors


def wait_sweep(page: Page, css: str) -> str:
    """The plot's text equivalent once its sweep has finished."""
    text = page.locator(css).first
    expect(text).to_contain_text("Measured", timeout=240_000)
    expect(text).not_to_contain_text("still filling in", timeout=240_000)
    # Panel renders the pane in a shadow root: the host's own inner text is empty.
    return " ".join(page.locator(css + " p").all_inner_texts())


def test_goodput_against_rate_renders_with_its_knee(demo):
    page, errors = demo
    open_tab(page, "Batch and rate sweeps")
    text = wait_sweep(page, ".goodput_rate-text")
    assert "req/s" in text and ("Knee at" in text or "knee lies above" in text or "no knee" in text)
    goodput = page.evaluate(RENDERED, "goodput")
    assert goodput is not None and goodput["points"] >= 3
    knee = page.evaluate(RENDERED, "knee")
    assert knee is not None and knee["visible"] == ("no knee" not in text)
    page.locator(".plot-goodput_rate").screenshot(path=str(ARTIFACTS / "goodput_rate.png"))
    assert errors == [], errors


def test_tpot_against_batch_renders_both_floors(demo):
    page, errors = demo
    open_tab(page, "Batch and rate sweeps")
    text = wait_sweep(page, ".tpot_batch-text")
    assert "batch 1:" in text and "floor" in text
    memory = page.evaluate(RENDERED, "memory-floor")
    compute = page.evaluate(RENDERED, "compute-floor")
    assert memory is not None and compute is not None
    assert memory["points"] == compute["points"] == 7  # a floor at every batch of the sweep
    ridge = page.evaluate(RENDERED, "ridge")
    assert ridge is not None and ridge["visible"] == ("cross" in text)
    page.locator(".plot-tpot_batch").screenshot(path=str(ARTIFACTS / "tpot_batch.png"))
    assert errors == [], errors
