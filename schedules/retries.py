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

from django.db import connection

from orchestrator.retry_policy import attempt_outcome, effective_policy, retry_delay, should_retry

# The ended run (its row is locked by the finish that just wrote it), the policies and its mirror.
_ENDED_SQL = """
SELECT r.attempt, r.status, r.error_summary, r.started_at, r.finished_at, r.worker,
       j.retry_policy, s.retry_policy, sr.id
  FROM orchestrator_run r
  JOIN orchestrator_job j ON j.id = r.job_id
  LEFT JOIN schedules_scheduledrun sr ON sr.run_id = r.id
  LEFT JOIN schedules_schedule s ON s.id = sr.schedule_id
 WHERE r.id = %(run)s
"""

_RECORD_SQL = """
INSERT INTO orchestrator_runattempt (run_id, attempt, outcome, error_summary, started_at, finished_at, worker)
VALUES (%(run)s, %(attempt)s, %(outcome)s, %(summary)s, %(started)s, %(finished)s, %(worker)s)
ON CONFLICT ON CONSTRAINT runattempt_unique_attempt DO NOTHING
"""

# Back to the start gate, for the same run and slot: the message is published by the outbox sweep once
# retry_at has passed (published_at NULL), never before (the sweep and the start gate both check).
_REQUEUE_SQL = """
WITH r AS (
    UPDATE orchestrator_run
       SET status = 'queued', retry_at = now() + make_interval(secs => %(delay)s), finished_at = NULL,
           published_at = NULL, waiting_since = NULL, error_summary = %(summary)s
     WHERE id = %(run)s AND status = 'failed'
    RETURNING id
)
UPDATE schedules_scheduledrun
   SET status = 'queued', finished_at = NULL, published_at = NULL, error_summary = %(summary)s
 WHERE id = %(sr)s AND status = 'failed' AND EXISTS (SELECT 1 FROM r)
"""


def run_finished(run_id: int) -> bool:
    """After a fenced finish of `run_id` wrote its outcome: keep the attempt, and queue the next one
    if the policy says so (True). Runs inside the finish's transaction: nobody sees the run failed
    between the two."""
    with connection.cursor() as cursor:
        cursor.execute(_ENDED_SQL, {"run": run_id})
        row = cursor.fetchone()
        if row is None:
            return False
        attempt, status, summary, started, finished, worker, job_policy, schedule_policy, sr_id = row
        # Django leaves jsonb columns of a raw query as text.
        policy = effective_policy(
            *(json.loads(p) if isinstance(p, str) else p for p in (job_policy, schedule_policy))
        )
        outcome = attempt_outcome(status, summary)
        retry = should_retry(policy, attempt, outcome)
        if attempt <= 1 and not retry:
            return False  # one attempt only: the run itself is its record
        cursor.execute(
            _RECORD_SQL,
            {
                "run": run_id,
                "attempt": attempt,
                "outcome": outcome,
                "summary": summary,
                "started": started,
                "finished": finished,
                "worker": worker,
            },
        )
        if not retry:
            return False
        delay = retry_delay(policy, attempt)
        note = f"attempt {attempt} of {policy['max_attempts']} {outcome}, retry in {delay:g}s: {summary}"
        cursor.execute(_REQUEUE_SQL, {"run": run_id, "sr": sr_id, "delay": delay, "summary": note[:500]})
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
