"""Route registration shared by the blueprints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint

from ..access import Permission, require_team


def delete_with_form_twin[F: Callable[..., Any]](
    bp: Blueprint, rule: str, form_rule: str, permission: Permission, *, endpoint: str, summary: str
) -> Callable[[F], F]:
    """Register `handler(team_id, <id>)` as a team's DELETE `rule` (endpoint `endpoint`, documented by `summary`)
    and as its HTML-form twin, a POST to `form_rule` (endpoint `<endpoint>_form`): browsers without JavaScript
    cannot send DELETE. Both need `permission` in the team."""

    def register(handler: F) -> F:
        def add(name: str, path: str, method: str, doc: str) -> None:
            def view(team_id: Any, **ids: str) -> Any:
                return handler(team_id, **ids)

            view.__name__ = view.__qualname__ = name
            view.__doc__ = doc
            bp.add_url_rule(path, name, require_team(permission)(view), methods=[method])

        add(endpoint, rule, "DELETE", summary)
        add(f"{endpoint}_form", form_rule, "POST", "The HTML-form twin of the DELETE route.")
        return handler

    return register
