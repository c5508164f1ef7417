"""Helpers the multi-process tests share: waiting on the product through its own API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests

from devtools.stack import Stack


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """The predicate's first truthy value within `timeout` seconds (request errors count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def session_of(stack: Stack, sid: str, url: str | None = None) -> dict[str, Any]:
    return stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}.json", url=url).json()["session"]


def events_of(stack: Stack, sid: str, url: str | None = None) -> list[dict[str, Any]]:
    return stack.api("GET", f"/{stack.demo['teamId']}/session/{sid}/messages.json", url=url).json()["messages"]


def start_running(stack: Stack, app_id: str, url: str | None = None) -> str:
    """Start a session over HTTP and return once its worker is streaming output."""
    team = stack.demo["teamId"]
    sid = stack.api("POST", f"/{team}/forms/session/add", {"appId": app_id, "message": "go"}, url=url).json()["_id"]
    wait_until(lambda: any(e["type"] == "output" for e in events_of(stack, sid, url)), 30, "streamed output")
    return sid
