"""Reading `openapi.yaml`'s operations, for the contract tests."""

from __future__ import annotations

from typing import Any

HTTP_METHODS = ("get", "put", "post", "delete", "patch")


def spec_operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation in the spec, keyed by (METHOD, path)."""
    return {
        (method.upper(), path): item[method]
        for path, item in spec["paths"].items()
        for method in HTTP_METHODS
        if method in item
    }
