"""A MongoDB-wire proxy on loopback that can make the server look slow or hung.

It forwards every connection to the real server and reads the wire protocol's message headers (length,
requestID, responseTo) in both directions, so it can hold back the answer to one chosen request (the next one
whose bytes contain a marker: a slow operation on a live server, whose other connections keep answering) or
every answer (a hung server: connections stay open, nothing comes back) until released.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Any

HEADER = struct.Struct("<iiii")  # messageLength, requestID, responseTo, opCode


def _read_message(sock: socket.socket) -> bytes | None:
    """One whole wire message, or None when the peer closed."""
    head = _read_exactly(sock, HEADER.size)
    if head is None:
        return None
    length = HEADER.unpack(head)[0]
    body = _read_exactly(sock, length - HEADER.size)
    return None if body is None else head + body


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        try:
            chunk = sock.recv(left)
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class SlowProxy:
    """`SlowProxy(target_port).start()`; point clients at `port`. `slow_next(marker)` holds the answer to the next
    request containing `marker` until `release()`; `hang()` holds every answer until `release()`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.marker: bytes | None = None
        self.slow_ids: set[int] = set()
        self.hung = False
        self.released = threading.Event()
        self.held = threading.Event()  # set once an answer is being held back
        self.sockets: list[socket.socket] = []

    def start(self) -> SlowProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def slow_next(self, marker: bytes) -> None:
        with self.lock:
            self.marker, self.released, self.held = marker, threading.Event(), threading.Event()

    def hang(self) -> None:
        with self.lock:
            self.hung, self.released, self.held = True, threading.Event(), threading.Event()

    def release(self) -> None:
        with self.lock:
            self.hung, self.marker = False, None
            self.released.set()

    def stop(self) -> None:
        self.release()
        with contextlib.suppress(OSError):
            self.listener.close()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, server]
            threading.Thread(target=self._requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket) -> None:
        while (message := _read_message(client)) is not None:
            with self.lock:
                if self.marker is not None and self.marker in message:
                    self.slow_ids.add(HEADER.unpack(message[: HEADER.size])[1])
                    self.marker = None
            if not self._send(server, message):
                break
        self._close(client, server)

    def _answers(self, server: socket.socket, client: socket.socket) -> None:
        while (message := _read_message(server)) is not None:
            with self.lock:
                response_to = HEADER.unpack(message[: HEADER.size])[2]
                hold = self.hung or response_to in self.slow_ids
                self.slow_ids.discard(response_to)
                released, held = self.released, self.held
            if hold:
                held.set()
                released.wait(60)
            if not self._send(client, message):
                break
        self._close(client, server)

    @staticmethod
    def _send(sock: socket.socket, message: bytes) -> bool:
        try:
            sock.sendall(message)
        except OSError:
            return False
        return True

    @staticmethod
    def _close(*socks: Any) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
