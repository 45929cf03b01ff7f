"""Housekeeping that runs inside every worker's parent process, in one background thread.

Each tick:
1. reap: a run `running` whose heartbeat is older than one lease TTL is `failed` ("worker lost");
2. broker check: if the broker's Redis lost its data (restart without persistence), re-publish the runs
   still waiting (queued or throttled), whose messages went with it;
3. stalled throttled runs: re-publish those whose retries stopped (the worker holding the retry died);
4. semaphore warm-up: if Redis lost the lease sets and nothing is running, skip the warm-up pause.

All of it is safe with any number of worker processes: the reap is one conditional UPDATE (a run is
failed once, by whichever instance gets there first), and the broker check is a SET NX (one instance
re-publishes). It lives in the worker, not the scheduler, because schedules must not import worker.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery.signals import worker_init, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection, transaction

from orchestrator.models import Run, RunStatus
from schedules.models import ScheduledRun, ScheduledRunStatus
from worker import semaphore
from worker.execution import WORKER_LOST, caps_for_run, lease_owner

logger = logging.getLogger(__name__)

BROKER_MARKER_KEY = "cb:broker:marker"
REPUBLISH_BATCH = 500

_REAP_SQL = """
UPDATE {run}
   SET status = 'failed', finished_at = now(), error_summary = %(summary)s
 WHERE status = 'running'
   AND COALESCE(heartbeat_at, started_at, created_at) < now() - make_interval(secs => %(lease)s)
RETURNING id, worker, task_id
"""

_REAP_MIRROR_SQL = """
UPDATE {scheduled}
   SET status = 'failed', finished_at = now(), error_summary = %(summary)s
 WHERE run_id = ANY(%(run_ids)s) AND status = 'running'
"""


def reap_lost_runs() -> list[int]:
    """Fail runs whose worker stopped heartbeating; return their ids."""
    lease = float(settings.WORKER_LEASE_SECONDS)
    summary = f"{WORKER_LOST} (no heartbeat for {lease:g}s)"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_REAP_SQL.format(run=Run._meta.db_table), {"summary": summary, "lease": lease})
        reaped = cursor.fetchall()
        if reaped:
            cursor.execute(
                _REAP_MIRROR_SQL.format(scheduled=ScheduledRun._meta.db_table),
                {"summary": summary, "run_ids": [row[0] for row in reaped]},
            )
    for run_id, worker, task_id in reaped:
        logger.warning("run reaped: worker lost", extra={"run_id": run_id, "worker": worker})
        try:
            semaphore.semaphore_release(caps_for_run(run_id), owner=lease_owner(run_id, worker))
        except (redis.RedisError, Run.DoesNotExist):
            pass  # the leases expire by themselves
        _mark_task_lost(task_id)
    return [row[0] for row in reaped]


def _mark_task_lost(task_id: str) -> None:
    """The TaskResult of a run whose whole worker died would say STARTED forever."""
    if not task_id:
        return
    try:
        from billiard.exceptions import WorkerLostError

        from project.celery import app

        app.backend.mark_as_failure(task_id, WorkerLostError(WORKER_LOST))
    except Exception:
        logger.exception("could not mark the task result failed", extra={"task_id": task_id})


def _broker_client() -> redis.Redis | None:
    from project.celery import app

    url = app.conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)


def republish_waiting_runs(run_ids: list[int] | None = None) -> int:
    """Publish again the runs still waiting for a worker (queued, or throttled); return the count.

    Duplicates are harmless: the start is a conditional update, so a run executes at most once.
    """
    from schedules.publishing import RunMessage, publish_messages

    waiting = Run.objects.filter(status=RunStatus.QUEUED)
    if run_ids is not None:
        waiting = waiting.filter(pk__in=run_ids)
    runs = list(
        waiting.exclude(task_id="").select_related("job").order_by("created_at", "id")[:REPUBLISH_BATCH]
    )
    if not runs:
        return 0
    scheduled = dict(
        ScheduledRun.objects.filter(
            run_id__in=[r.pk for r in runs],
            status__in=[ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED],
        ).values_list("run_id", "id")
    )
    messages = [
        RunMessage(
            task_id=run.task_id,
            run_id=run.pk,
            scheduled_run_id=scheduled.get(run.pk),
            job_key=run.job.key,
            queue=run.job.queue or f"jobs.{run.job.key}",
        )
        for run in runs
    ]
    return len(publish_messages(messages))


# Throttled runs whose retry chain stopped: every retry stamps published_at, so a stale stamp means the
# message went with a worker that died holding it (it would only come back after the visibility
# timeout). Each query claims its rows by stamping them, so concurrent instances never pick the same row.
_STALLED_SCHEDULED_SQL = """
WITH picked AS (
    SELECT sr.id FROM schedules_scheduledrun sr
     WHERE sr.status = 'throttled' AND sr.run_id IS NOT NULL
       AND sr.published_at < now() - make_interval(secs => %(stale)s)
     ORDER BY sr.id LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE schedules_scheduledrun sr SET published_at = now() FROM picked WHERE sr.id = picked.id
RETURNING sr.run_id
"""

_STALLED_MANUAL_SQL = """
WITH picked AS (
    SELECT r.id FROM orchestrator_run r
     WHERE r.status = 'queued' AND r.error_summary LIKE 'waiting:%%'
       AND r.published_at < now() - make_interval(secs => %(stale)s)
       AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr WHERE sr.run_id = r.id)
     ORDER BY r.id LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE orchestrator_run r SET published_at = now() FROM picked WHERE r.id = picked.id
RETURNING r.id
"""


def stalled_after_seconds() -> float:
    # Generous: a retry can also wait for a free pool process while the cap holders run, and every
    # false positive adds one (harmless, dropped-on-start) duplicate message.
    return max(5 * float(settings.WORKER_LEASE_SECONDS), 4 * float(settings.WORKER_THROTTLE_MAX_SECONDS))


def republish_stalled_throttled() -> int:
    """Re-publish throttled runs whose retries stopped arriving; return how many."""
    params = {"stale": stalled_after_seconds(), "limit": REPUBLISH_BATCH}
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_STALLED_SCHEDULED_SQL, params)
        run_ids = [row[0] for row in cursor.fetchall()]
        cursor.execute(_STALLED_MANUAL_SQL, params)
        run_ids += [row[0] for row in cursor.fetchall()]
    if not run_ids:
        return 0
    count = republish_waiting_runs(run_ids=run_ids)
    logger.warning("stalled throttled runs re-published", extra={"count": count})
    return count


def check_broker_data() -> int:
    """Re-publish waiting runs if the broker's Redis lost its data; return how many were re-published."""
    client = _broker_client()
    if client is None:
        return 0
    try:
        # The marker lives as long as the broker's data does; one instance wins the SET NX after a loss.
        if not client.set(BROKER_MARKER_KEY, "1", nx=True):
            return 0
    finally:
        client.close()
    count = republish_waiting_runs()
    logger.warning("broker data was lost (or first start): waiting runs re-published", extra={"count": count})
    return count


def warm_semaphore_if_idle() -> None:
    """If Redis has no lease epoch and nothing runs, there is nothing to re-assert: no warm-up."""
    client = semaphore.semaphore_client()
    if client.exists(semaphore.EPOCH_KEY):
        return
    if Run.objects.filter(status=RunStatus.RUNNING).exists():
        return
    if semaphore.semaphore_mark_warm():
        logger.info("semaphore epoch set; no runs to re-assert")


def maintenance_tick() -> dict[str, Any]:
    """One round of housekeeping; each part fails on its own without stopping the others."""
    report: dict[str, Any] = {}
    close_old_connections()
    for name, step in (
        ("reaped", reap_lost_runs),
        ("republished", check_broker_data),
        ("stalled", republish_stalled_throttled),
        ("warm", warm_semaphore_if_idle),
    ):
        try:
            report[name] = step()
        except Exception as exc:
            logger.warning(
                "worker maintenance step failed", extra={"step": name, "error": type(exc).__name__}
            )
            if isinstance(exc, redis.RedisError):
                continue
            connection.close()  # a broken connection is replaced on the next tick
    return report


class Maintenance:
    """The background thread of a worker's parent process."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            while True:
                maintenance_tick()
                if self._stop.wait(self.interval):
                    return
        finally:
            connection.close()


_maintenance: Maintenance | None = None


def _warn_if_visibility_too_short() -> None:
    """A run longer than the visibility timeout gets its message redelivered mid-run: say so at start."""
    from django.db.models import Max

    from orchestrator.models import Job
    from project.celery import BROKER_VISIBILITY_TIMEOUT

    longest = Job.objects.aggregate(longest=Max("timeout_seconds"))["longest"] or 0
    hard = longest + settings.WORKER_HARD_LIMIT_GRACE_SECONDS
    if hard >= BROKER_VISIBILITY_TIMEOUT:
        logger.warning(
            "BROKER_VISIBILITY_TIMEOUT is not longer than the longest hard time limit",
            extra={"visibility_timeout": BROKER_VISIBILITY_TIMEOUT, "longest_hard_limit": hard},
        )


@worker_init.connect
def _on_worker_init(**kwargs: Any) -> None:
    # Before the pool and the consumer start: a fresh Redis with nothing running needs no warm-up, and
    # deciding it here avoids a first message racing the first tick into a needless pause.
    try:
        warm_semaphore_if_idle()
        _warn_if_visibility_too_short()
    except Exception as exc:
        logger.warning("worker start-up checks failed", extra={"error": type(exc).__name__})
    finally:
        connection.close()  # never hand an open connection to forked pool children


@worker_ready.connect
def _on_worker_ready(**kwargs: Any) -> None:
    global _maintenance
    if _maintenance is None:
        # The first round before any message is taken: runs a previous Redis lost are re-published now,
        # not racing the runs launched right after start-up.
        maintenance_tick()
        connection.close()
        _maintenance = Maintenance(float(settings.WORKER_REAPER_INTERVAL_SECONDS))
        _maintenance.start()
        logger.info("worker maintenance started", extra={"interval": _maintenance.interval})


@worker_shutdown.connect
def _on_worker_shutdown(**kwargs: Any) -> None:
    global _maintenance
    if _maintenance is not None:
        _maintenance.stop()
        _maintenance = None
