"""The web UI in headless Chromium, against gunicorn and an RQ worker running as separate processes."""

from __future__ import annotations

import re
import time
import uuid

import pytest
import requests
from playwright.sync_api import Page, Route, expect

from devtools.stack import Stack

from .ui import SLOW_AGENT, check_page, sign_in

pytestmark = pytest.mark.browser

# How long a no-JavaScript page is reloaded for a change to show: generous, for a loaded machine (how fast it
# shows is `make bench`'s business).
RELOAD_DEADLINE = 30
CANCEL_POST = re.compile(r"/forms/session/[0-9a-f]{24}/cancel$")


@pytest.fixture(scope="module")
def slow_app(stack: Stack) -> dict[str, str]:
    name = "Slow scripted agent"
    return {
        "name": name,
        "id": stack.cli("apps", "create", stack.demo["teamId"], "--name", name, "--config", SLOW_AGENT)["appId"],
    }


def _agent_text(page: Page) -> str:
    return page.locator("#transcript .entry-agent .text").last.inner_text()


def _start_session(page: Page, app: dict[str, str], name: str) -> str:
    """Fill in the new-session form on the sessions page; returns the new session's id."""
    page.get_by_label("App").select_option(app["id"])
    page.get_by_label("Name").fill(name)
    page.get_by_label("First message").fill("Count to four hundred, slowly.")
    page.get_by_role("button", name="Start session").click()
    expect(page).to_have_url(re.compile(r"/session/[0-9a-f]{24}$"))
    return page.url.rsplit("/", 1)[1]


def test_sign_in_start_a_session_watch_it_stream_cancel_it_and_delete_it(pages, stack, slow_app):
    page = pages.new()
    team = stack.demo["teamId"]
    polls: list[str] = []
    page.on("request", lambda request: polls.append(request.url) if "messages.json" in request.url else None)
    sign_in(page, stack.demo["email"], stack.demo["password"], screenshot="login")
    expect(page.get_by_role("heading", name="Sessions", level=1)).to_be_visible()
    check_page(page, "sessions")

    sid = _start_session(page, slow_app, "Browser streaming run")
    expect(page.get_by_role("status").filter(has_text="Session started.")).to_be_visible()
    expect(page.locator("#session-status")).to_have_text("running")
    expect(page.locator("#transcript .entry-user")).to_have_text(re.compile("Count to four hundred"))
    # Output streams in without a reload: the agent's reply keeps growing.
    expect(page.locator("#transcript .entry-agent .text")).to_have_text(re.compile(r"\S"))
    first = len(_agent_text(page))
    page.wait_for_function(
        "n => document.querySelector('#transcript .entry-agent .text').textContent.length > n", arg=first
    )
    expect(page.get_by_role("status").filter(has_text="The agent is responding")).to_be_visible()
    check_page(page, "session-running")

    cancel = _hold_cancel(page)
    # The badge says so at once: the cancel is held on its way, so the server has not even heard of it yet.
    expect(page.locator("#session-status")).to_have_text("cancelling")
    cancel.continue_()
    page.unroute(CANCEL_POST)
    expect(page.locator("#session-status")).to_have_text("terminated", timeout=30_000)
    # Still on the session page, which now shows how the session ended; the banner about its start is gone.
    assert page.url.endswith(f"/session/{sid}")
    expect(page.locator("#transcript .interrupted")).to_be_visible()
    expect(page.locator("#transcript .entry-note").filter(has_text="Cancel requested.")).to_be_visible()
    expect(page.locator("#transcript .entry-note").filter(has_text="Session terminated (cancelled)")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="Session started.")).to_have_count(0)
    expect(page.get_by_role("button", name="Cancel session")).to_be_hidden()
    expect(page.get_by_label("Your message")).to_be_hidden()
    kept = _agent_text(page)
    assert kept.strip(), "the partial output is kept"
    outputs = [
        e["text"]
        for e in stack.api("GET", f"/{team}/session/{sid}/messages.json").json()["messages"]
        if e["type"] == "output"
    ]
    assert kept.strip() == "".join(outputs).strip(), "the page shows exactly what the transcript holds"
    # The page followed the session's event stream throughout: it never fell back to polling.
    assert polls == []
    check_page(page, "session-cancelled")

    # Dismissing the confirmation keeps the session; accepting deletes it.
    page.once("dialog", lambda dialog: dialog.dismiss())
    page.get_by_role("button", name="Delete session…").click()
    expect(page).to_have_url(re.compile(f"/session/{sid}$"))
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete session…").click()
    expect(page).to_have_url(re.compile(f"/{team}/sessions$"))
    expect(page.get_by_role("status").filter(has_text="Session deleted.")).to_be_visible()
    expect(page.locator(f'tr[data-session-id="{sid}"]')).to_have_count(0)

    response = page.goto(f"/{team}/session/{sid}")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="We couldn't find that")).to_be_visible()
    check_page(page, "error-404")


def _hold_cancel(page: Page) -> Route:
    """Click Cancel and hold the cancel request the page posts, before it reaches the server."""
    held: list[Route] = []
    page.route(CANCEL_POST, lambda route: held.append(route))
    page.get_by_role("button", name="Cancel session").click()
    deadline = time.monotonic() + 10
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)  # lets Playwright call the route handler
    assert held, "the page did not post the cancel"
    return held[0]


def test_a_cancel_answer_that_arrives_after_the_stream_ended_leaves_the_end_shown(pages, stack, slow_app):
    # On a busy machine the worker can stop, and the stream say so, before the cancel's own answer reaches the
    # page. That answer says "running" (it was true when the cancel was stamped) and must not put the badge
    # back to "cancelling" for good. The page's cancel is held here until the stream has shown the end.
    page = pages.new()
    sign_in(page, stack.demo["email"], stack.demo["password"])
    _start_session(page, slow_app, "Late cancel answer")
    expect(page.locator("#transcript .entry-agent .text")).to_have_text(re.compile(r"\S"))
    cancel = _hold_cancel(page)
    answer = cancel.fetch()  # the server cancels now; the page does not hear back yet
    assert answer.json()["status"] == "running"
    expect(page.locator("#transcript .entry-note").filter(has_text="Session terminated (cancelled)")).to_be_visible()
    expect(page.locator("#session-status")).to_have_text("terminated")
    cancel.fulfill(response=answer)
    expect(page.locator("#live-status")).to_be_focused()  # the page has handled the answer
    expect(page.locator("#session-status")).to_have_text("terminated")
    expect(page.get_by_role("button", name="Cancel session")).to_be_hidden()


def test_viewer_sees_no_controls_and_forged_posts_are_refused(pages, stack, slow_app, make_user):
    team = stack.demo["teamId"]
    body = {"appId": slow_app["id"], "name": "Watched by a viewer", "message": "go"}
    sid = stack.api("POST", f"/{team}/forms/session/add", body).json()["_id"]
    viewer = make_user("viewer")
    page = pages.new()
    sign_in(page, viewer["email"], viewer["password"])
    expect(page.get_by_role("heading", name="New session")).to_have_count(0)
    expect(page.get_by_role("button", name="Start session")).to_have_count(0)

    page.get_by_role("link", name="Watched by a viewer").first.click()
    expect(page.locator("#transcript .entry-agent .text")).to_have_text(re.compile(r"\S"))
    expect(page.get_by_role("button", name="Cancel session")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("Delete"))).to_have_count(0)
    expect(page.get_by_label("Your message")).to_have_count(0)
    check_page(page, "session-as-viewer")

    cancel = f"/{team}/forms/session/{sid}/cancel"
    token = page.locator('meta[name="csrf-token"]').get_attribute("content")
    assert page.request.post(cancel, form={"csrf_token": token}).status == 403  # the role forbids it
    assert page.request.post(f"/{team}/forms/session/{sid}/delete", form={"csrf_token": token}).status == 403

    # A signed-in member who may cancel: a post without the page's token is a forgery, and is refused.
    owner = pages.new()
    sign_in(owner, stack.demo["email"], stack.demo["password"])
    for forged in ({}, {"csrf_token": "forged"}, {"csrf_token": token}):
        response = owner.request.post(cancel, form=forged)
        assert response.status == 403, forged
        assert "CSRF" in response.text()
    session = stack.api("GET", f"/{team}/session/{sid}.json").json()["session"]
    assert session["status"] == "running" and not session.get("cancelledAt")
    assert stack.api("POST", cancel).json()["ok"] is True


def test_team_switcher_lists_every_team_and_switches(pages, stack):
    other = stack.cli(
        "users",
        "create",
        f"lead-{uuid.uuid4().hex[:8]}@example.com",
        "--password",
        "lead-password-1",
        "--team",
        f"Second team {uuid.uuid4().hex[:4]}",
    )
    stack.cli("teams", "add-member", other["teamId"], stack.demo["email"], "--role", "member")
    page = pages.new()
    sign_in(page, stack.demo["email"], stack.demo["password"])
    switcher = page.locator("details.switcher")
    switcher.locator("summary").click()
    expect(switcher.get_by_role("link", name=re.compile("Demo team"))).to_be_visible()
    check_page(page, "team-switcher")
    page.keyboard.press("Escape")
    expect(switcher.get_by_role("link", name=re.compile("Second team"))).to_be_hidden()
    switcher.locator("summary").click()
    switcher.get_by_role("link", name=re.compile("Second team")).click()
    expect(page).to_have_url(re.compile(f"/{other['teamId']}/sessions$"))
    # A member of the second team, which has no apps yet: the page says how to get one.
    expect(page.get_by_text("This team has no apps yet.")).to_be_visible()


def _reload_until(page: Page, pattern: str, selector: str, timeout: float) -> None:
    """Without JavaScript the page changes only on reload: reload until `selector` matches `pattern`."""
    deadline = time.monotonic() + timeout
    while True:
        found = page.locator(selector)
        if found.count() and re.search(pattern, found.first.inner_text()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} never matched {pattern!r}")
        page.wait_for_timeout(200)
        page.reload()


def test_every_form_works_without_javascript(pages, stack):
    page = pages.new(javascript=False)
    team = stack.demo["teamId"]
    sign_in(page, stack.demo["email"], stack.demo["password"])

    # Apps: add, a refused edit shown as a friendly page, a good edit.
    page.get_by_role("link", name="Apps").click()
    page.get_by_label("Name").fill("No-JS agent")
    page.get_by_label("Runner").select_option("scripted")
    page.get_by_label("Settings (JSON)").fill(SLOW_AGENT)
    page.get_by_role("button", name="Add app").click()
    expect(page.get_by_role("status").filter(has_text="App created.")).to_be_visible()
    expect(page.get_by_role("rowheader", name="No-JS agent")).to_be_visible()
    check_page(page, "apps")
    page.get_by_role("link", name="Edit No-JS agent").click()
    expect(page.get_by_role("heading", name="Edit “No-JS agent”")).to_be_visible()
    check_page(page, "app-edit")
    page.get_by_label("Settings (JSON)").fill('{"steps": "many"}')
    page.get_by_role("button", name="Save app").click()
    expect(page.get_by_role("heading", name="That request didn't work")).to_be_visible()
    expect(page.locator(".field-errors")).to_contain_text("steps")
    check_page(page, "error-400")
    page.get_by_role("link", name="Go back").click()
    page.get_by_label("Name").fill("No-JS agent v2")
    page.get_by_role("button", name="Save app").click()
    expect(page.get_by_role("status").filter(has_text="App saved.")).to_be_visible()
    expect(page.get_by_role("rowheader", name="No-JS agent v2")).to_be_visible()
    app_id = re.search(
        r"/app/([0-9a-f]{24})/edit", page.get_by_role("link", name="Edit No-JS agent v2").get_attribute("href")
    )[1]

    # Sessions: start, see output after a reload, cancel, see it end, delete after a confirmation step.
    page.get_by_role("link", name="Sessions").click()
    sid = _start_session(page, {"id": app_id}, "No-JS run")
    _reload_until(page, r"\S", "#transcript .entry-agent .text", RELOAD_DEADLINE)
    page.get_by_role("button", name="Cancel session").click()
    expect(page).to_have_url(re.compile(f"/{team}/sessions$"))
    # Cancelled at once if the worker had not claimed the turn yet, else its worker is stopping it.
    expect(
        page.get_by_role("status").filter(has_text=re.compile(r"Session cancelled\.|Cancelling the session…"))
    ).to_be_visible()
    row = f'tr[data-session-id="{sid}"] [data-status]'
    expect(page.locator(row)).to_have_text(re.compile("cancelling|terminated"))
    _reload_until(page, "terminated", row, RELOAD_DEADLINE)
    check_page(page, "sessions-after-cancel")
    page.get_by_role("link", name="No-JS run").click()
    expect(page.locator("#transcript .interrupted")).to_be_visible()
    page.get_by_role("button", name="Delete session…").click()
    expect(page).to_have_url(re.compile(r"\?confirm=delete$"))
    expect(page.get_by_role("heading", name="Delete this session?")).to_be_focused()
    check_page(page, "session-delete-confirm")
    page.get_by_role("button", name="Delete permanently").click()
    expect(page).to_have_url(re.compile(f"/{team}/sessions$"))
    expect(page.get_by_role("status").filter(has_text="Session deleted.")).to_be_visible()
    expect(page.locator(f'tr[data-session-id="{sid}"]')).to_have_count(0)

    # The app, now without live sessions, can be deleted after a confirmation step.
    page.get_by_role("link", name="Apps").click()
    page.get_by_role("button", name="Delete No-JS agent v2").click()
    page.get_by_role("button", name="Delete app").click()
    expect(page.get_by_role("status").filter(has_text="App deleted.")).to_be_visible()
    expect(page.get_by_role("rowheader", name="No-JS agent v2")).to_have_count(0)

    # API keys: the new key is shown once, works, and stops working when revoked.
    page.get_by_role("link", name="API keys").click()
    page.get_by_label("Name").fill("no-js key")
    page.get_by_role("button", name="Create key").click()
    key = page.get_by_role("textbox", name="New API key").input_value()
    assert key.startswith("ak_")
    check_page(page, "apikeys-new-key")
    headers = {"Authorization": f"Bearer {key}"}
    assert requests.get(f"{stack.url}/account.json", headers=headers, timeout=10).status_code == 200
    page.reload()
    expect(page.get_by_role("textbox", name="New API key")).to_have_count(0)
    page.get_by_role("button", name="Revoke no-js key").click()
    expect(page.get_by_role("heading", name="Revoke the key “no-js key”?")).to_be_focused()
    check_page(page, "apikeys-revoke-confirm")
    page.get_by_role("button", name="Revoke key").click()
    expect(page.get_by_role("status").filter(has_text="API key revoked.")).to_be_visible()
    assert requests.get(f"{stack.url}/account.json", headers=headers, timeout=10).status_code == 401

    page.get_by_role("button", name="Sign out", exact=True).click()
    expect(page).to_have_url(re.compile("/login$"))
    page.goto(f"/{team}/sessions")
    expect(page).to_have_url(re.compile(r"/login\?next="))


def test_after_a_turn_finishes_the_next_message_starts_another(pages, stack):
    team = stack.demo["teamId"]
    quick = stack.cli("apps", "create", team, "--name", "Quick agent", "--config", '{"steps": 5, "stepDelay": 0.05}')
    page = pages.new()
    sign_in(page, stack.demo["email"], stack.demo["password"])
    sid = _start_session(page, {"id": quick["appId"]}, "Two turns")
    send = page.get_by_role("button", name="Send")
    # While the agent answers, Send waits; the finished turn enables it without a reload.
    expect(page.get_by_role("status").filter(has_text="Waiting for a message.")).to_be_visible()
    expect(send).to_be_enabled()
    page.get_by_label("Your message").fill("And once more.")
    send.click()
    expect(page).to_have_url(re.compile(f"/session/{sid}$"))
    expect(page.locator("#transcript .entry-user")).to_have_count(2)
    expect(page.locator("#transcript .entry-agent")).to_have_count(2)
    expect(page.locator("#transcript .entry-agent .text").last).to_have_text(re.compile("Turn 2"))
    expect(page.locator("#session-status")).not_to_have_text(re.compile("terminated|error"))
    stack.api("POST", f"/{team}/forms/session/{sid}/cancel")


def test_an_interrupting_message_and_a_cancel_with_a_reason_show_on_the_page(pages, stack, slow_app):
    page = pages.new()
    sign_in(page, stack.demo["email"], stack.demo["password"])
    sid = _start_session(page, slow_app, "Interrupted, then cancelled")
    expect(page.locator("#transcript .entry-agent .text")).to_have_text(re.compile(r"\S"))
    page.get_by_label("Your message").fill("Stop counting; just say hello.")
    page.get_by_label("If the agent is still answering").select_option("interrupt")
    page.get_by_role("button", name="Send").click()
    # The answer in flight stops, keeping what it said, and the new message is answered next.
    expect(page.locator("#transcript .entry-user")).to_have_count(2)
    expect(page.locator("#transcript .entry-agent").first.locator(".interrupted")).to_be_visible()
    expect(page.locator("#transcript .entry-agent")).to_have_count(2)
    page.get_by_label("Reason (optional)").fill("enough for today")
    page.get_by_role("button", name="Cancel session").click()
    expect(
        page.locator("#transcript .entry-note").filter(has_text="Cancel requested: enough for today")
    ).to_be_visible()
    expect(page.locator("#session-status")).to_have_text("terminated", timeout=30_000)
    page.reload()
    expect(page.locator("#session-end-reason")).to_have_text("cancelled: enough for today")
    shown = stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}.json").json()["session"]
    assert shown["cancellation"]["reason"] == "enough for today" and shown["cancellation"]["source"] == "ui"


def test_the_sessions_list_pages_with_the_before_cursor(pages, stack):
    """A team of its own with twelve idle sessions: ten on the first page, two on the next."""
    email = f"pager-{uuid.uuid4().hex[:8]}@example.com"
    team = stack.cli(
        "users", "create", email, "--password", "pager-password", "--team", f"Pager {uuid.uuid4().hex[:6]}"
    )
    app_id = stack.cli("apps", "create", team["teamId"], "--name", "Idle agent")["appId"]
    key = stack.cli("apikeys", "create", email)["key"]
    for number in range(1, 13):
        response = requests.post(
            f"{stack.url}/{team['teamId']}/forms/session/add",
            json={"appId": app_id, "name": f"Idle session {number:02d}"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert response.status_code == 200, response.text
    page = pages.new(javascript=False)
    sign_in(page, email, "pager-password")
    rows = page.locator("#sessions-table tbody tr")
    names = page.locator("#sessions-table tbody th a")
    expect(rows).to_have_count(10)
    first_page = set(names.all_inner_texts())
    expect(page.get_by_role("link", name="← Newest sessions")).to_have_count(0)
    page.get_by_role("link", name="Older sessions →").click()
    expect(page).to_have_url(re.compile(r"\?before=[0-9a-f]{24}$"))
    expect(rows).to_have_count(2)
    # Newest first by id; ids made in the same second by different web processes need not follow creation order.
    assert first_page | set(names.all_inner_texts()) == {f"Idle session {n:02d}" for n in range(1, 13)}
    expect(page.get_by_role("link", name="Older sessions →")).to_have_count(0)
    check_page(page, "sessions-page-2")
    page.get_by_role("link", name="← Newest sessions").click()
    expect(rows).to_have_count(10)
    page.get_by_label("Status").select_option("started")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("heading", name="Sessions with status “started”")).to_be_visible()
    expect(rows).to_have_count(10)


def test_the_sign_in_page_shows_the_demo_login_and_every_page_has_an_icon(pages, stack):
    page = pages.new()
    page.goto("/login")
    expect(page.locator("#demo-login")).to_contain_text(stack.demo["email"])
    icon = page.request.get("/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/")


def test_an_invitation_made_on_the_members_page_is_accepted_on_the_account_page(pages, stack):
    """Nobody joins a team unasked: the owner invites an email, its account sees the invitation and joins."""
    email, password = f"invitee-{uuid.uuid4().hex[:8]}@example.com", "invitee-password-1"
    stack.cli("users", "create", email, "--password", password, "--team", f"Invitee team {uuid.uuid4().hex[:4]}")
    team = stack.demo["teamId"]
    owner = pages.new()
    sign_in(owner, stack.demo["email"], stack.demo["password"])
    owner.goto(f"/{team}/members")
    owner.get_by_label("Email", exact=True).fill(email)
    owner.get_by_label("Role", exact=True).select_option("viewer")
    owner.get_by_role("button", name="Invite").click()
    withdraw = owner.get_by_role("button", name=f"Withdraw the invitation of {email}")
    expect(withdraw).to_be_visible()
    check_page(owner, "members-invitation")
    invitee = pages.new()
    sign_in(invitee, email, password)
    invitee.goto("/account/apikeys")
    join = invitee.get_by_role("button", name=re.compile(r"^Join "))
    expect(join).to_be_visible()
    check_page(invitee, "account-invitation")
    join.click()
    expect(invitee).to_have_url(re.compile(f"/{team}/sessions$"))
    owner.reload()
    expect(withdraw).to_be_hidden()
    expect(owner.get_by_label(f"Role of {email}")).to_have_value("viewer")
