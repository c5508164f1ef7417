"""Schemathesis hooks for `make contract`: what `openapi.yaml` says in words but a generator cannot know.

Loaded by the `st run` that `devtools.contract` starts (its `hooks` setting), never by the product.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

OBJECT_ID = re.compile(r"[a-f0-9]{24}")


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: schemathesis.Case, kwargs: dict[str, Any]) -> None:
    """A body field that repeats a path parameter by name (Agentcloud's cancel body repeats `sessionId` and
    `resourceSlug`) carries the path's value, as a real client sends it: the spec requires the two to match, which
    a schema cannot say. A drawn value that is not a well-formed id is left alone, so it is still refused as one."""
    body, path = case.body, case.path_parameters or {}
    if not isinstance(body, dict):
        return
    for name, value in path.items():
        if isinstance(body.get(name), str) and OBJECT_ID.fullmatch(body[name]):
            body[name] = value
