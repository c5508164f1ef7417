"""Headless Chromium against the real product: gunicorn web app and RQ worker as separate processes."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from devtools.stack import Stack

# The worker's cancel poll; the page polls the transcript every UI_POLL seconds while a turn runs.
POLL = 0.5
UI_POLL = 0.5
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(ROOT, "test-artifacts", "screenshots")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A scripted agent that streams for about 20 s unless cancelled.
SLOW_AGENT = '{"steps": 400, "stepDelay": 0.05}'


def _chromium() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(f"Chromium not found at {path}: `make install` installs Debian's chromium (or set CHROMIUM_PATH)")
    return path


@pytest.fixture(scope="module")
def stack(mongo_server, redis_server) -> Iterator[Stack]:
    """One web instance and one worker for the module, the worker polling for cancels every POLL seconds."""
    product = Stack(
        mongo_server.url,
        redis_server.url,
        CANCEL_POLL_INTERVAL=POLL,
        OUTPUT_FLUSH_INTERVAL=0.1,
        # Every sign-in here comes from 127.0.0.1; the limit stays on, just roomier than a real user needs.
        LOGIN_RATE_LIMIT="100 per minute",
    )
    try:
        yield product.start(webs=1, workers=1)
    finally:
        product.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Pages:
    """Opens browser contexts (each its own cookie jar) and checks every page they load stayed script-clean."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.browser = browser
        self.base_url = base_url
        self.contexts: list[BrowserContext] = []
        self.problems: list[str] = []

    def new(self, *, javascript: bool = True) -> Page:
        context = self.browser.new_context(
            base_url=self.base_url, java_script_enabled=javascript, viewport={"width": 1200, "height": 860}
        )
        context.set_default_timeout(10_000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self.problems.append(f"script error: {error}"))
        page.on(
            "console",
            lambda message: (
                self.problems.append(f"console: {message.text}") if "Content Security Policy" in message.text else None
            ),
        )
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Browser, stack: Stack) -> Iterator[Pages]:
    """`pages.new(javascript=...)` → a fresh page; fails the test on script errors or CSP violations."""
    opened = Pages(browser, stack.url)
    try:
        yield opened
    finally:
        opened.close()
    assert not opened.problems, "\n".join(opened.problems)


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


@pytest.fixture
def make_user(stack: Stack) -> Callable[..., dict[str, str]]:
    """`make_user(role)` → a new account on the demo team, created with the admin CLI."""

    def _make(role: str) -> dict[str, str]:
        email = f"{role}-{uuid.uuid4().hex[:8]}@example.com"
        password = "browser-test-password"
        stack.cli("users", "create", email, "--password", password)
        stack.cli("teams", "add-member", stack.demo["teamId"], email, "--role", role)
        return {"email": email, "password": password}

    return _make
