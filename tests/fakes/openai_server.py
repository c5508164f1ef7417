"""A fake OpenAI-compatible chat-completions server on loopback, for the `openai` runner's tests.

It streams one SSE chunk per `interval` seconds and records whether the client closed the stream early
(the write fails once the worker hangs up), so a test can assert that cancelling stopped the upstream. It also
records every request as received (path, headers, body), so a test can assert what a worker sent where.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    """Start with `FakeOpenAI().start()`; `base_url` for the app's settings; `streams` records each request."""

    def __init__(self, chunks: int = 400, interval: float = 0.02, fail_first: int = 0) -> None:
        self.chunks, self.interval = chunks, interval
        # The first `fail_first` requests get a 503, as an overloaded upstream answers.
        self.fail_first = fail_first
        self.streams: list[dict[str, Any]] = []
        # Every request's Authorization header, in order (None when absent).
        self.authorizations: list[str | None] = []
        # Every request as received: {"path", "headers", "body"} (headers as sent, body as raw bytes).
        self.received: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                with fake._lock:
                    fake.authorizations.append(self.headers.get("Authorization"))
                    fake.received.append({"path": self.path, "headers": list(self.headers.items()), "body": raw})
                    fake.requests += 1
                    failing = fake.requests <= fake.fail_first
                if failing:
                    payload = json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    self.close_connection = True
                    return
                record = {"request": body, "sent": 0, "closed_by_client": False, "closed_at": None, "done": False}
                with fake._lock:
                    fake.streams.append(record)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for i in range(fake.chunks):
                        chunk = {
                            "id": "chatcmpl-fake",
                            "object": "chat.completion.chunk",
                            "created": int(time.time()),
                            "model": body.get("model", "fake"),
                            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
                        }
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                        record["sent"] += 1
                        time.sleep(fake.interval)
                    final = {
                        "id": "chatcmpl-fake",
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    }
                    self.wfile.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
                    self.wfile.flush()
                    record["done"] = True
                except (BrokenPipeError, ConnectionResetError):
                    record["closed_by_client"] = True
                    record["closed_at"] = time.monotonic()
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
