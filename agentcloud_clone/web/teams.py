"""A team's members under `/<resourceSlug>/...`: who is on the team, with which role (admins and owners)."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify
from marshmallow import fields, validate

from ..access import ROLES, Permission, current_account, parse_id, require_team
from ..schemas import Strict, TeamEditSchema, member_out, team_invitation_out, team_out
from ..services import accounts as service
from .parsing import csrf_field, load_body
from .responses import redirect_or_json
from .routing import delete_with_form_twin

bp = Blueprint("teams", __name__)


class MemberAddSchema(Strict):
    email = fields.Email(required=True, validate=validate.Length(max=320))
    role = fields.String(required=True, validate=validate.OneOf(ROLES))


class MemberEditSchema(Strict):
    role = fields.String(required=True, validate=validate.OneOf(ROLES))


def _granted_by(team_id: ObjectId) -> str | None:
    return current_account().role_in(team_id)


@bp.get("/<resourceSlug>/team.json")
@require_team(Permission.SESSION_VIEW)
def team_json(team_id: ObjectId) -> Any:
    """The team, your role on it, and its default limits."""
    team = {**service.get_team(team_id), "role": current_account().role_in(team_id)}
    return jsonify(team=team_out.dump(team), **csrf_field())


@bp.post("/<resourceSlug>/forms/team/edit")
@require_team(Permission.TEAM_MANAGE)
def edit_team(team_id: ObjectId) -> Any:
    """Rename the team or set its default limits (an app's own limits win over them)."""
    service.edit_team(team_id, load_body(TeamEditSchema()))
    return redirect_or_json(f"/{team_id}/members", flash_message="Team saved.", _id=str(team_id))


@bp.get("/<resourceSlug>/members.json")
@require_team(Permission.TEAM_MANAGE)
def list_members(team_id: ObjectId) -> Any:
    """The team's members and their roles, by email, and the invitations waiting for an answer."""
    return jsonify(
        members=member_out.dump(service.team_members(team_id), many=True),
        invitations=team_invitation_out.dump(service.team_invitations(team_id), many=True),
        **csrf_field(),
    )


@bp.post("/<resourceSlug>/forms/member/add")
@require_team(Permission.TEAM_MANAGE)
def add_member(team_id: ObjectId) -> Any:
    """Invite an email to the team with a role (its account joins when it accepts), or change the role of a
    member; a role change is effective on the member's next request."""
    data = load_body(MemberAddSchema())
    outcome, doc = service.invite_member(
        team_id,
        data["email"],
        data["role"],
        granted_by=_granted_by(team_id),
        invited_by=current_account().object_id,
    )
    if outcome == "member":
        return redirect_or_json(f"/{team_id}/members", flash_message="Role changed.", _id=str(doc["_id"]))
    return redirect_or_json(
        f"/{team_id}/members",
        flash_message=f"Invited {doc['email']}: they join the team when they accept, on their account page.",
        _id=str(doc["_id"]),
        invited=True,
        email=doc["email"],
        role=doc["role"],
    )


@delete_with_form_twin(
    bp,
    "/<resourceSlug>/forms/invitation/<item:invitationId>",
    "/<resourceSlug>/forms/invitation/<invitationId>/delete",
    Permission.TEAM_MANAGE,
    endpoint="withdraw_invitation",
    summary="Take back an invitation nobody has answered yet.",
)
def _withdraw(team_id: ObjectId, invitationId: str) -> Any:
    service.withdraw_invitation(team_id, parse_id(invitationId, "invitation"))
    return redirect_or_json(f"/{team_id}/members", flash_message="Invitation withdrawn.", _id=invitationId, ok=True)


@bp.post("/<resourceSlug>/forms/member/<accountId>/edit")
@require_team(Permission.TEAM_MANAGE)
def edit_member(team_id: ObjectId, accountId: str) -> Any:
    """Change a member's role; effective on their next request."""
    account = service.member(team_id, parse_id(accountId, "account"))
    role = load_body(MemberEditSchema())["role"]
    service.set_member_role(team_id, account, role, granted_by=_granted_by(team_id))
    return redirect_or_json(f"/{team_id}/members", flash_message="Role changed.", _id=accountId, role=role)


@delete_with_form_twin(
    bp,
    "/<resourceSlug>/forms/member/<item:accountId>",
    "/<resourceSlug>/forms/member/<accountId>/delete",
    Permission.TEAM_MANAGE,
    endpoint="remove_member",
    summary="Take a member off the team; their next request no longer reaches it.",
)
def _remove(team_id: ObjectId, accountId: str) -> Any:
    account = service.member(team_id, parse_id(accountId, "account"))
    service.remove_member(team_id, account, granted_by=_granted_by(team_id))
    return redirect_or_json(f"/{team_id}/members", flash_message="Member removed.", _id=accountId, ok=True)
