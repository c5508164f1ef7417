"""Sign-in and sign-out (cookie), the caller's account, and API keys."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, redirect, render_template, request, session, url_for
from flask_login import login_user, logout_user

from ..auth import Account, current_account
from ..extensions import address_key, login_rate_limit_key, rate_limited
from ..repositories import accounts as accounts_repo
from ..responses import ApiError, redirect_or_json, safe_next, wants_json
from ..schemas import ApiKeyCreateSchema, LoginSchema, api_key_out, team_out
from ..services import accounts as service
from .common import csrf_field, load_body, path_id

bp = Blueprint("auth", __name__)


def _rate_limited(view: Any) -> Any:
    """Sign-in attempts: per address, and per target account so spreading over addresses does not help."""
    view = rate_limited("LOGIN_RATE_LIMIT", scope="login-ip", key_func=address_key)(view)
    return rate_limited("LOGIN_RATE_LIMIT", scope="login-account", key_func=login_rate_limit_key)(view)


def _home_for(account: Account) -> str:
    return f"/{account.team_ids[0]}/sessions" if account.team_ids else "/"


def _sign_in() -> Account:
    data = load_body(LoginSchema())
    doc = service.authenticate(data["email"], data["password"])
    if doc is None:
        raise ApiError(401, "Wrong email or password.")
    # A fresh session at sign-in, so a session id planted before login is worthless after it.
    session.clear()
    account = Account(doc)
    login_user(account, remember=data["remember"])
    request.environ["agentcloud.next"] = data["next"]
    return account


@bp.route("/login", methods=["GET", "POST"])
@_rate_limited
def login() -> Any:
    """The sign-in form; a browser is sent on to `next` or its first team."""
    if request.method == "GET":
        return render_template("login.html", next=request.args.get("next", ""))
    try:
        account = _sign_in()
    except ApiError as exc:
        if wants_json() or exc.code != 401:
            raise
        return render_template("login.html", error=exc.message, next=request.form.get("next", "")), 401
    target = safe_next(request.environ.get("agentcloud.next"), _home_for(account))
    return redirect_or_json(target, _id=account.id)


@bp.post("/forms/account/login")
@_rate_limited
def login_json() -> Any:
    """Sign in with a JSON body; the response sets the session cookie."""
    account = _sign_in()
    target = safe_next(request.environ.get("agentcloud.next"), _home_for(account))
    return redirect_or_json(target, _id=account.id, **csrf_field())


@bp.post("/logout")
def logout() -> Any:
    """Sign out and drop the session."""
    logout_user()
    session.clear()
    return redirect_or_json(url_for("auth.login"), ok=True)


@bp.get("/account.json")
def account_json() -> Any:
    """Who is signed in, and their teams with roles."""
    account = current_account()
    teams = [dict(t, role=account.role_in(t["_id"])) for t in accounts_repo.find_teams(account.team_ids)]
    return jsonify(
        account={"_id": account.id, "email": account.email, "name": account.name},
        teams=team_out.dump(teams, many=True),
        **csrf_field(),
    )


@bp.get("/account/apikeys.json")
def api_keys_json() -> Any:
    """The caller's API keys (never the keys themselves)."""
    keys = accounts_repo.list_api_keys(current_account().object_id)
    return jsonify(apiKeys=api_key_out.dump(keys, many=True), **csrf_field())


@bp.post("/forms/account/apikey/add")
def add_api_key() -> Any:
    """Create an API key; the response is the only time the key is shown."""
    data = load_body(ApiKeyCreateSchema())
    record, key = service.create_api_key(current_account().object_id, data["name"])
    if wants_json():
        return jsonify(_id=str(record["_id"]), key=key, apiKey=api_key_out.dump(record), redirect="/account/apikeys")
    session["new_api_key"] = key
    return redirect("/account/apikeys")


@bp.post("/forms/account/apikey/<keyId>/revoke")
def revoke_api_key(keyId: str) -> Any:
    """Revoke an API key; later requests with it get 401."""
    record = service.revoke_api_key(current_account().object_id, path_id(keyId, "API key"))
    return redirect_or_json("/account/apikeys", flash_message="API key revoked.", _id=str(record["_id"]), ok=True)
