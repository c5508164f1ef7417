"""A team's webhook endpoints under `/<resourceSlug>/...` (admins): register, rotate the secret, see and
repeat deliveries. The signing secret is shown once, when it is made."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from flask import Blueprint, jsonify
from marshmallow import fields, validate

from ..access import Permission, current_account, parse_id, require_team
from ..schemas import Strict, delivery_out, endpoint_out
from ..services import webhooks as service
from ..vocabulary import WEBHOOK_EVENTS
from .parsing import csrf_field, load_body
from .responses import redirect_or_json
from .routing import delete_with_form_twin

bp = Blueprint("webhooks", __name__)


class EndpointAddSchema(Strict):
    url = fields.String(required=True, validate=validate.Length(min=8, max=2000))
    eventTypes = fields.List(fields.String(validate=validate.OneOf(WEBHOOK_EVENTS)), load_default=list)


@bp.get("/<resourceSlug>/webhooks.json")
@require_team(Permission.TEAM_MANAGE)
def list_endpoints(team_id: ObjectId) -> Any:
    """The team's webhook endpoints (never their secrets)."""
    return jsonify(webhooks=endpoint_out.dump(service.list_endpoints(team_id), many=True), **csrf_field())


@bp.post("/<resourceSlug>/forms/webhook/add")
@require_team(Permission.TEAM_MANAGE)
def add_endpoint(team_id: ObjectId) -> Any:
    """Register an endpoint for some (or all) event types; the answer carries its signing secret, once."""
    data = load_body(EndpointAddSchema())
    endpoint, secret = service.create_endpoint(team_id, data["url"], data["eventTypes"], current_account().actor)
    return jsonify(_id=str(endpoint["_id"]), webhook=endpoint_out.dump(endpoint), secret=secret), 201


@bp.post("/<resourceSlug>/forms/webhook/<webhookId>/rotate")
@require_team(Permission.TEAM_MANAGE)
def rotate_secret(team_id: ObjectId, webhookId: str) -> Any:
    """A new signing secret, shown once; the old one stops signing at once."""
    endpoint, secret = service.rotate_secret(team_id, parse_id(webhookId, "webhook"))
    return jsonify(_id=webhookId, webhook=endpoint_out.dump(endpoint), secret=secret)


@delete_with_form_twin(
    bp,
    "/<resourceSlug>/forms/webhook/<item:webhookId>",
    "/<resourceSlug>/forms/webhook/<webhookId>/delete",
    Permission.TEAM_MANAGE,
    endpoint="delete_endpoint",
    summary="Remove an endpoint and its delivery records.",
)
def _delete(team_id: ObjectId, webhookId: str) -> Any:
    service.delete_endpoint(team_id, parse_id(webhookId, "webhook"))
    return redirect_or_json(f"/{team_id}/members", flash_message="Webhook removed.", _id=webhookId, ok=True)


@bp.get("/<resourceSlug>/webhook/<webhookId>/deliveries.json")
@require_team(Permission.TEAM_MANAGE)
def list_deliveries(team_id: ObjectId, webhookId: str) -> Any:
    """The endpoint's recent deliveries with each attempt's status code, newest first."""
    deliveries = service.list_deliveries(team_id, parse_id(webhookId, "webhook"))
    return jsonify(deliveries=delivery_out.dump(deliveries, many=True))


@bp.post("/<resourceSlug>/forms/webhook/<webhookId>/delivery/<deliveryId>/redeliver")
@require_team(Permission.TEAM_MANAGE)
def redeliver(team_id: ObjectId, webhookId: str, deliveryId: str) -> Any:
    """Send a delivery again now."""
    delivery = service.redeliver(team_id, parse_id(webhookId, "webhook"), parse_id(deliveryId, "delivery"))
    return jsonify(_id=deliveryId, delivery=delivery_out.dump(delivery)), 202
