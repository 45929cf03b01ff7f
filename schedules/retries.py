"""Retries: a failed attempt of a run becomes a new attempt of the same run, after a backoff.

The policy (orchestrator/retry_policy.py) is the job's, or its schedule's when that has one. A retry is
the same `Run` (and its one `ScheduledRun`, so the slot stays one) going back to `queued` with
`retry_at` set: the wait is a row in the database, never a sleeping process, so it survives a restart
of everything. The outbox sweep (schedules/publishing.py) publishes the run's message once `retry_at`
has passed, the scheduler's loop wakes for it, and the start gate (schedules/runstate.py) refuses to
start it earlier; the attempt number fences every write, so each attempt executes at most once. Each
finished attempt of a run that had (or gets) a retry is kept as a `RunAttempt` row; a run of one
attempt keeps none (the run itself is that attempt). The slot's mirror stays unfinished (`queued`)
while it waits, so overlap policies see it running and failure alerts count it once, at its end.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import connection

from orchestrator.retry_policy import attempt_outcome, effective_policy, retry_delay, should_retry

logger = logging.getLogger(__name__)

# The attempt that ends, fenced as the finish is (schedules/runstate.py: by attempt and/or worker), its row
# locked for the rest of the finish's transaction; the policies and its mirror.
_ENDING_SQL = """
SELECT r.attempt, r.started_at, r.worker, j.retry_policy, s.retry_policy, sr.id,
       r.cancel_requested_at IS NOT NULL
  FROM orchestrator_run r
  JOIN orchestrator_job j ON j.id = r.job_id
  LEFT JOIN schedules_scheduledrun sr ON sr.run_id = r.id
  LEFT JOIN schedules_schedule s ON s.id = sr.schedule_id
 WHERE r.id = %(run)s AND r.status = 'running'
   AND (%(attempt)s::int IS NULL OR r.attempt = %(attempt)s::int)
   AND (%(worker)s::text IS NULL OR r.worker = %(worker)s::text)
   FOR UPDATE OF r
"""

_RECORD_SQL = """
INSERT INTO orchestrator_runattempt (run_id, attempt, outcome, error_summary, started_at, finished_at, worker)
VALUES (%(run)s, %(attempt)s, %(outcome)s, %(summary)s, %(started)s, now(), %(worker)s)
ON CONFLICT ON CONSTRAINT runattempt_unique_attempt DO NOTHING
"""

# Instead of the finish: back to the start gate, the same run and slot, straight from `running` (never
# through `failed`, which the metrics' totals would count as a finished run and slot). The message is
# published by the outbox sweep once retry_at has passed (published_at NULL), never before (the sweep
# and the start gate both check).
_REQUEUE_SQL = """
WITH r AS (
    UPDATE orchestrator_run
       SET status = 'queued', retry_at = now() + make_interval(secs => %(delay)s), finished_at = NULL,
           published_at = NULL, waiting_since = NULL, error_summary = %(summary)s
     WHERE id = %(run)s AND status = 'running'
    RETURNING id
)
UPDATE schedules_scheduledrun
   SET status = 'queued', finished_at = NULL, published_at = NULL, error_summary = %(summary)s
 WHERE id = %(sr)s AND status = 'running' AND EXISTS (SELECT 1 FROM r)
"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value  # jsonb of a raw query comes as text


def run_retry_or_record(
    run_id: int, *, status: str, error_summary: str, attempt: int | None, worker: str | None
) -> bool:
    """Called by the finish (runstate.run_finish) in its transaction, before it writes: True when the
    ending attempt gets a new one instead (the run waits to retry; the finish writes nothing), False
    when the finish goes ahead. A run that was or will be retried keeps each attempt as a RunAttempt."""
    fence = {"run": run_id, "attempt": attempt, "worker": worker}
    with connection.cursor() as cursor:
        cursor.execute(_ENDING_SQL, fence)
        row = cursor.fetchone()
        if row is None:
            return False  # not ours: the finish finds nothing either
        number, started, ran_on, job_policy, schedule_policy, sr_id, cancel_asked = row
        policy = effective_policy(_json(job_policy), _json(schedule_policy))
        # A run asked to cancel ends `cancelled` whatever failure comes (runstate's finish): never retried.
        outcome = (
            "cancelled" if cancel_asked and status != "succeeded" else attempt_outcome(status, error_summary)
        )
        retry = should_retry(policy, number, outcome)
        if number <= 1 and not retry:
            return False  # one attempt only: the run itself is its record
        cursor.execute(
            _RECORD_SQL,
            {
                "run": run_id,
                "attempt": number,
                "outcome": outcome,
                "summary": error_summary,
                "started": started,
                "worker": ran_on,
            },
        )
        if not retry:
            return False
        delay = retry_delay(policy, number)
        note = f"attempt {number} of {policy['max_attempts']} {outcome}, retry in {delay:g}s: {error_summary}"
        cursor.execute(_REQUEUE_SQL, {"run": run_id, "sr": sr_id, "delay": delay, "summary": note[:500]})
    logger.info("run waits to retry", extra={"run_id": run_id, "attempt": number, "delay": delay})
    return True


# The scheduler's loop sleeps no longer than this (the partial index run_retry_idx finds it).
_NEXT_RETRY_SQL = """
SELECT EXTRACT(EPOCH FROM MIN(retry_at) - now()) FROM orchestrator_run
 WHERE status = 'queued' AND retry_at > now()
"""


def seconds_until_next_retry() -> float | None:
    """Seconds (database clock) until the earliest run waiting to retry is due; None if none waits."""
    with connection.cursor() as cursor:
        cursor.execute(_NEXT_RETRY_SQL)
        (value,) = cursor.fetchone()
    return None if value is None else float(value)
