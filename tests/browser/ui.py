"""What the browser tests share: the timings the stack runs with, and how a person signs in and what every page
must offer a keyboard or screen-reader user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, expect

# The worker's cancel poll.
POLL = 0.5
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(ROOT, "test-artifacts", "screenshots")
# A scripted agent that streams for about 20 s unless cancelled.
SLOW_AGENT = '{"steps": 400, "stepDelay": 0.05}'


def sign_in(page: Page, email: str, password: str, *, screenshot: str | None = None) -> None:
    """Sign in through the login form, as a person would."""
    page.goto("/login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(password)
    if screenshot:
        check_page(page, screenshot)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/[0-9a-f]{24}/sessions$"))


def check_page(page: Page, name: str) -> None:
    """Screenshot the page, and check what a keyboard or screen-reader user relies on.

    Call it once the page has visibly arrived (after an `expect`), not straight after a click."""
    report: dict[str, Any] = page.evaluate(
        """() => ({
            lang: document.documentElement.lang,
            main: document.querySelectorAll("main").length,
            h1: document.querySelectorAll("h1").length,
            unlabelled: [...document.querySelectorAll("input:not([type=hidden]), select, textarea")]
                .filter((el) => !el.labels.length && !el.getAttribute("aria-label")
                                && !el.getAttribute("aria-labelledby"))
                .map((el) => el.outerHTML),
            nameless: [...document.querySelectorAll("button, a[href]")]
                .filter((el) => !(el.getAttribute("aria-label") || el.textContent).trim())
                .map((el) => el.outerHTML),
            styled: document.querySelectorAll('[style]:not([style=""])').length,
        })"""
    )
    assert report["lang"] == "en" and report["main"] == 1 and report["h1"] == 1, (name, report)
    assert not report["unlabelled"], (name, report["unlabelled"])
    assert not report["nameless"], (name, report["nameless"])
    assert report["styled"] == 0, f"{name}: inline style attributes are blocked by the CSP"
    # Taking a screenshot leaves empty style attributes on inputs (it hides the caret), hence `:not([style=""])`.
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
