"""The prediction gate and the after-the-first-pass panels in a real browser: the gate hides the
measured result until a prediction is committed, the storyboard steps through the real trace, and
the research draft lives in the browser's localStorage across a reload."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect
from tests.browser.conftest import slider

pytestmark = pytest.mark.browser
SETTINGS = "?batch=4&requests=4&context=64&output=16&page=16"  # a run of a second or two on a CPU
DRAFT_KEY = "serving-lab:research:concept:llm-systems/llm-serving"


def wait_measured(page: Page, timeout: float = 90_000) -> None:
    expect(page.locator(".run-status").first).to_contain_text("Measured", timeout=timeout)


@pytest.fixture
def loaded(page: Page, lab_url: str) -> Page:
    page.goto(lab_url + SETTINGS)
    wait_measured(page)
    return page


def test_gate_hides_the_result_until_a_prediction_is_committed(loaded: Page):
    page = loaded
    table = page.locator("table.summary-table")
    expect(table).to_be_visible()  # the first run needs no prediction
    handle = slider(page, "Batch size")
    handle.focus()
    handle.press("ArrowRight")
    expect(page.locator(".gate-ask")).to_contain_text("batch size", timeout=60_000)
    expect(page.locator(".gate-placeholder")).to_contain_text("Commit your prediction")
    expect(table).to_be_hidden()
    wait_measured(page)  # the run finishes, and the result stays covered
    page.wait_for_timeout(500)
    expect(table).to_be_hidden()
    expect(page.locator(".gate-commit button")).to_be_disabled()
    page.get_by_text("It rises a little").click()
    page.locator(".gate-commit button").click()
    verdict = page.locator(".gate-verdict")
    expect(verdict).to_contain_text(re.compile(r"agreed with|did not agree"), timeout=30_000)
    expect(verdict).to_contain_text("median TPOT (ms)")
    expect(table).to_be_visible()
    expect(page.locator(".gate-placeholder")).to_be_hidden()


def test_skip_reveals_without_a_verdict(loaded: Page):
    page = loaded
    handle = slider(page, "Output tokens")
    handle.focus()
    handle.press("ArrowLeft")
    expect(page.locator(".gate-placeholder")).to_be_visible(timeout=60_000)
    page.locator(".gate-skip button").click()
    wait_measured(page)
    expect(page.locator("table.summary-table")).to_be_visible(timeout=30_000)
    expect(page.locator(".gate-verdict-pane")).to_contain_text("skipped")


def open_panel(page: Page, panel_id: str) -> None:
    """Press a panel's "Open" button: after-the-first-pass panels are built on first open."""
    button = page.locator(f".after-open-{panel_id} button")
    expect(button).to_be_visible(timeout=30_000)
    button.click()
    expect(button).to_be_hidden(timeout=30_000)


def test_storyboard_steps_through_the_real_trace(loaded: Page):
    page = loaded
    open_panel(page, "storyboard")
    counter = page.locator(".sb-counter")
    expect(counter).to_contain_text(re.compile(r"Engine step 0 · 1 of \d+"), timeout=60_000)
    total = int(re.search(r"of (\d+)", counter.inner_text()).group(1))
    assert total > 2
    events = page.locator(".sb-events")
    expect(events).to_contain_text("joined the batch")
    before = events.inner_text()
    text_before = page.locator(".storyboard-text").inner_text()
    page.locator(".storyboard-forward button").click()
    expect(counter).to_contain_text(f"2 of {total}")
    expect(page.locator(".storyboard-text")).not_to_have_text(text_before)
    page.locator(".storyboard-forward button").click()
    expect(counter).to_contain_text(f"3 of {total}")
    for _ in range(total):  # somewhere later a request finishes and leaves
        if "left the batch" in events.inner_text() or counter.inner_text().endswith(
                f"{total} of {total}"):
            break
        page.locator(".storyboard-forward button").click()
        page.wait_for_timeout(150)
    assert events.inner_text() != before


def test_research_draft_survives_a_reload_and_stays_in_the_browser(loaded: Page):
    page = loaded
    open_panel(page, "research")
    question = page.locator(".research-draft textarea")
    action = page.locator(".research-draft input")
    question.fill("Why does TPOT barely move when the batch doubles on this CPU?")
    action.fill("Run batch 4 and 8 and compare TPOT p50")
    expect(page.locator(".research-draft .status")).to_contain_text("Draft saved in this browser")
    stored = page.evaluate(f"JSON.parse(localStorage.getItem('{DRAFT_KEY}'))")
    assert stored["question"].startswith("Why does TPOT barely move")
    prompt = page.locator(".research-prompt pre")
    expect(prompt).to_contain_text("concept:llm-systems/llm-serving")
    expect(prompt).to_contain_text("batch=4 context=64 page=16 output=16")
    expect(prompt).to_contain_text("Why does TPOT barely move")
    page.reload()
    wait_measured(page)
    open_panel(page, "research")
    expect(question).to_have_value("Why does TPOT barely move when the batch doubles on this CPU?")
    expect(action).to_have_value("Run batch 4 and 8 and compare TPOT p50")
    expect(prompt).to_contain_text("Why does TPOT barely move")  # restored values reach the prompt
    page.locator(".research-draft button").click()  # clear the draft
    assert page.evaluate(f"localStorage.getItem('{DRAFT_KEY}')") is None
