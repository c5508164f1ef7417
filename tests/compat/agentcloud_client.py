"""Requests shaped exactly as Agentcloud's own webapp client sends them (rnadigital/agentcloud, webapp/src:
router.ts, controllers/session.ts, its API module), over any transport: the Flask test client or real HTTP.

Its client posts JSON bodies that carry the CSRF token as `_csrf` (the `csrf` of the last `.json` answer) and
repeat the path's ids (`resourceSlug`, `sessionId`); it sends no CSRF header and, here, no Origin either, so
the `_csrf` field is what lets these requests through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Reply:
    status: int
    body: Any


Send = Callable[[str, str, Any], Reply]


def flask_sender(client: Any) -> Send:
    """Send through a Flask test client (its cookie jar is the browser's)."""

    def send(method: str, path: str, body: Any) -> Reply:
        response = client.open(path, method=method, json=body)
        return Reply(response.status_code, response.get_json(silent=True))

    return send


def http_sender(session: Any, base_url: str) -> Send:
    """Send over real HTTP with a `requests.Session` (its cookie jar is the browser's)."""

    def send(method: str, path: str, body: Any) -> Reply:
        response = session.request(method, f"{base_url}{path}", json=body, timeout=10)
        try:
            parsed = response.json()
        except ValueError:
            parsed = None
        return Reply(response.status_code, parsed)

    return send


class AgentcloudClient:
    """One browser of Agentcloud's UI on a team (or, with `shared=True`, on its shared routes `/s/<team>/`)."""

    def __init__(self, send: Send, team_id: str, csrf: str | None = None, *, shared: bool = False) -> None:
        self.send, self.team_id, self.csrf = send, team_id, csrf
        self.base = f"/s/{team_id}" if shared else f"/{team_id}"

    def _get(self, path: str) -> Reply:
        reply = self.send("GET", f"{self.base}{path}", None)
        if isinstance(reply.body, dict) and reply.body.get("csrf"):
            self.csrf = reply.body["csrf"]
        return reply

    def _post(self, path: str, body: dict[str, Any]) -> Reply:
        return self.send("POST", f"{self.base}{path}", {"_csrf": self.csrf, **body})

    # --- what its UI calls -------------------------------------------------------------------------------------

    def sessions(self, before: str = "null") -> Reply:
        return self._get(f"/sessions.json?before={before}")

    def session(self, session_id: str) -> Reply:
        return self._get(f"/session/{session_id}.json")

    def messages(self, session_id: str, message_id: str | None = None) -> Reply:
        query = f"?messageId={message_id}" if message_id else ""
        return self._get(f"/session/{session_id}/messages.json{query}")

    def add_session(self, app_id: str, **fields: Any) -> Reply:
        return self._post("/forms/session/add", {"resourceSlug": self.team_id, "id": app_id, **fields})

    def send_message(self, session_id: str, text: str) -> Reply:
        return self._post(f"/session/{session_id}/send-message", {"messageText": text})

    def cancel(self, session_id: str, **fields: Any) -> Reply:
        ids = {"resourceSlug": self.team_id, "sessionId": session_id}
        return self._post(f"/forms/session/{session_id}/cancel", {**ids, **fields})

    def edit(self, session_id: str, variables: dict[str, Any], **fields: Any) -> Reply:
        ids = {"resourceSlug": self.team_id, "sessionId": session_id}
        return self._post(f"/forms/session/{session_id}/edit", {**ids, "variables": variables, **fields})

    def start(self, session_id: str, **fields: Any) -> Reply:
        ids = {"resourceSlug": self.team_id, "sessionId": session_id}
        return self._post(f"/forms/session/{session_id}/start", {**ids, **fields})

    def start_from_link(self, share_id: str, **fields: Any) -> Reply:
        """What the share link's page posts (Agentcloud starts the session on the link's GET itself)."""
        return self._post("/forms/session/add", {"shareId": share_id, **fields})
