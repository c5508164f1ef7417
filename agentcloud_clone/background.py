"""Work a request or a turn hands over and does not wait for: one daemon thread per queue and process.

What goes here is a courtesy or can be done again later (cancel notices, transcript notices, metrics, webhook
announcements): a full queue drops the item rather than make its caller wait, and the caller's own fallback (the
watcher's polling, the reaper's sweeps) covers what is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class BackgroundQueue[T]:
    """Items handed to `handle` on a thread of this queue's own, in order, up to `batch` at a time.

    The thread starts at the first `put` in each process, so a queue made at import time works the same in a
    forked worker (a fork copies the queue but not its thread: the child starts afresh, with nothing pending)."""

    def __init__(self, name: str, handle: Callable[[list[T]], None], *, size: int, batch: int = 1) -> None:
        self.name, self.handle, self.size, self.batch = name, handle, size, batch
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._items: queue.Queue[T] = queue.Queue(size)

    def put(self, item: T) -> bool:
        """Hand `item` over without waiting; False (and the item dropped) when the queue is full."""
        items = self._started()
        try:
            items.put_nowait(item)
        except queue.Full:
            log.debug("%s: item dropped (the queue is full)", self.name)
            return False
        return True

    def settle(self, timeout: float) -> bool:
        """Wait until everything handed over so far was handled (tests, shutdown); True when it was."""
        if self._pid != os.getpid():
            return True  # nothing was handed over in this process
        done = threading.Event()

        def wait() -> None:
            self._items.join()
            done.set()

        threading.Thread(target=wait, name=f"{self.name}-settle", daemon=True).start()
        return done.wait(timeout)

    def _started(self) -> queue.Queue[T]:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._items = queue.Queue(self.size)
                    threading.Thread(target=self._run, args=(self._items,), name=self.name, daemon=True).start()
                    self._pid = os.getpid()
        return self._items

    def _run(self, items: queue.Queue[T]) -> None:
        while True:
            taken = [items.get()]
            while len(taken) < self.batch:
                try:
                    taken.append(items.get_nowait())
                except queue.Empty:
                    break
            try:
                self.handle(taken)
            except Exception:
                log.exception("%s: %d items not handled", self.name, len(taken))
            finally:
                for _ in taken:
                    items.task_done()
