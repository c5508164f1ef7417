"""Sign-out signs out, in a real browser against gunicorn: after 'Keep me signed in' and Sign out, a reload finds the
browser signed out, and cookies captured before the sign-out are refused wherever they are replayed."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from .ui import check_page

pytestmark = pytest.mark.browser


def _signed_in(pages, cookies) -> bool:
    """Whether a fresh browser holding only `cookies` is signed in."""
    page = pages.new()
    page.context.add_cookies(cookies)
    return page.request.get("/account.json").status == 200


def test_keep_me_signed_in_then_sign_out_signs_out_and_captured_cookies_are_refused(pages, stack, make_user):
    user = make_user("member")
    page = pages.new()
    page.goto("/login")
    page.get_by_label("Email").fill(user["email"])
    page.get_by_label("Password").fill(user["password"])
    remember = page.get_by_label("Keep me signed in")
    expect(remember).not_to_be_checked()
    remember.check()
    check_page(page, "login-keep-me-signed-in")
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/[0-9a-f]{24}/sessions$"))
    sessions_url = page.url

    captured = page.context.cookies()
    by_name = {cookie["name"]: cookie for cookie in captured}
    assert {"session", "remember_token"} <= set(by_name), sorted(by_name)
    # 'Keep me signed in' is a lasting cookie (the session cookie ends with the browser), and neither is readable
    # from scripts.
    assert by_name["remember_token"]["expires"] > time.time() + 7 * 86400
    assert by_name["session"]["expires"] == -1
    assert by_name["remember_token"]["httpOnly"] and by_name["session"]["httpOnly"]
    # Before the sign-out each cookie alone signs a browser in: the remember cookie is what a restarted browser has.
    assert _signed_in(pages, [by_name["remember_token"]])
    assert _signed_in(pages, [by_name["session"]])

    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page).to_have_url(re.compile(r"/login"))
    page.reload()
    expect(page.get_by_role("heading", name="Sign in", level=1)).to_be_visible()
    page.goto(sessions_url)
    expect(page).to_have_url(re.compile(r"/login\?next="))
    assert page.request.get("/account.json").status == 401
    assert "remember_token" not in {cookie["name"] for cookie in page.context.cookies()}

    # The cookies captured before the sign-out, replayed by someone else, together or alone.
    for replayed in (captured, [by_name["remember_token"]], [by_name["session"]]):
        thief = pages.new()
        thief.context.add_cookies(replayed)
        assert thief.request.get("/account.json").status == 401, [c["name"] for c in replayed]
        thief.goto(sessions_url)
        expect(thief).to_have_url(re.compile(r"/login\?next="))
