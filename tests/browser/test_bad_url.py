"""A malformed or out-of-range link never shows the learner a traceback: values are clamped or
dropped with a visible notice, the console stays clean and the demo still measures."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

# Clamps to batch 1, page 1, output 1 (a cheap run); context and the SLO are dropped; the model name
# tries markup. Unknown keys are ignored.
BAD = ("?batch=-3&context=abc&page=-5&output=0&tpot_slo=inf&model=%3Cb%3Ebold%3C%2Fb%3E"
       "&nonsense=%F0%9F%92%A5")
NASTY = [
    "?batch=1&batch=99999&context=16&output=1",  # a repeated key
    "?batch=%ZZ&context=" + "9" * 300 + "&output=1",  # a broken escape; 8192 tokens: refused
    "?page=\u0661\u0666&batch=1&output=1&context=16&embed=demo&theme=%3Cscript%3E",  # Arabic digits
]
DEEP_TEXT = """() => {
  const out = [];
  const walk = root => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
    }
    out.push(root === document ? document.body.innerText : root.textContent);
  };
  walk(document);
  return out.join('\\n');
}"""


def watch(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


def assert_no_traceback(page: Page) -> None:
    text = page.evaluate(DEEP_TEXT)
    assert "Traceback" not in text and 'File "' not in text


def test_a_malformed_link_is_clamped_with_a_notice(page: Page, lab_url: str):
    errors = watch(page)
    page.goto(lab_url + BAD)
    expect(page.locator(".run-status").first).to_contain_text("Measured", timeout=120_000)
    notice = page.locator(".notice", has_text="batch=-3")
    expect(notice).to_be_visible()
    for part in ("page=-5", "context=", "abc", "tpot_slo", "<b>bold</b>"):
        expect(notice).to_contain_text(part)
    assert page.locator("b", has_text="bold").count() == 0  # shown as text, never as markup
    assert_no_traceback(page)
    assert errors == []


@pytest.mark.parametrize("query", NASTY)
def test_nasty_links_load_cleanly(page: Page, lab_url: str, query: str):
    errors = watch(page)
    page.goto(lab_url + query)
    expect(page.locator(".run-status").first).to_contain_text(re.compile("Measured|Not run"),
                                                              timeout=120_000)
    assert_no_traceback(page)
    assert errors == []
