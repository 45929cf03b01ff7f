"""The run task (thin: the lifecycle lives in worker/lifecycle.py) and its parent-side request.

Message contract (schedules/publishing.py): task name "worker.execute_run", kwargs run_id,
scheduled_run_id, job_key; task id = Run.task_id; queue = the job's queue; the job's time limits travel
in the message (`time_limit` / `soft_time_limit`, from Job.timeout_seconds), which is how Celery applies
limits per message: the worker's parent enforces them, whatever the pool process is stuck in.

Its result is stored by Celery's result backend (django-celery-results), as for any task: SUCCESS with
the run's small result, FAILURE (`RunFailed`, carrying the error summary) when the run failed, so that
Flower counts failed runs as failed. The run's own outcome is the database's (ScheduledRun, Run).
"""

from __future__ import annotations

import logging
import os
import random

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_prerun
from celery.worker.request import Request
from django.conf import settings
from django.db import close_old_connections, connection

from project.celery import app
from schedules.runstate import WORKER_LOST, RunFailed
from worker import drain, reaper  # noqa: F401  (they connect the worker's signal handlers)
from worker.lifecycle import DATABASE_AWAY, CapReached, run_execute, worker_identity
from worker.parent import run_end_from_parent
from worker.routing import RUN_TASK_NAME

logger = logging.getLogger(__name__)


class RunRequest(Request):
    """The worker parent's view of one run message (Celery's `Task.Request` hook). The parent outlives
    its pool processes: when one dies (SIGKILL, OOM) or is killed at the hard time limit, it ends that
    process's run and frees its leases at once, not a lease TTL later, on a background thread (the
    parent's loop must never wait on the database)."""

    def on_timeout(self, soft, timeout):
        if not soft:
            # First, before Celery logs the limit and the pool process is killed: the failure replaces
            # whatever outcome the process had recorded, so no reaper can write that one meanwhile.
            self.end_run(f"timed out after {timeout:g}s (hard time limit; process killed)", overrule=True)
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        if isinstance(exc, WorkerLostError | SystemExit | KeyboardInterrupt):
            self.end_run(f"{WORKER_LOST} ({str(exc)[:200]})")

    def end_run(self, reason: str, *, overrule: bool = False) -> None:
        run_id = (self.kwargs or {}).get("run_id")
        if run_id is None or self.worker_pid is None:
            return
        worker = worker_identity(self.hostname, self.worker_pid)
        try:
            run_end_from_parent(
                run_id=int(run_id),
                worker=worker,
                reason=reason,
                task_id=self.id,
                overrule=overrule,
                pool_pid=self.worker_pid,
            )
        except Exception:
            # The reaper ends it within a lease TTL anyway.
            logger.exception("could not end the run of a lost pool process", extra={"run_id": run_id})


class RunTask(Task):
    Request = RunRequest
    # Acknowledged after the run ends (see project/celery.py); a killed child is not re-run.
    acks_late = True
    reject_on_worker_lost = False
    # A failed run is a failed task, acknowledged (never redelivered: at most once), and logged without a
    # traceback (`throws`: the run's failure is the job's, not the worker's; its log says why).
    acks_on_failure = True
    throws = (RunFailed,)


@task_prerun.connect
def _fresh_enough_connection(sender=None, **_kwargs) -> None:
    """Before a run, retire this process's connection if it broke or outlived CONN_MAX_AGE.

    Connections are kept across tasks (CELERY_DB_REUSE_MAX, project/celery.py) instead of a new backend
    per run; this is what Django does at the start of each web request, health check included.
    """
    if sender is not None and sender.name == RUN_TASK_NAME:
        close_old_connections()


@app.task(bind=True, base=RunTask, name=RUN_TASK_NAME, max_retries=None)
def execute_run(self, run_id: int, scheduled_run_id: int | None = None, job_key: str = "") -> dict:
    worker = worker_identity(self.request.hostname or "worker", os.getpid())
    _, soft = self.request.timelimit or (None, None)  # (hard, soft), from the message
    try:
        outcome = run_execute(
            run_id=run_id,
            scheduled_run_id=scheduled_run_id,
            job_key=job_key,
            worker=worker,
            task_id=self.request.id or "",
            soft_limit=soft,
        )
    except DATABASE_AWAY as exc:
        # Before the start (run_execute ends every run it started): the run is still queued. Try the
        # message again rather than leave it to the outbox sweep's long republish delay.
        connection.close()
        countdown = settings.WORKER_THROTTLE_MAX_SECONDS * random.uniform(0.1, 0.3)
        raise self.retry(countdown=countdown, exc=exc, max_retries=None) from exc
    if outcome.status == "throttled":
        # A fresh message with the same task id; Flower and the TaskResult show the reason while it waits.
        raise self.retry(countdown=outcome.countdown, exc=CapReached(outcome.reason), max_retries=None)
    if outcome.status in ("parked", "skipped") or not outcome.written:
        # Acknowledge this delivery and store nothing: a parked run waits in Redis with its message
        # (worker/semaphore.py), which the release of a slot publishes again; a duplicate delivery leaves
        # the real run's TaskResult standing; a run reaped or cancelled meanwhile keeps theirs, and an
        # outcome left in Redis gets its TaskResult from the reaper that writes it.
        raise Ignore()
    if outcome.status == "failed":
        # After the run's failure is written: the task fails too, with the short summary only.
        raise RunFailed(outcome.reason)
    return outcome.result()
