"""Worker tests: fast intervals, the test runners allowed, and a harness that runs turns in-process."""

from __future__ import annotations

from typing import Any

import pytest

from tests.workers.harness import FAST, RUNNER_MODULES, Harness


@pytest.fixture
def app_settings() -> dict[str, Any]:
    return {**FAST, "PYTHON_RUNNER_MODULES": RUNNER_MODULES}


@pytest.fixture
def harness(app: Any, factory: Any) -> Harness:
    return Harness(app, factory)
