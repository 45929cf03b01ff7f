"""The worker parent's side of a run: ending the run of a pool process that died or hit the hard time
limit, off the parent's event loop (the task's request hooks, worker/tasks.py, call it).
"""

from __future__ import annotations

import logging
import time

import psutil
import redis
from django.conf import settings
from django.db import connection
from tenacity import RetryError, Retrying, stop_before_delay, wait_exponential

from orchestrator.models import Run, RunStatus
from orchestrator.taskprocs import processes_of_run
from project.background import BackgroundQueue
from project.dbsession import set_connection_lock_timeout
from schedules import runleases, runstate
from worker.caps import caps_for_run, lease_owner, release_and_wake

logger = logging.getLogger(__name__)


class ParentWriter(BackgroundQueue):
    """The worker parent's writes, off its event loop (a row lock or a database away must not stall the
    process that hands out messages and enforces time limits), each retried with backoff. The outcome it
    writes is recorded in Redis first: one the parent never gets to write is written by a reaper."""

    thread_name = "worker-parent-writer"

    def handle(self, job) -> None:
        def attempt() -> None:
            # This thread's own connection. Wait a little for a lock, then retry later: one row lock
            # must not hold up the writes queued behind it. (Not a bare session SET: behind PgBouncer
            # it would stay on a server connection other clients then borrow.)
            set_connection_lock_timeout(connection, 2000)
            job()

        retrying = Retrying(
            wait=wait_exponential(multiplier=0.5, max=10.0),
            stop=stop_before_delay(float(settings.WORKER_PARENT_WRITE_RETRY_SECONDS)),
            after=lambda _state: connection.close(),
            before_sleep=lambda state: logger.warning(
                "parent write failed; retrying", extra={"error": type(state.outcome.exception()).__name__}
            ),
        )
        try:
            retrying(attempt)
        except RetryError as exc:
            error = type(exc.last_attempt.exception()).__name__
            logger.error("parent write abandoned", extra={"error": error})


parent_writer = ParentWriter()


# How long the parent's writer waits for a killed pool process and its task processes to be gone before
# it frees their slots anyway (the template kills the task groups when its pool process dies).
PARENT_KILL_WAIT_SECONDS = 5.0


def _wait_gone(pool_pid: int | None, run_id: int, *, timeout: float = PARENT_KILL_WAIT_SECONDS) -> bool:
    """Wait until the pool process and every process of the run are gone (True), or timeout. Celery calls
    the hard-limit callback before it kills the pool process, and a dead pool process's task processes
    outlive it by a few ms: the slot is freed only after both (docs/ARCHITECTURE.md, guarantee 5)."""
    deadline = time.monotonic() + timeout
    while (pool_pid is not None and _alive(pool_pid)) or processes_of_run(run_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def run_end_from_parent(
    *,
    run_id: int,
    worker: str,
    reason: str,
    task_id: str = "",
    overrule: bool = False,
    pool_pid: int | None = None,
) -> None:
    """End the run a pool process was executing when it died or hit the hard time limit.

    Fenced by `worker` (node name + the pool process id): only the delivery that process started is
    ended, never a run another process took; if that process had already recorded its own outcome (it
    finished, and was killed while writing it), that outcome is written instead, unless `overrule`
    (the hard time limit: the run overran, whatever it had recorded). Written, and the leases
    released, on the parent's writer thread."""
    try:
        runleases.outcome_record(
            run_id=run_id,
            scheduled_run_id=None,
            status=RunStatus.FAILED,
            error_summary=reason,
            stats=None,
            worker=worker,
            task_id=task_id,
            replace=overrule,
        )
        recorded = True
    except redis.RedisError:
        recorded = False

    def write() -> None:
        if recorded:
            ended = bool(runstate.apply_pending_outcomes([run_id]))
        else:
            ended = runstate.run_finish(
                run_id, None, status=RunStatus.FAILED, error_summary=reason, worker=worker
            )
        try:
            caps = caps_for_run(run_id)
        except Run.DoesNotExist:
            caps = []
        if not _wait_gone(pool_pid, run_id):
            logger.warning("run's processes still alive; slot freed anyway", extra={"run_id": run_id})
        release_and_wake(caps, owner=lease_owner(run_id, worker), run_id=run_id)
        if ended:
            logger.warning("run ended by the worker's parent", extra={"run_id": run_id, "reason": reason})

    parent_writer.submit(write)
