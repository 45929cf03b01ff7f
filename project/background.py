"""One background thread per process that works through a queue of jobs, started on first use.

Used where a process must hand work off its own loop: the worker parent's writes (worker/parent.py,
ParentWriter) and alert notifications (monitoring/alerts.py, Sender). Subclasses say what one item is
(`handle`); the thread is daemonic and restarted if it died.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Generic, TypeVar

Item = TypeVar("Item")


class BackgroundQueue(Generic[Item]):
    thread_name = "background"

    def __init__(self) -> None:
        self._queue: queue.Queue[Item] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, item: Item) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()
        self._queue.put(item)

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted item is done (tests, shutdown); True if it emptied in time."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def handle(self, item: Item) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                self.handle(item)
            finally:
                self._queue.task_done()
