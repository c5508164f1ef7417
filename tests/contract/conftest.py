"""The spec and its route table, shared by the contract tests."""

from __future__ import annotations

from typing import Any

import pytest

from agentcloud_clone.web.docs import SPEC_PATH, load_spec

HTTP_METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture(scope="session")
def spec() -> dict[str, Any]:
    """`openapi.yaml` as parsed from the project root."""
    return load_spec(SPEC_PATH)


def spec_operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation in the spec, keyed by (METHOD, path)."""
    return {
        (method.upper(), path): item[method]
        for path, item in spec["paths"].items()
        for method in HTTP_METHODS
        if method in item
    }
