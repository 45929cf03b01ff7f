"""The one writer of run state: every status transition of a `Run` and its `ScheduledRun` mirror.

The worker (worker/lifecycle.py, heartbeat.py, parent.py), the reapers (every scheduler and every
worker) and the outbox call these functions; nothing else writes `status`. Each is a conditional UPDATE
run inside the caller's transaction (or its own when there is none), so the database decides every race:

- throttle: `queued` stays `queued` on the Run (its mirror goes `throttled`), once per wait;
- start: `queued` -> `running` with `attempt = attempt + 1`; a second delivery of the same message finds
  zero rows and does nothing (at most once, guarantee 4), and so does the message of a cancelled run;
- cancel: `queued` -> `cancelled` (its schedule was deleted, or a cancel: schedules/cancelling.py); a
  running run asked to cancel (`cancel_requested_at`) ends `cancelled` by whichever finish comes (its
  worker's, its parent's, a reaper's), unless it succeeded first; its heartbeat stops at `cancel_deadline`;
- every later write (heartbeat, finish, reap) is fenced by `status = running` and the run's `attempt`
  (or, for the worker's parent, which never learns the attempt, by `worker`: node name + pool pid), so a
  stale worker can never overwrite a newer outcome, and an outcome is written once;
- reap: only a run whose Redis liveness lease expired (schedules/runleases.py) is failed "worker lost",
  by the same fenced finish.
- retry: a failed attempt its retry policy allows to retry goes back to `queued` instead of ending, in
  the finish's transaction (schedules/retries.py); the start gate waits for its `retry_at`.

Times come from the database clock (`now()`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import OperationalError, connection, transaction
from django.db.models.functions import Now

from orchestrator.models import Run, RunStatus
from schedules import retries, runleases
from schedules.models import ScheduledRun, ScheduledRunStatus

logger = logging.getLogger(__name__)

ERROR_SUMMARY_MAX = 500
LOCK_NOT_AVAILABLE = "55P03"  # PostgreSQL's SQLSTATE for a lock_timeout
WORKER_LOST = "worker lost"
_WAITING = (ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED)


class RunFailed(Exception):
    """How a failed run's Celery task ends (FAILURE, so Flower counts it failed): its one argument is
    the run's short error_summary, never a job's output. The run's own outcome is in the database."""


def run_mark_throttled(run_id: int, scheduled_run_id: int | None, reason: str) -> None:
    """Record that the run waits, and why: once, on the transition (a run woken that must wait again
    writes nothing), so a wait costs O(1) writes however long it lasts. The Run stays `queued` (its
    start gate) with `waiting_since` set and the reason; its mirror goes `throttled`."""
    reason = reason[:ERROR_SUMMARY_MAX]
    with transaction.atomic():
        waiting = Run.objects.filter(pk=run_id, status=RunStatus.QUEUED, waiting_since__isnull=True)
        # An early copy of its message while the run waits to retry (retries.py) waits for no slot.
        marked = waiting.exclude(retry_at__gt=Now()).update(
            error_summary=reason, published_at=Now(), waiting_since=Now()
        )
        if marked and scheduled_run_id is not None:
            ScheduledRun.objects.filter(pk=scheduled_run_id, status=ScheduledRunStatus.QUEUED).update(
                status=ScheduledRunStatus.THROTTLED, error_summary=reason, published_at=Now()
            )


# The start gate in one statement. Row locks in the order every
# writer of both tables takes them, the Run first: `s` reads `r`, so the Run's UPDATE runs (and locks)
# first. The Run starts only while its mirror still waits (checked in the statement's snapshot), and the
# mirror's UPDATE checks again on the row it locks (0 rows: settled in between; the start rolls back).
_START_SQL = """
WITH r AS (
    UPDATE orchestrator_run
       SET status = 'running', attempt = attempt + 1, started_at = now(), heartbeat_at = now(),
           finished_at = NULL, worker = %(worker)s, error_summary = '', lease_seq = %(seq)s,
           waiting_since = NULL
     WHERE id = %(run)s AND status = 'queued' AND (retry_at IS NULL OR retry_at <= now())
       AND (%(attempt)s::int IS NULL OR attempt = %(attempt)s::int)
       AND (%(sr)s::bigint IS NULL OR EXISTS (
            SELECT 1 FROM schedules_scheduledrun
             WHERE id = %(sr)s::bigint AND status IN ('queued', 'throttled')))
    RETURNING attempt
), s AS (
    UPDATE schedules_scheduledrun
       SET status = 'running', started_at = now(), heartbeat_at = now(), finished_at = NULL,
           worker = %(worker)s, error_summary = ''
     WHERE id = %(sr)s::bigint AND status IN ('queued', 'throttled') AND EXISTS (SELECT 1 FROM r)
    RETURNING id
)
SELECT (SELECT attempt FROM r), (SELECT count(*) FROM s)
"""


def run_start(
    run_id: int,
    scheduled_run_id: int | None,
    *,
    worker: str,
    lease_seq: int | None,
    attempt: int | None = None,
) -> int | None:
    """The at-most-once gate. Returns the new attempt, or None when the run is not ours to start.

    `lease_seq` is the semaphore's grant number (worker/semaphore.py): the highest one among running
    runs tells a Redis that came back behind the database (a restore, a failover) from a current one.
    `attempt`: the attempt the caller read with the run; the gate then also requires it unchanged.
    """
    params = {"run": run_id, "sr": scheduled_run_id, "worker": worker, "seq": lease_seq, "attempt": attempt}
    # An explicit transaction, as for the finish: a start whose process dies while it waits on a lock
    # is rolled back, not committed for a run nobody executes.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_START_SQL, params)
        started, started_mirror = cursor.fetchone()
        if started is not None and scheduled_run_id is not None and not started_mirror:
            # Its slot was settled in between (see _START_SQL): the Run must not start behind its back.
            transaction.set_rollback(True)
            return None
    return started


def run_heartbeat(run_id: int, scheduled_run_id: int | None, attempt: int) -> bool:
    """Stamp heartbeat_at; False when the run is no longer ours (reaped, cancelled, finished elsewhere)."""
    with transaction.atomic():
        alive = (
            Run.objects.filter(pk=run_id, status=RunStatus.RUNNING, attempt=attempt)
            .exclude(cancel_deadline__lte=Now())  # a cancel whose grace passed: the worker missed it
            .update(heartbeat_at=Now())
        )
        if alive and scheduled_run_id is not None:
            ScheduledRun.objects.filter(pk=scheduled_run_id, status=ScheduledRunStatus.RUNNING).update(
                heartbeat_at=Now()
            )
    return bool(alive)


# A finish in one statement: the Run (fenced by attempt and/or worker), then its mirror, found by id or,
# for the worker's parent, which does not know it, by run. A run asked to cancel ends `cancelled` unless
# it succeeded.
_FINISH_SQL = """
WITH r AS (
    UPDATE orchestrator_run
       SET status = CASE WHEN cancel_requested_at IS NULL OR %(status)s = 'succeeded'
                         THEN %(status)s ELSE 'cancelled' END,
           error_summary = CASE WHEN cancel_requested_at IS NULL OR %(status)s = 'succeeded'
                                THEN %(summary)s ELSE left('cancelled by ' || cancelled_by, 500) END,
           finished_at = now(),
           stats = COALESCE(%(stats)s::jsonb, stats),
           llm_calls = COALESCE(%(llm_calls)s::int, llm_calls),
           llm_prompt_tokens = COALESCE(%(llm_prompt_tokens)s::int, llm_prompt_tokens),
           llm_completion_tokens = COALESCE(%(llm_completion_tokens)s::int, llm_completion_tokens)
     WHERE id = %(run)s AND status = 'running'
       AND (%(attempt)s::int IS NULL OR attempt = %(attempt)s::int)
       AND (%(worker)s::text IS NULL OR worker = %(worker)s::text)
    RETURNING id, status, error_summary
), s AS (
    UPDATE schedules_scheduledrun
       SET (status, error_summary) = (SELECT status, error_summary FROM r), finished_at = now()
     WHERE {mirror} AND status = 'running' AND EXISTS (SELECT 1 FROM r)
    RETURNING id
)
SELECT count(*) FROM r
"""
_FINISH_BY_ID_SQL = _FINISH_SQL.format(mirror="id = %(sr)s")
_FINISH_BY_RUN_SQL = _FINISH_SQL.format(mirror="run_id = %(run)s")
_LLM_COUNTERS = ("llm_calls", "llm_prompt_tokens", "llm_completion_tokens")


def run_finish(
    run_id: int,
    scheduled_run_id: int | None,
    *,
    status: str,
    error_summary: str = "",
    stats: dict[str, Any] | None = None,
    attempt: int | None = None,
    worker: str | None = None,
) -> bool:
    """End a running run, fenced by `attempt` (or `worker`), and mirror it; False if it was not ours."""
    if attempt is None and worker is None:
        raise ValueError("a finish is fenced by attempt or by worker")
    params: dict[str, Any] = {
        "run": run_id,
        "sr": scheduled_run_id,
        "status": str(status),
        "summary": (error_summary or "")[:ERROR_SUMMARY_MAX],
        "stats": json.dumps(stats) if stats is not None else None,
        "attempt": attempt,
        "worker": worker,
    }
    for counter in _LLM_COUNTERS:
        value = stats.get(counter) if stats is not None else None
        params[counter] = value if isinstance(value, int) and not isinstance(value, bool) else None
    sql = _FINISH_BY_ID_SQL if scheduled_run_id is not None else _FINISH_BY_RUN_SQL
    # In an explicit transaction, although it is one statement: a finish blocked on a row lock whose
    # process is then killed (the hard time limit) must not commit when the lock goes; its COMMIT never
    # comes, so PostgreSQL rolls it back, and the parent's outcome stands.
    with transaction.atomic(), connection.cursor() as cursor:
        if (status != RunStatus.SUCCEEDED or attempt != 1) and retries.run_retry_or_record(
            run_id, status=params["status"], error_summary=params["summary"], attempt=attempt, worker=worker
        ):
            return True  # the attempt ended; the run waits for its next one (schedules/retries.py)
        cursor.execute(sql, params)
        (ended,) = cursor.fetchone()
    return bool(ended)


_CANCEL_SQL = """
UPDATE orchestrator_run
   SET status = 'cancelled', finished_at = now(), error_summary = %(reason)s, cancelled_by = %(by)s
 WHERE id = ANY(%(ids)s) AND status = 'queued'
RETURNING id
"""


def run_cancel(run_ids: list[int], reason: str, by: str = "") -> list[int]:
    """End runs that have not started (waiting for a slot included) as `cancelled`, Run and its mirror;
    return the ids cancelled. A run that started meanwhile is left to finish; a cancelled run's
    message, delivered later, finds no `queued` run at the start gate and is dropped."""
    if not run_ids:
        return []
    reason = reason[:ERROR_SUMMARY_MAX]
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(_CANCEL_SQL, {"ids": list(run_ids), "reason": reason, "by": by[:200]})
            cancelled = [row[0] for row in cursor.fetchall()]
        if cancelled:
            ScheduledRun.objects.filter(run_id__in=cancelled, status__in=_WAITING).update(
                status=ScheduledRunStatus.CANCELLED, finished_at=Now(), error_summary=reason
            )
    for run_id in cancelled:
        logger.info("run cancelled", extra={"run_id": run_id, "reason": reason})
    return cancelled


# The highest semaphore grant among running runs (1 for a running run from before grants had numbers, 0
# when nothing runs): a Redis whose grant counter is below it lost lease state. Also read as a column of
# the worker's first query of a delivery (worker/loading.py), to save a round trip.
LEASE_FLOOR_SQL = (
    "SELECT COALESCE(MAX(COALESCE(lease_seq, 1)), 0) FROM orchestrator_run WHERE status = 'running'"
)


def running_lease_floor() -> int:
    """See LEASE_FLOOR_SQL."""
    with connection.cursor() as cursor:
        cursor.execute(LEASE_FLOOR_SQL)
        return int(cursor.fetchone()[0])


# --- outcomes kept in Redis while PostgreSQL was away, and reaping ---------------------------------


def _finish_unless_locked(run_id: int, **finish: Any) -> bool | None:
    """`run_finish`, waiting at most a second for the run's row; None when another session holds it
    (left for the next pass): a finish stuck behind a lock must not stall the reaper of every scheduler."""
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '1s'")
            return run_finish(run_id, **finish)
    except OperationalError as exc:
        if getattr(exc.__cause__, "pgcode", None) == LOCK_NOT_AVAILABLE:
            logger.info("run's row locked; left for the next pass", extra={"run_id": run_id})
            return None
        raise


def apply_pending_outcomes(run_ids: list[int] | None = None) -> list[int]:
    """Write the outcomes workers kept in Redis while the database was away, each fenced as recorded;
    return the runs settled (written, or found ended otherwise or not that delivery's)."""
    settled = []
    for run_id, record in runleases.outcomes_pending(run_ids).items():
        summary = record.get("error_summary") or ""
        written = _finish_unless_locked(
            run_id,
            scheduled_run_id=record.get("scheduled_run_id"),
            status=record["status"],
            error_summary=summary,
            stats=record.get("stats"),
            attempt=record.get("attempt"),
            worker=record.get("worker"),
        )
        if written is None:
            continue
        if written:
            logger.info("recorded outcome written", extra={"run_id": run_id, "status": record["status"]})
            _store_task_result(record.get("task_id"), run_id, record["status"], summary)
        runleases.outcome_clear(run_id)
        settled.append(run_id)
    return settled


def _store_task_result(task_id: str | None, run_id: int, status: str, summary: str) -> None:
    """The run task's Celery result for an outcome written here rather than by its task (a reaped run,
    one whose worker left its outcome in Redis, or whose pool process died): stored by the result
    backend (its public `store_result`), FAILURE with a `RunFailed` as the task itself would."""
    if not task_id:
        return
    try:
        from celery import states

        from project.celery import app

        if status == RunStatus.SUCCEEDED:
            app.backend.store_result(task_id, {"run_id": run_id, "status": status}, states.SUCCESS)
        else:
            app.backend.store_result(task_id, RunFailed(summary or status), states.FAILURE)
    except Exception:
        logger.exception("could not store the task result", extra={"task_id": task_id})


# Candidates: running with no database heartbeat for a lease. The heartbeat alone never condemns a run
# (during a PostgreSQL outage live runs cannot stamp it); the Redis lease decides, below.
_CANDIDATES_SQL = """
SELECT id, attempt, worker, task_id FROM orchestrator_run
 WHERE status = 'running'
   AND COALESCE(heartbeat_at, started_at, created_at) < now() - make_interval(secs => %(lease)s)
 ORDER BY id LIMIT 1000
"""


def reap_lost_runs() -> list[int]:
    """Fail runs whose worker is gone (their liveness lease expired); return their ids.

    First writes the outcomes workers recorded in Redis, so a run that ended during a PostgreSQL outage
    gets its own outcome, not "worker lost". Raises redis.RedisError when Redis cannot be asked: then
    nothing is reaped (a run is never failed on the database's word alone).
    """
    apply_pending_outcomes()
    # Asked at every pass, not only once a run is overdue: a Redis that lost its data starts its one
    # lease of distrust now, so a run whose worker died later is still reaped within a lease + a period.
    trusted = runleases.liveness_trusted()
    lease = runleases.lease_seconds()
    with connection.cursor() as cursor:
        cursor.execute(_CANDIDATES_SQL, {"lease": lease})
        candidates = cursor.fetchall()
    if not candidates or not trusted:
        return []
    alive = runleases.runs_alive([row[0] for row in candidates])
    dead = [row for row in candidates if row[0] not in alive]
    if not dead:
        return []
    # A worker that ended its run while the database was away recorded the outcome before it let its
    # lease go: look once more, after the liveness check.
    settled = set(apply_pending_outcomes([row[0] for row in dead]))
    summary = f"{WORKER_LOST} (lease of {lease:g}s expired)"
    reaped = []
    for run_id, attempt, worker, task_id in dead:
        if run_id in settled or not _finish_unless_locked(
            run_id, scheduled_run_id=None, status=RunStatus.FAILED, error_summary=summary, attempt=attempt
        ):
            continue
        logger.warning("run reaped: worker lost", extra={"run_id": run_id, "worker": worker})
        # Its worker is gone (or cut off: should it come back, its task stores nothing over this).
        _store_task_result(task_id, run_id, RunStatus.FAILED, summary)
        reaped.append(run_id)
    return reaped
