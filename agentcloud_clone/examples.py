"""Example `python` runners shipped with the product, allowed by the default PYTHON_RUNNER_MODULES.

A runner is `function(ctx)` yielding strings (or `Piece`s); see jobs/runners.py for what `ctx` offers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def echo(ctx: Any) -> Iterator[str]:
    """Repeat the user's message `options.times` times (default once), stopping early when cancelled."""
    for _ in range(int(ctx.options.get("times", 1))):
        if ctx.cancel.wait(float(ctx.options.get("delay", 0))):
            return
        yield f"{ctx.user_message} "
