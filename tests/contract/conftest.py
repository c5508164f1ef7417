"""The spec, shared by the contract tests."""

from __future__ import annotations

from typing import Any

import pytest

from agentcloud_clone.web.docs import SPEC_PATH, load_spec


@pytest.fixture(scope="session")
def spec() -> dict[str, Any]:
    """`openapi.yaml` as parsed from the project root."""
    return load_spec(SPEC_PATH)
