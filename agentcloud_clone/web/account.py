"""Sign-in and sign-out (cookie), the caller's account, and API keys."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, render_template, request, session, url_for
from flask_login import login_user, logout_user

from ..access import Account, current_account, parse_id
from ..errors import NotSignedIn, PermissionDenied
from ..repositories import accounts as accounts_repo
from ..schemas import ApiKeyCreateSchema, LoginSchema, PasswordChangeSchema, api_key_out, my_invitation_out, team_out
from ..services import accounts as service
from .identity import api_key_in_use
from .parsing import csrf_field, load_body
from .ratelimits import password_change_limit, sign_in_limits
from .responses import redirect_or_json, safe_next, wants_json

bp = Blueprint("account", __name__)


def _home_for(account: Account) -> str:
    return f"/{account.team_ids[0]}/sessions" if account.team_ids else "/"


def _sign_in() -> tuple[Account, str | None]:
    """Check the credentials and start a sign-in; the account and where the caller asked to go next."""
    data = load_body(LoginSchema())
    doc = service.authenticate(data["email"], data["password"])
    if doc is None:
        raise NotSignedIn("Wrong email or password.")
    # A fresh session at sign-in, so a session id planted before login is worthless after it.
    session.clear()
    account = Account(doc, signin_id=service.start_signin(doc["_id"], data["remember"]))
    login_user(account, remember=data["remember"])
    return account, data["next"]


def _demo_login() -> dict[str, str] | None:
    """The demo account's login, shown on the sign-in page of a development instance that has one."""
    if current_app.config["ENV"] != "development":
        return None
    from ..cli import DEMO_EMAIL, DEMO_PASSWORD

    return {"email": DEMO_EMAIL, "password": DEMO_PASSWORD} if accounts_repo.find_account_by_email(DEMO_EMAIL) else None


def _browser_session_required(action: str) -> None:
    """Key management needs a person signed in with a browser: a stolen API key must not outlive its revocation
    by minting another."""
    if api_key_in_use():
        raise PermissionDenied(f"API keys cannot {action}; sign in with a browser session.")


@bp.route("/login", methods=["GET", "POST"])
@sign_in_limits
def login() -> Any:
    """The sign-in form; a browser is sent on to `next` or its first team."""
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""), demo_login=_demo_login())
    try:
        account, next_path = _sign_in()
    except NotSignedIn as exc:
        if wants_json():
            raise
        page = render_template(
            "login.html", error=exc.message, next=request.form.get("next", ""), demo_login=_demo_login()
        )
        return page, 401
    return redirect_or_json(safe_next(next_path, _home_for(account)), _id=account.id)


@bp.post("/forms/account/login")
@sign_in_limits
def login_json() -> Any:
    """Sign in with a JSON body; the response sets the session cookie."""
    account, next_path = _sign_in()
    return redirect_or_json(safe_next(next_path, _home_for(account)), _id=account.id, **csrf_field())


@bp.post("/logout")
def logout() -> Any:
    """Sign out: this browser's sign-in is revoked, and its session and remember cookies are cleared."""
    if not api_key_in_use():
        try:
            account = current_account()
        except NotSignedIn:
            account = None
        if account is not None:
            service.end_signin(account.object_id, account.signin_id)
    # Cleared before logout_user, which leaves its instruction to delete the remember cookie in the session.
    session.clear()
    logout_user()
    return redirect_or_json(url_for("account.login"), ok=True)


@bp.post("/forms/account/signout-all")
def sign_out_everywhere() -> Any:
    """Revoke every sign-in of the account, this one included (API keys stay valid until revoked)."""
    _browser_session_required("sign out browsers")
    service.end_all_signins(current_account().object_id)
    session.clear()
    logout_user()
    return redirect_or_json(url_for("account.login"), flash_message="Signed out everywhere.", ok=True)


@bp.post("/forms/account/password")
@password_change_limit
def change_password() -> Any:
    """Change the password, given the current one (signed-in browsers only): every other browser is signed out,
    this one stays signed in on a new sign-in."""
    account = current_account()
    _browser_session_required("change the password")
    data = load_body(PasswordChangeSchema())
    remember = service.signin_remembered(account.object_id, account.signin_id)
    signin_id = service.change_password(
        account.object_id, data["currentPassword"], data["newPassword"], remember=remember
    )
    doc = accounts_repo.find_account(account.object_id)
    assert doc is not None
    session.clear()  # a fresh session for the new sign-in, as at every sign-in
    login_user(Account(doc, signin_id=signin_id), remember=remember)
    return redirect_or_json(
        "/account/apikeys",
        flash_message="Password changed; every other browser is signed out.",
        _id=account.id,
        ok=True,
        **csrf_field(),
    )


@bp.get("/account.json")
def account_json() -> Any:
    """Who is signed in, their teams with roles, and the invitations to teams waiting for their answer."""
    account = current_account()
    teams = [dict(t, role=account.role_in(t["_id"])) for t in accounts_repo.find_teams(account.team_ids)]
    return jsonify(
        account={"_id": account.id, "email": account.email, "name": account.name},
        teams=team_out.dump(teams, many=True),
        invitations=my_invitation_out.dump(service.invitations_for(account.email), many=True),
        **csrf_field(),
    )


@bp.post("/forms/account/invitation/<invitationId>/accept")
def accept_invitation(invitationId: str) -> Any:
    """Join the team an invitation for this account offers, with its role."""
    account = current_account()
    invitation = service.accept_invitation(account.object_id, account.email, parse_id(invitationId, "invitation"))
    team_id = str(invitation["teamId"])
    return redirect_or_json(
        f"/{team_id}/sessions", flash_message="You joined the team.", _id=invitationId, teamId=team_id, ok=True
    )


@bp.post("/forms/account/invitation/<invitationId>/decline")
def decline_invitation(invitationId: str) -> Any:
    """Turn down an invitation for this account."""
    account = current_account()
    service.decline_invitation(account.email, parse_id(invitationId, "invitation"))
    return redirect_or_json("/account/apikeys", flash_message="Invitation declined.", _id=invitationId, ok=True)


@bp.get("/account/apikeys.json")
def api_keys_json() -> Any:
    """The caller's API keys (never the keys themselves)."""
    keys = accounts_repo.list_api_keys(current_account().object_id)
    return jsonify(apiKeys=api_key_out.dump(keys, many=True), **csrf_field())


@bp.post("/forms/account/apikey/add")
def add_api_key() -> Any:
    """Create an API key (signed-in browsers only); the response is the only time the key is shown."""
    account = current_account()
    _browser_session_required("create API keys")
    data = load_body(ApiKeyCreateSchema())
    record, key = service.create_api_key(account.object_id, data["name"])
    if wants_json():
        return jsonify(_id=str(record["_id"]), key=key, apiKey=api_key_out.dump(record), redirect="/account/apikeys")
    return redirect_or_json("/account/apikeys", reveal={"api_key": key})


@bp.post("/forms/account/apikey/<keyId>/revoke")
def revoke_api_key(keyId: str) -> Any:
    """Revoke an API key (signed-in browsers only); later requests with it get 401."""
    account = current_account()
    _browser_session_required("revoke API keys")
    record = service.revoke_api_key(account.object_id, parse_id(keyId, "API key"))
    return redirect_or_json("/account/apikeys", flash_message="API key revoked.", _id=str(record["_id"]), ok=True)
