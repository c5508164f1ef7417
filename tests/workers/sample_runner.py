"""A user-supplied runner, as a team would write one: yields pieces, may check the cancel handle."""

from __future__ import annotations

from collections.abc import Iterator


def echo(ctx) -> Iterator[str]:
    for _ in range(int(ctx.options.get("times", 1))):
        if ctx.cancel.is_set():
            return
        yield f"{ctx.user_message} "
