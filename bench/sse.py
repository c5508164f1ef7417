"""A light client for many live streams at once (`GET .../events`, Server-Sent Events): one asyncio event loop
in a thread of its own, a plain socket per stream (HTTP/1.1, chunked transfer decoded here), the standard
library only. Every data frame is timed on arrival with `time.time()`, the clock the product's `createdAt`
timestamps are written with on the same machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Stream:
    """One open stream: what it was opened on, its answer, and what it has received."""

    path: str
    status: int | None = None
    connected_at: float | None = None
    open_seconds: float | None = None
    frames: int = 0
    last_seq: int = 0
    ended: bool = False
    closed: bool = False
    error: str | None = None
    # (seq, arrival time.time(), the event's createdAt as a timestamp) of every event created from `measure_from`
    timed: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def session_id(self) -> str:
        return self.path.rstrip("/").split("/")[-2]


class StreamFleet:
    """Opens, follows and closes many SSE streams to one web instance; thread-safe from the caller's side."""

    def __init__(self, base_url: str, api_key: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.api_key = api_key
        self.streams: list[Stream] = []
        self.measure_from = float("inf")  # events created before this are not timed (the replay of a stream)
        self._loop = asyncio.new_event_loop()
        self._tasks: list[asyncio.Task[None]] = []
        self._thread = threading.Thread(target=self._loop.run_forever, name="sse-fleet", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------------------------------

    def open(self, paths: Sequence[str], parallel: int = 50, timeout: float = 120) -> list[Stream]:
        """Open a stream on each path (at most `parallel` openings in flight) and return once every one has
        answered and sent its first line, or failed."""
        future = asyncio.run_coroutine_threadsafe(self._open_all(list(paths), parallel), self._loop)
        return future.result(timeout)

    def measure(self, since: float) -> None:
        """Time every event created from `since` on (earlier ones are replay, not delivery)."""
        self.measure_from = since

    def delays(self, streams: Sequence[Stream] | None = None) -> list[float]:
        """Arrival minus createdAt of every timed event."""
        return [
            received - created
            for s in (self.streams if streams is None else streams)
            for _, received, created in s.timed
        ]

    def reset_delays(self) -> None:
        for stream in self.streams:
            stream.timed = []

    def close(self) -> None:
        """Close every stream and stop the loop."""

        async def cancel_all() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- the loop's side -------------------------------------------------------------------------------------------

    async def _open_all(self, paths: list[str], parallel: int) -> list[Stream]:
        gate = asyncio.Semaphore(parallel)
        opened: list[tuple[Stream, asyncio.Event]] = []
        for path in paths:
            stream, ready = Stream(path), asyncio.Event()
            self.streams.append(stream)
            opened.append((stream, ready))
            self._tasks.append(asyncio.create_task(self._follow(stream, ready, gate)))
        await asyncio.gather(*(ready.wait() for _, ready in opened))
        return [stream for stream, _ in opened]

    async def _follow(self, stream: Stream, ready: asyncio.Event, gate: asyncio.Semaphore) -> None:
        writer = None
        try:
            async with gate:
                started = time.perf_counter()
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(
                    (
                        f"GET {stream.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Authorization: Bearer {self.api_key}\r\nAccept: text/event-stream\r\n\r\n"
                    ).encode()
                )
                await writer.drain()
                status_line = await reader.readline()
                stream.status = int(status_line.split()[1])
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if stream.status != 200:
                    stream.error = f"HTTP {stream.status}"
                    return
                chunked = headers.get("transfer-encoding", "").lower() == "chunked"
                first = await self._read(reader, chunked)  # `retry:` and `: connected`
                stream.connected_at = time.time()
                stream.open_seconds = time.perf_counter() - started
            ready.set()
            buffer = first
            while True:
                while b"\n\n" in buffer:
                    frame, buffer = buffer.split(b"\n\n", 1)
                    self._frame(stream, frame, time.time())
                    if stream.ended:
                        return
                data = await self._read(reader, chunked)
                if not data:
                    stream.closed = True
                    return
                buffer += data
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.error = f"{exc.__class__.__name__}: {exc}"
        finally:
            ready.set()
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    @staticmethod
    async def _read(reader: asyncio.StreamReader, chunked: bool) -> bytes:
        """The next piece of the body: one chunk when chunked, else whatever has arrived."""
        if not chunked:
            return await reader.read(65536)
        size_line = await reader.readline()
        if not size_line:
            return b""
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b""
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # the chunk's CRLF
        return data

    def _frame(self, stream: Stream, frame: bytes, received: float) -> None:
        kind, data, seq = "message", None, None
        for line in frame.decode().split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                kind = value
            elif name == "data":
                data = value
            elif name == "id":
                seq = int(value)
        if data is None:
            return
        stream.frames += 1
        if seq is not None:
            stream.last_seq = max(stream.last_seq, seq)
        if kind == "session.ended":
            stream.ended = True
            return
        event: dict[str, Any] = json.loads(data)
        created = event.get("createdAt")
        if created and seq is not None:
            created_at = datetime.fromisoformat(created).timestamp()
            if created_at >= self.measure_from:
                stream.timed.append((seq, received, created_at))
