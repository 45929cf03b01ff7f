"""Heartbeat and fencing: while a run executes, keep its leases, stamp `heartbeat_at`, and kill the run
when the system gave up on it (docs/ARCHITECTURE.md, guarantees 5 and 7).

- liveness is the lease: the heartbeat renews the run's Redis leases (caps and liveness) every quarter
  lease whatever PostgreSQL does, so a run whose worker is alive is never reaped;
- fencing: a run the system gave up on stops executing before its slot can go to another run. The
  heartbeat kills the run's task process group when the database says the run is no longer ours, when
  a renewal finds the slot taken, and when Redis has been unreachable for `FENCE_AFTER` of a lease (the
  lease expires at a lease; the kill comes first);
- cancel: a cancel request (worker/cancelwatch.py) stops the run with its grace: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import DatabaseError, connection

from orchestrator.services import TaskFence
from schedules import runstate
from schedules.cancelling import CancelRequest, cancelled_summary
from worker.cancelwatch import cancel_watch
from worker.caps import release_and_wake
from worker.semaphore import Cap, semaphore_renew

logger = logging.getLogger(__name__)

# A heartbeat that could not reach Redis for this share of a lease kills its run: the lease (and the slot)
# lapses at one lease, and the kill must land first. Renewals come every quarter lease.
FENCE_AFTER = 0.6


@dataclass(eq=False, kw_only=True)
class Heartbeat:
    """One run's heartbeat, for the `with` block. Two threads, so that neither side can delay the other:
    the lease thread talks to Redis only (a PostgreSQL outage, or a connect hanging on a blackholed
    database, must not let the leases lapse), the database thread stamps `heartbeat_at` and learns
    whether the run is still ours. Leaving the block waits for the lease thread, so that no renewal
    re-takes a lease after the run released it; not for the database thread, whose beat may block for
    long on a cut database and is harmless late.
    """

    run_id: int
    scheduled_run_id: int | None
    attempt: int
    caps: list[Cap]
    owner: str
    fence: TaskFence

    def __post_init__(self) -> None:
        self.lease = float(settings.WORKER_LEASE_SECONDS)
        self.last_renewed = time.monotonic()  # the grant itself was a renewal
        self._ended = threading.Event()
        self.db_beats = 0
        self._lease_thread = threading.Thread(
            target=self._loop, args=(self._lease_beat,), name="run-leases", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._lease_thread.start()
        threading.Thread(target=self._db_loop, name="run-heartbeats", daemon=True).start()
        cancel_watch.watch(self.run_id, self.cancel)
        return self

    def __exit__(self, *exc: object) -> None:
        cancel_watch.unwatch(self.run_id)
        self._ended.set()
        self._lease_thread.join()  # a renewal in progress ends first: none lands after the release

    def _loop(self, beat: Callable[[], float | None]) -> None:
        """Beat a quarter lease after the start, then after what each beat returns (None: no more)."""
        delay: float | None = self.lease / 4
        while delay is not None and not self._ended.wait(delay):
            try:
                delay = beat()
            except Exception:
                logger.exception("heartbeat failed", extra={"run_id": self.run_id})
                delay = self.lease / 8

    def _lease_beat(self) -> float | None:
        self.renew()
        if self.fence.reason:
            return None
        # Check again sooner while renewals fail: the deadline must be seen before the lease lapses.
        failing = time.monotonic() - self.last_renewed > self.lease / 4
        return self.lease / (8 if failing else 4)

    def _db_loop(self) -> None:
        try:
            self._loop(self._db_beat)
        finally:
            # This thread's own connection; none to close (nor to create, for closing) if it never beat:
            # a run shorter than a quarter lease.
            if self.db_beats:
                connection.close()

    def _db_beat(self) -> float | None:
        self.db_beats += 1
        try:
            alive = runstate.run_heartbeat(self.run_id, self.scheduled_run_id, self.attempt)
        except DatabaseError as exc:
            # Written again at the next beat once the database is back; the lease decides.
            logger.warning(
                "heartbeat write failed", extra={"run_id": self.run_id, "error": type(exc).__name__}
            )
            connection.close()
            return self.lease / 4
        if not alive:
            # A beat still in flight when its run ended (this thread is not waited for) finds the run
            # finished: that is no fencing.
            if not self._ended.is_set():
                self.stop_run("stopped: the run is no longer ours (reaped, cancelled or ended)")
            return None
        return self.lease / 4

    def renew(self) -> None:
        sent = time.monotonic()
        try:
            renewal = semaphore_renew(self.caps, owner=self.owner, run_id=self.run_id)
        except redis.RedisError as exc:
            silent = time.monotonic() - self.last_renewed
            logger.warning(
                "lease renewal failed",
                extra={"run_id": self.run_id, "error": type(exc).__name__, "silent_s": round(silent, 1)},
            )
            if silent >= FENCE_AFTER * self.lease:
                self.stop_run(f"lease lost: Redis unreachable for {silent:.0f}s")
            return
        if renewal.lost is not None:
            self.stop_run(f"lease lost: {renewal.lost.label} slot taken by another run")
            return
        self.last_renewed = sent
        if renewal.reasserted:
            logger.warning(
                "leases re-asserted after loss", extra={"run_id": self.run_id, "count": renewal.reasserted}
            )

    def cancel(self, request: CancelRequest) -> None:
        self.stop_run(cancelled_summary(request.by), grace=request.grace)

    def stop_run(self, reason: str, grace: float = 0.0) -> None:
        """Kill the run's task processes (SIGKILL, or SIGTERM and SIGKILL after `grace`), then let its
        slots go: in that order (guarantee 5)."""
        if self.fence.reason:
            self.fence.kill(reason, grace=grace)  # stopping already: at most brings its SIGKILL closer
            return
        logger.warning("run fenced: task processes killed", extra={"run_id": self.run_id, "reason": reason})
        self.fence.kill(reason, grace=grace)
        release_and_wake(self.caps, owner=self.owner, run_id=self.run_id)
