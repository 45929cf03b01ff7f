"""Keep a Celery worker running: start it again when it exits without being asked to.

A Celery worker stops for good on an "Unrecoverable error" in its consumer. One such error is a race in
kombu's Redis transport when Redis goes away: a pool result acknowledged while the connection is being
torn down raises AttributeError (`'NoneType' object has no attribute 'hostname'`) and the worker shuts
down (seen in the soak, scripts/soak.py; the class of bug is celery/kombu#582). Under honcho (`make run`)
one process exiting stops them all, so `run_worker` supervises its worker instead of exec'ing it.

The child shares the supervisor's process group, so a signal to the group (Ctrl-C in a terminal, a
`kill -- -PGID`, a container stop) reaches both. SIGTERM and SIGINT sent to the supervisor alone are
passed on as SIGTERM (a warm shutdown: passing SIGINT on would make a terminal's Ctrl-C a second SIGINT,
which Celery takes as a cold shutdown); SIGQUIT as SIGQUIT. After such a signal the supervisor exits with
the worker's status and does not restart it.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

logger = logging.getLogger("worker.supervisor")

# A worker that ran this long before exiting resets the backoff: it was not crash-looping.
STABLE_SECONDS = 60.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        *,
        sleep: Callable[[float], None] | None = None,
        max_restarts: int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stopping = threading.Event()
        self.sleep = sleep or self.stopping.wait  # a backoff that a stop signal ends early
        self.max_restarts = max_restarts
        self.child: subprocess.Popen | None = None
        self.restarts = 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping.set()
        forward = signal.SIGQUIT if signum == signal.SIGQUIT else signal.SIGTERM
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(forward)

    def install_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)

    def run(self) -> int:
        backoff = BACKOFF_FIRST
        while True:
            started = time.monotonic()
            self.child = subprocess.Popen(self.argv)
            code = self.child.wait()
            if self.stopping.is_set():
                return code
            uptime = time.monotonic() - started
            if self.max_restarts is not None and self.restarts >= self.max_restarts:
                logger.error("celery worker exited; restart limit reached", extra={"code": code})
                return code if code else 1
            if uptime >= STABLE_SECONDS:
                backoff = BACKOFF_FIRST
            logger.error(
                "celery worker exited unexpectedly; restarting",
                extra={"code": code, "uptime_s": round(uptime, 1), "restart_in_s": backoff},
            )
            self.restarts += 1
            self.sleep(backoff)
            if self.stopping.is_set():
                return code
            backoff = min(backoff * 2, BACKOFF_MAX)
