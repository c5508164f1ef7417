"""Agent runners: what a turn runs. Each yields output pieces and honours the cancel handle.

A runner is a callable `runner(ctx: TurnContext) -> Iterable[str | Piece]`. It should stop soon after
`ctx.cancel.is_set()`; anything blocking should either wait with `ctx.cancel.wait(seconds)` or register a
hook with `ctx.cancel.on_cancel(close)` that unblocks it (the worker also stops taking pieces the moment
the handle is set, so a runner that ignores it only wastes its own work).

User-supplied runners (`python`): an app with runner `python` and config
`{"callable": "package.module:function", "options": {...}}` calls `function(ctx)`, for callables in the
modules the operator allows (PYTHON_RUNNER_MODULES). It gets the same `TurnContext` (the user's message in
`ctx.user_message`, earlier turns in `ctx.history`, its options in `ctx.options`, the session's variables in
`ctx.variables`, with `ctx.fill(text)` for `{{name}}` placeholders) and yields strings or
`Piece(text, tokens)`. Setting `ctx.end_session = True` ends the session after the turn instead of waiting
for the next message.

The context holds no secrets: the upstream key of an `openai` app is handed to that runner alone, as an
`TurnGrant` whose key never shows in a repr.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..services.apps import UnusableCallableError, load_runner_callable
from ..vocabulary import Runner
from .watcher import CancelHandle


@dataclass
class Piece:
    """A piece of output and the tokens it cost (0 when unknown)."""

    text: str
    tokens: int = 0


@dataclass
class TurnContext:
    """Everything a runner may use for one turn."""

    session: dict[str, Any]
    app: dict[str, Any]
    user_message: str
    history: list[dict[str, str]]
    cancel: CancelHandle
    turn_number: int
    end_session: bool = False
    # The session's variables (Agentcloud's, set with the edit route), as they were when the turn started.
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = (self.app.get("config") or {}).get("options", {})
        return options

    def fill(self, text: str) -> str:
        """`text` with each `{{name}}` replaced by the session's variable of that name (unknown ones are kept)."""
        return PLACEHOLDER.sub(lambda found: self.variables.get(found[1], found[0]), text)


PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_-]*)\s*\}\}")


@dataclass(frozen=True)
class TurnGrant:
    """What the installation lets this turn use: the upstream endpoint and key of an `openai` app, and the
    modules `python` callables may come from. Handed to the runner beside the context, never inside it, and
    the key never shows in a repr."""

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    allowed_modules: Sequence[str] = ()
    # Tokens the session may still spend; an upstream is never asked for more (None: no budget).
    token_budget: int | None = None
    # The addresses `base_url`'s host was checked to resolve to (services.apps.upstream_addresses): requests connect
    # to those, not to whatever the name resolves to by then. None: connect by name (the operator's own URL).
    addresses: tuple[str, ...] | None = None


class RunnerError(Exception):
    """A runner failed in a way worth showing the user verbatim."""


def scripted(ctx: TurnContext, grant: TurnGrant) -> Iterator[Piece]:
    """The deterministic demo and test agent: `steps` pieces, `stepDelay` seconds apart."""
    config = ctx.app.get("config") or {}
    steps, delay = int(config.get("steps", 8)), float(config.get("stepDelay", 0.25))
    reply = ctx.fill(config.get("reply") or f"Turn {ctx.turn_number}: working on “{ctx.user_message[:60]}”.")
    words = reply.split()
    for step in range(1, steps + 1):
        if delay and ctx.cancel.wait(delay):
            return
        if config.get("failAtStep") == step:
            raise RunnerError(f"scripted agent failed at step {step} as configured")
        word = words[(step - 1) % len(words)] if words else str(step)
        yield Piece(f"{word} " if step < steps else f"{word}", tokens=1)
    end_after = config.get("endAfterTurns")
    if end_after and ctx.turn_number >= int(end_after):
        ctx.end_session = True


# The headers an upstream request may carry besides the grant's key. The openai SDK adds others from the worker's
# environment on its own (OPENAI_ORG_ID, OPENAI_PROJECT_ID, every line of OPENAI_CUSTOM_HEADERS, even an
# Authorization), and would send them to whatever address a team chose.
UPSTREAM_HEADERS = frozenset(
    {"host", "accept", "accept-encoding", "connection", "content-type", "content-length", "user-agent"}
)
# Where the SDK would go with no address at all; named here so it never falls back to OPENAI_BASE_URL in the
# worker's environment instead of the operator's setting.
SDK_DEFAULT_BASE_URL = "https://api.openai.com/v1"


def _upstream_http_client(grant: TurnGrant, timeout: float) -> Any:
    """An HTTP client that sends exactly what the grant allows: the standard headers, the grant's key as the only
    credential (none without one), and no redirects that would carry the request elsewhere."""
    import openai

    authorization = f"Bearer {grant.api_key}" if grant.api_key else None
    pinned = itertools.cycle(grant.addresses) if grant.addresses else None

    def only_what_the_grant_allows(request: Any) -> None:
        for name in [name for name in request.headers if name.lower() not in UPSTREAM_HEADERS]:
            del request.headers[name]
        if authorization:
            request.headers["Authorization"] = authorization
        if pinned is not None:
            # To a checked address (the next one each request, so a retry tries the name's next address), with the
            # name kept for the Host header and for TLS: SNI and the certificate are checked against the name, in
            # its ASCII form (an internationalised name's punycode, as in the Host header).
            request.extensions = {**request.extensions, "sni_hostname": request.url.raw_host.decode("ascii")}
            request.url = request.url.copy_with(host=next(pinned))

    return openai.DefaultHttpxClient(
        timeout=timeout, follow_redirects=False, event_hooks={"request": [only_what_the_grant_allows]}
    )


def openai_chat(ctx: TurnContext, grant: TurnGrant) -> Iterator[Piece]:
    """Any OpenAI-compatible chat-completions endpoint, streamed; cancel closes the HTTP stream at once."""
    import openai

    timeout = float((ctx.app.get("config") or {}).get("timeout", 60))
    with _upstream_http_client(grant, timeout) as http_client:
        client = openai.OpenAI(
            # The SDK insists on a key; the HTTP client sends the grant's (or none) whatever this says.
            api_key=grant.api_key or "unset",
            base_url=grant.base_url or SDK_DEFAULT_BASE_URL,
            timeout=timeout,
            max_retries=0,
            http_client=http_client,
        )
        yield from _stream_chat(ctx, grant, client)


def _stream_chat(ctx: TurnContext, grant: TurnGrant, client: Any) -> Iterator[Piece]:
    """One streamed chat completion through `client`, with retries that a cancel cuts short."""
    import openai

    config = ctx.app.get("config") or {}
    messages: list[dict[str, str]] = []
    if config.get("systemPrompt"):
        messages.append({"role": "system", "content": ctx.fill(config["systemPrompt"])})
    messages.extend(ctx.history)
    messages.append({"role": "user", "content": ctx.user_message})
    kwargs: dict[str, Any] = {"model": config["model"], "messages": messages, "stream": True}
    if config.get("temperature") is not None:
        kwargs["temperature"] = config["temperature"]
    caps = [cap for cap in (config.get("maxTokens"), grant.token_budget) if cap is not None]
    if caps:
        kwargs["max_tokens"] = max(1, min(caps))

    stream = None
    for attempt in range(3):
        if ctx.cancel.is_set():
            return
        try:
            stream = client.chat.completions.create(**kwargs)
            break
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as exc:
            if attempt == 2:
                raise RunnerError(f"upstream model unavailable: {exc.__class__.__name__}") from None
            # Back off, but a cancel ends the wait at once.
            if ctx.cancel.wait(0.5 * 2**attempt):
                return
        except openai.APIStatusError as exc:
            raise RunnerError(f"upstream model refused the request (HTTP {exc.status_code})") from None
    assert stream is not None
    # Ending the read this thread is blocked in from the watcher's thread, so no more tokens are generated (or
    # paid for) after a cancel.
    ctx.cancel.on_cancel(_read_ender(stream))
    try:
        for chunk in stream:
            if ctx.cancel.is_set():
                return
            usage = getattr(chunk, "usage", None)
            text = "".join((choice.delta.content or "") for choice in chunk.choices if choice.delta)
            tokens = usage.completion_tokens if usage else (1 if text else 0)
            if text or tokens:
                yield Piece(text, tokens)
    except Exception:
        if ctx.cancel.is_set():
            return  # the read failed because we closed the stream on purpose
        raise
    finally:
        stream.close()


def _read_ender(stream: Any) -> Callable[[], None]:
    """What the watcher's thread calls to end the read a turn's thread is blocked in on `stream`'s connection.

    Not a close: that frees the socket's file descriptor while the reading thread may be just about to read it,
    and a socket opened meanwhile by another thread (Redis, MongoDB) can get the same number: the read then waits
    on that socket instead, until the upstream timeout. A shutdown ends the read at once (end of stream) and keeps
    the descriptor, which the reading thread frees when it closes the stream itself."""

    def end_read() -> None:
        network = stream.response.extensions.get("network_stream")
        sock = network.get_extra_info("socket") if network is not None else None
        if not isinstance(sock, socket.socket):
            stream.close()  # a transport without a socket of its own (a test's mock, say)
            return
        with contextlib.suppress(OSError):  # already closed: the read has ended
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS: no TLS state touched

    return end_read


def python_callable(ctx: TurnContext, grant: TurnGrant) -> Iterable[Any]:
    """A user callable named `module:function` in the app's settings, from a module the operator allows."""
    target = (ctx.app.get("config") or {})["callable"]
    try:
        function = load_runner_callable(target, grant.allowed_modules)
    except UnusableCallableError as exc:
        raise RunnerError(f"the runner callable {target!r} cannot be used: {exc}") from None
    pieces: Iterable[Any] = function(ctx)
    return pieces


RUNNERS: dict[str, Callable[[TurnContext, TurnGrant], Iterable[Any]]] = {
    Runner.SCRIPTED: scripted,
    Runner.OPENAI: openai_chat,
    Runner.PYTHON: python_callable,
}
