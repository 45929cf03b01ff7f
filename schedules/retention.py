"""Retention: pruning old history in small batches, by the scheduler's housekeeping and `prune_history`.

What goes, oldest first, once older than `HISTORY_KEEP_DAYS` (by `created_at`, the database clock):

- finished `ScheduledRun`s (succeeded, failed, skipped, cancelled), except each schedule's newest
  `history_keep` (by slot), which stay whatever their age;
- finished `Run`s no scheduled run refers to any more (a kept scheduled run keeps its run), with their
  `Finding`s and their django-celery-results `TaskResult`;
- `TaskResult`s of other tasks, by `date_done`.

Queued, throttled and running rows are never touched. Each batch is one short transaction over at most
BATCH_SIZE rows, taken with `FOR UPDATE SKIP LOCKED` (a row someone holds is left for the next pass);
candidates are found with plain reads, which lock nothing. Pruning never revives a slot: the
schedule's `last_run_at` high-water mark, not its history, keeps a slot from being dispatched twice.
Nor does it lower /metrics' history counters: those are counted into totals tables when a run finishes
(monitoring/migrations/0002_history_totals.py), and pruning leaves them alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db import connection, transaction

from schedules.publishing import RUN_TASK_NAME

logger = logging.getLogger(__name__)

# Rows per transaction: short row locks, a bounded rollback, a WAL burst the replicas absorb.
BATCH_SIZE = 500
# The scheduler prunes this often (seconds), spending at most PASS_BUDGET_SECONDS of each pass on it;
# a backlog (the first prune of a months-old database) continues on the following passes.
PRUNE_EVERY_SECONDS = 600.0
PASS_BUDGET_SECONDS = 2.0

_SCHEDULED_DONE = ("succeeded", "failed", "skipped", "cancelled")
_RUN_DONE = ("succeeded", "failed", "cancelled")

# Candidates by id (keyset): finished and old. Which of them history_keep keeps is decided under the lock.
SCHEDULED_CANDIDATES_SQL = """
SELECT id FROM schedules_scheduledrun
 WHERE id > %(after)s AND status = ANY(%(done)s)
   AND created_at < now() - make_interval(secs => %(keep)s)
 ORDER BY id LIMIT %(limit)s
"""

# Per schedule of the batch, the newest scheduled run history_keep does not keep (OFFSET history_keep,
# by slot, on the index scheduledrun_history_idx): it and everything older may go.
PRUNE_SCHEDULED_SQL = """
WITH cuts AS (
    SELECT s.id AS schedule_id, cut.scheduled_for, cut.id
      FROM schedules_schedule s
      CROSS JOIN LATERAL (
            SELECT r.scheduled_for, r.id FROM schedules_scheduledrun r
             WHERE r.schedule_id = s.id
             ORDER BY r.scheduled_for DESC, r.id DESC
            OFFSET s.history_keep LIMIT 1) cut
     WHERE s.id IN (SELECT schedule_id FROM schedules_scheduledrun WHERE id = ANY(%(ids)s))
), doomed AS (
    SELECT sr.id FROM schedules_scheduledrun sr
      JOIN cuts ON cuts.schedule_id = sr.schedule_id
     WHERE sr.id = ANY(%(ids)s) AND sr.status = ANY(%(done)s)
       AND (sr.scheduled_for, sr.id) <= (cuts.scheduled_for, cuts.id)
       FOR UPDATE OF sr SKIP LOCKED
)
DELETE FROM schedules_scheduledrun sr USING doomed WHERE sr.id = doomed.id
RETURNING sr.id
"""

RUN_CANDIDATES_SQL = """
SELECT r.id FROM orchestrator_run r
 WHERE r.id > %(after)s AND r.status = ANY(%(done)s)
   AND r.created_at < now() - make_interval(secs => %(keep)s)
   AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr WHERE sr.run_id = r.id)
 ORDER BY r.id LIMIT %(limit)s
"""

LOCK_RUNS_SQL = """
SELECT r.id, r.task_id FROM orchestrator_run r
 WHERE r.id = ANY(%(ids)s) AND r.status = ANY(%(done)s)
   AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr WHERE sr.run_id = r.id)
   FOR UPDATE SKIP LOCKED
"""

# TaskResults of anything but a run (a run's goes with its run, above), old by date_done.
TASK_RESULTS_SQL = """
DELETE FROM django_celery_results_taskresult
 WHERE id = ANY(ARRAY(
        SELECT t.id FROM django_celery_results_taskresult t
         WHERE t.date_done < now() - make_interval(secs => %(keep)s)
           AND t.task_name IS DISTINCT FROM %(run_task)s
         ORDER BY t.date_done LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED))
"""

# For --dry-run: the scheduled runs a prune would delete now (a plain read of the whole history).
PRUNABLE_SCHEDULED_SQL = """
SELECT id FROM (
    SELECT sr.id, sr.status, sr.created_at, s.history_keep,
           row_number() OVER (PARTITION BY sr.schedule_id ORDER BY sr.scheduled_for DESC, sr.id DESC) AS n
      FROM schedules_scheduledrun sr JOIN schedules_schedule s ON s.id = sr.schedule_id) ranked
 WHERE n > history_keep AND status = ANY(%(done)s)
   AND created_at < now() - make_interval(secs => %(keep)s)
"""

# For --dry-run: runs unreferenced now, or referenced only by scheduled runs that go in the same prune.
COUNT_PRUNABLE_SQL = f"""
WITH going AS ({PRUNABLE_SCHEDULED_SQL}),
runs AS (
    SELECT r.id, r.task_id FROM orchestrator_run r
     WHERE r.status = ANY(%(run_done)s)
       AND r.created_at < now() - make_interval(secs => %(keep)s)
       AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr
                        WHERE sr.run_id = r.id AND sr.id NOT IN (SELECT id FROM going)))
SELECT (SELECT count(*) FROM going),
       (SELECT count(*) FROM runs),
       (SELECT count(*) FROM orchestrator_finding WHERE run_id IN (SELECT id FROM runs)),
       (SELECT count(*) FROM django_celery_results_taskresult
         WHERE task_id IN (SELECT task_id FROM runs)
            OR (date_done < now() - make_interval(secs => %(keep)s)
                AND task_name IS DISTINCT FROM %(run_task)s))
"""


@dataclass
class PruneResult:
    scheduled_runs: int = 0
    runs: int = 0
    findings: int = 0
    task_results: int = 0
    # False: the time budget ran out with more to look at; `cursor` is where to go on.
    done: bool = True
    cursor: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.scheduled_runs + self.runs + self.findings + self.task_results


def keep_seconds(keep_days: float | None = None) -> float | None:
    """HISTORY_KEEP_DAYS (or `keep_days`) in seconds; None when it is 0: keep everything."""
    days = float(settings.HISTORY_KEEP_DAYS if keep_days is None else keep_days)
    return days * 86400.0 if days > 0 else None


def prune_history(
    *,
    keep_days: float | None = None,
    budget_seconds: float | None = None,
    cursor: dict[str, int] | None = None,
    batch_size: int = BATCH_SIZE,
) -> PruneResult:
    """Delete what retention no longer keeps, batch by batch; return the counts.

    `budget_seconds` stops between batches once spent (`done` False; pass `cursor` back to go on).
    """
    result = PruneResult(cursor=dict(cursor or {}))
    keep = keep_seconds(keep_days)
    if keep is None:
        return result
    deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
    steps = (
        ("scheduled_runs", _prune_scheduled_batch),
        ("runs", _prune_runs_batch),
        ("task_results", _prune_task_results_batch),
    )
    for step, prune_batch in steps:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                result.done = False
                return result
            after = result.cursor.get(step, 0)
            next_after = prune_batch(result, keep=keep, after=after, limit=batch_size)
            if next_after is None:
                break
            result.cursor[step] = next_after
    result.cursor = {}
    return result


def _prune_scheduled_batch(result: PruneResult, *, keep: float, after: int, limit: int) -> int | None:
    params = {"after": after, "done": list(_SCHEDULED_DONE), "keep": keep, "limit": limit}
    with connection.cursor() as cursor:
        cursor.execute(SCHEDULED_CANDIDATES_SQL, params)
        ids = [row[0] for row in cursor.fetchall()]
    if not ids:
        return None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(PRUNE_SCHEDULED_SQL, {"ids": ids, "done": list(_SCHEDULED_DONE)})
        result.scheduled_runs += cursor.rowcount
    return ids[-1]


def _prune_runs_batch(result: PruneResult, *, keep: float, after: int, limit: int) -> int | None:
    params = {"after": after, "done": list(_RUN_DONE), "keep": keep, "limit": limit}
    with connection.cursor() as cursor:
        cursor.execute(RUN_CANDIDATES_SQL, params)
        ids = [row[0] for row in cursor.fetchall()]
    if not ids:
        return None
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(LOCK_RUNS_SQL, {"ids": ids, "done": list(_RUN_DONE)})
        locked = cursor.fetchall()
        run_ids = [row[0] for row in locked]
        task_ids = [row[1] for row in locked if row[1]]
        if run_ids:
            # Findings and attempts first: their foreign keys to the run are checked at commit.
            cursor.execute("DELETE FROM orchestrator_finding WHERE run_id = ANY(%s)", [run_ids])
            result.findings += cursor.rowcount
            cursor.execute("DELETE FROM orchestrator_runattempt WHERE run_id = ANY(%s)", [run_ids])
            cursor.execute("DELETE FROM orchestrator_run WHERE id = ANY(%s)", [run_ids])
            result.runs += cursor.rowcount
        if task_ids:
            cursor.execute("DELETE FROM django_celery_results_taskresult WHERE task_id = ANY(%s)", [task_ids])
            result.task_results += cursor.rowcount
    return ids[-1]


def _prune_task_results_batch(result: PruneResult, *, keep: float, after: int, limit: int) -> int | None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(TASK_RESULTS_SQL, {"keep": keep, "run_task": RUN_TASK_NAME, "limit": limit})
        deleted = cursor.rowcount
    result.task_results += deleted
    # Ordered by age, deleting as it goes: the next batch starts from the oldest again.
    return after if deleted >= limit else None


def count_prunable(*, keep_days: float | None = None) -> PruneResult:
    """What `prune_history` would delete now (for --dry-run); reads only, locks nothing."""
    result = PruneResult()
    keep = keep_seconds(keep_days)
    if keep is None:
        return result
    params = {
        "done": list(_SCHEDULED_DONE),
        "run_done": list(_RUN_DONE),
        "keep": keep,
        "run_task": RUN_TASK_NAME,
    }
    with connection.cursor() as cursor:
        cursor.execute(COUNT_PRUNABLE_SQL, params)
        result.scheduled_runs, result.runs, result.findings, result.task_results = cursor.fetchone()
    return result


# --- The scheduler's housekeeping ----------------------------------------------------------------------

_next_prune = 0.0
_cursor: dict[str, int] = {}


def prune_history_if_due() -> PruneResult | None:
    """One bounded slice of pruning when due (every PRUNE_EVERY_SECONDS, sooner while a backlog lasts).

    Called from every scheduler pass after the dispatch; it never raises: pruning is housekeeping, and a
    failure here must not stop slots being dispatched. Safe with any number of instances (SKIP LOCKED).
    """
    global _next_prune, _cursor
    now = time.monotonic()
    if now < _next_prune:
        return None
    _next_prune = now + PRUNE_EVERY_SECONDS
    try:
        result = prune_history(budget_seconds=PASS_BUDGET_SECONDS, cursor=_cursor)
    except Exception as exc:
        logger.warning("history pruning failed; retried later", extra={"error": type(exc).__name__})
        _cursor = {}
        return None
    _cursor = {} if result.done else result.cursor
    if not result.done:
        _next_prune = now  # a backlog: another slice on the next pass
    if result.total:
        logger.info(
            "history pruned",
            extra={
                "scheduled_runs": result.scheduled_runs,
                "runs": result.runs,
                "findings": result.findings,
                "task_results": result.task_results,
                "done": result.done,
            },
        )
    return result
