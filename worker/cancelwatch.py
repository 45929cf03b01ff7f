"""Cancel requests reaching the pool process that executes the run, within about a second.

Requests come from any web host (or a scheduler's overlap policy) through Redis (schedules/cancelling.py):
a message on `CANCEL_CHANNEL` and a key per run. Each pool process keeps one subscription, started with
its first run, and hands a request for a run it executes to that run's heartbeat (worker/heartbeat.py),
which stops the run: SIGTERM to its task process group, SIGKILL at the grace's end.

Nothing is missed in the gaps: a request heard just before its run was watched is kept for a while; the
keys are read whenever the subscription (re)starts; and should Redis lose the message, the heartbeat
finds the cancel's deadline passed in the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from schedules import runleases
from schedules.cancelling import CANCEL_CHANNEL, CancelRequest, cancel_key

logger = logging.getLogger(__name__)

# How long a request for a run not (yet) watched here is kept: its run may be starting on this process.
HEARD_KEEP_SECONDS = 120.0

OnCancel = Callable[[CancelRequest], None]


class CancelWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[int, OnCancel] = {}
        self._heard: dict[int, tuple[float, CancelRequest]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, run_id: int, on_cancel: OnCancel) -> None:
        with self._lock:
            self._runs[run_id] = on_cancel
            heard = self._heard.pop(run_id, None)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="run-cancels", daemon=True)
                self._thread.start()
        if heard is not None:
            self._fire(on_cancel, heard[1])

    def unwatch(self, run_id: int) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _fire(self, on_cancel: OnCancel, request: CancelRequest) -> None:
        # Its own thread: stopping a run waits up to its grace, and the listener must go on listening.
        threading.Thread(target=on_cancel, args=(request,), name="run-cancel", daemon=True).start()

    def _deliver(self, request: CancelRequest) -> None:
        with self._lock:
            on_cancel = self._runs.get(request.run_id)
            if on_cancel is None:
                now = time.monotonic()
                self._heard = {k: v for k, v in self._heard.items() if now - v[0] < HEARD_KEEP_SECONDS}
                self._heard[request.run_id] = (now, request)
                return
        logger.info("cancel request heard", extra={"run_id": request.run_id, "grace": request.grace})
        self._fire(on_cancel, request)

    def _listen(self) -> None:
        while True:
            pubsub = runleases.client().pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                self._read_keys()  # requests sent before this subscription
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._deliver(CancelRequest.decode(message["data"]))
            except (redis.RedisError, ValueError, KeyError) as exc:
                logger.warning("cancel subscription failed; retrying", extra={"error": type(exc).__name__})
                time.sleep(1.0)
            finally:
                pubsub.close()

    def _read_keys(self) -> None:
        with self._lock:
            run_ids = list(self._runs)
        if not run_ids:
            return
        for raw in runleases.client().mget([cancel_key(run_id) for run_id in run_ids]):
            if raw is not None:
                self._deliver(CancelRequest.decode(raw))


cancel_watch = CancelWatch()
