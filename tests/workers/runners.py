"""Runners the worker tests allow (PYTHON_RUNNER_MODULES), as a team's own code would be."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

# Set by a test to let `stubborn` go on.
release = threading.Event()


def stubborn(ctx: Any) -> Iterator[str]:
    """Yields once, then blocks without looking at the cancel handle until the test releases it."""
    yield "started "
    release.wait(30)
    yield "released "
