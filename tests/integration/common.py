"""Helpers the multi-process tests share: waiting on the product through its own API."""

from __future__ import annotations

from typing import Any

from devtools.stack import Stack
from tests.support import wait_until


def session_of(stack: Stack, sid: str, url: str | None = None) -> dict[str, Any]:
    return stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}.json", url=url).json()["session"]


def events_of(stack: Stack, sid: str, url: str | None = None) -> list[dict[str, Any]]:
    return stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}/messages.json", url=url).json()["messages"]


def start_running(stack: Stack, app_id: str, url: str | None = None) -> str:
    """Start a session over HTTP and return once its worker is streaming output."""
    team = stack.demo["teamId"]
    sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": "go"}, url=url).json()["_id"]
    wait_until(lambda: any(e["type"] == "output" for e in events_of(stack, sid, url)), 60, "streamed output")
    return sid
