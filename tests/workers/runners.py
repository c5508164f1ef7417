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


def patient(ctx: Any) -> Iterator[str]:
    """Yields once, then waits (for at most 30 s) until its turn is cancelled or interrupted, as a well-behaved
    runner waiting on an upstream does."""
    yield "started "
    if ctx.cancel.wait(30):
        return
    yield "not stopped "


def one_huge_piece(ctx: Any) -> Iterator[str]:
    """Yields its whole reply in one piece of `options.size` characters, as a runner that buffers would."""
    yield "y" * int(ctx.options.get("size", 30_000_000))
