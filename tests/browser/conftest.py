"""Headless Chromium against the real product: gunicorn web app and RQ worker as separate processes."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from devtools.stack import Stack

from .ui import POLL

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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
