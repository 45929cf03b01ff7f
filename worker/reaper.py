"""Housekeeping that runs inside every worker's parent process, in one background thread.

Each tick:
1. reap (schedules/runstate.py, the same pass every scheduler runs): outcomes kept in Redis while the
   database was away are written, then a run whose liveness lease expired is `failed` ("worker lost");
2. broker check: if the broker's Redis lost its data (restart without persistence), re-publish the runs
   still waiting (queued or throttled), whose messages went with it;
3. stalled throttled runs: re-publish those whose retries stopped (the worker holding the retry died);
4. lost wake-ups: wake parked runs that a free slot left behind, and re-arm rate-limit lines whose
   timer was lost (worker/ratelimit.py).

Lease sets Redis lost are rebuilt by the first acquire that finds it behind the database, not here.

All of it is safe with any number of worker processes and schedulers: the reap is fenced (a run is
failed once, by whichever instance gets there first), the broker check is a SET NX (one instance
re-publishes), and a wake-up marks the runs it woke.
"""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

import redis
from celery.signals import worker_init, worker_ready, worker_shutdown
from django.conf import settings
from django.db import close_old_connections, connection, transaction
from django.db.models.functions import Now

from orchestrator.models import Run, RunStatus
from project import redisconn
from project.dbsession import apply_worker_timeouts
from schedules.models import ScheduledRun, ScheduledRunStatus
from schedules.runstate import reap_lost_runs
from worker import semaphore
from worker.caps import waiter_id, wake_lost_waiters
from worker.ratelimit import wake_rate_lines

logger = logging.getLogger(__name__)

BROKER_MARKER_KEY = "cb:broker:marker"
REPUBLISH_BATCH = 500


def _broker_client() -> redis.Redis | None:
    """The broker's Redis (its master, through Sentinel), or None for any other broker (RabbitMQ keeps its
    queues across restarts; a message it does lose is the outbox sweep's, schedules/publishing.py)."""
    from project.celery import app, broker_is_redis

    if not broker_is_redis():
        return None
    return redisconn.client(app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5)


def republish_waiting_runs(run_ids: list[int] | None = None) -> int:
    """Publish again the runs still waiting for a worker (queued, or throttled); return the count.

    Duplicates are harmless: the start is a conditional update, so a run executes at most once.
    """
    from schedules.dispatch import message_for
    from schedules.publishing import publish_messages

    # Not a run waiting to retry: the outbox sweep publishes it when its retry is due.
    waiting = Run.objects.filter(status=RunStatus.QUEUED).exclude(retry_at__gt=Now())
    if run_ids is not None:
        waiting = waiting.filter(pk__in=run_ids)
    runs = list(
        waiting.exclude(task_id="").select_related("job").order_by("created_at", "id")[:REPUBLISH_BATCH]
    )
    if not runs:
        return 0
    scheduled = {
        sr.run_id: sr
        for sr in ScheduledRun.objects.filter(
            run_id__in=[r.pk for r in runs],
            status__in=[ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED],
        ).only("id", "run_id")
    }
    return len(publish_messages([message_for(run.job, run, scheduled.get(run.pk)) for run in runs]))


# Throttled runs nothing will wake: a run parked in Redis is woken by a release or the parked sweep, but
# one whose parked entry is gone (Redis lost it) or that waited by retrying (Redis was unreachable, or
# being rebuilt) and whose retry died with its worker has nobody left to publish it. Candidates are
# read without a write (parked runs stay candidates for as long as they wait: O(1) writes per wait);
# the ones not parked are claimed by a conditional stamp, so concurrent instances never pick the same.
_STALLED_SQL = """
SELECT r.id FROM orchestrator_run r
 WHERE r.status = 'queued' AND r.waiting_since IS NOT NULL
   AND r.published_at < now() - make_interval(secs => %(stale)s)
 ORDER BY r.id LIMIT %(limit)s
"""

_CLAIM_STALLED_SQL = """
UPDATE orchestrator_run SET published_at = now()
 WHERE id = ANY(%(ids)s) AND status = 'queued'
   AND published_at < now() - make_interval(secs => %(stale)s)
RETURNING id
"""


def stalled_after_seconds() -> float:
    # Generous: a retry can also wait for a free pool process while the cap holders run, and every
    # false positive adds one (harmless, dropped-on-start) duplicate message.
    return max(5 * float(settings.WORKER_LEASE_SECONDS), 4 * float(settings.WORKER_THROTTLE_MAX_SECONDS))


def republish_stalled_throttled() -> int:
    """Re-publish waiting runs that nothing will wake (not parked, retries stopped); return how many."""
    params = {"stale": stalled_after_seconds(), "limit": REPUBLISH_BATCH}
    with connection.cursor() as cursor:
        cursor.execute(_STALLED_SQL, params)
        candidates = [row[0] for row in cursor.fetchall()]
    if not candidates:
        return 0
    parked = semaphore.semaphore_parked([waiter_id(run_id) for run_id in candidates])
    orphans = [run_id for run_id in candidates if waiter_id(run_id) not in parked]
    if not orphans:
        return 0
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_CLAIM_STALLED_SQL, {**params, "ids": orphans})
        run_ids = [row[0] for row in cursor.fetchall()]
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
    # A warning only when something was waiting: a first start has nothing wrong to report.
    level = logging.WARNING if count else logging.INFO
    logger.log(level, "broker data lost (or first start): waiting runs re-published", extra={"count": count})
    return count


def maintenance_tick() -> dict[str, Any]:
    """One round of housekeeping; each part fails on its own without stopping the others."""
    report: dict[str, Any] = {}
    close_old_connections()
    for name, step in (
        ("reaped", reap_lost_runs),
        ("republished", check_broker_data),
        ("stalled", republish_stalled_throttled),
        ("woken", wake_lost_waiters),
        ("rate_woken", wake_rate_lines),
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


def _maintain(interval: float, stop: threading.Event) -> None:
    """The background thread of a worker's parent process: a tick every `interval` until `stop`."""
    try:
        while not stop.wait(interval):
            maintenance_tick()
    finally:
        connection.close()


_maintenance: tuple[threading.Thread, threading.Event] | None = None


def _warn_if_visibility_too_short() -> None:
    """A run longer than the visibility timeout gets its message redelivered mid-run: say so at start."""
    from django.db.models import Max

    from orchestrator.models import Job
    from project.celery import BROKER_VISIBILITY_TIMEOUT, broker_is_redis

    if not broker_is_redis():
        return  # only kombu's Redis transport redelivers on a visibility timeout
    longest = Job.objects.aggregate(longest=Max("timeout_seconds"))["longest"] or 0
    hard = longest + settings.WORKER_HARD_LIMIT_GRACE_SECONDS
    if hard >= BROKER_VISIBILITY_TIMEOUT:
        logger.warning(
            "BROKER_VISIBILITY_TIMEOUT is not longer than the longest hard time limit",
            extra={"visibility_timeout": BROKER_VISIBILITY_TIMEOUT, "longest_hard_limit": hard},
        )


def _warn_if_redis_may_evict() -> None:
    """Leases that Redis evicts silently are slots it hands out twice: the semaphores need noeviction."""
    try:
        policy = semaphore.semaphore_client().config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return  # CONFIG may be disabled on a managed Redis: nothing to check
    if policy and policy != "noeviction":
        logger.warning(
            "Redis may evict semaphore leases: set maxmemory-policy noeviction",
            extra={"maxmemory_policy": policy},
        )


@worker_init.connect
def _on_worker_init(**kwargs: Any) -> None:
    # Before the first query: no statement of the worker waits on a lock without bound (issue 15.4);
    # pool processes inherit it. A statement that hits the limit fails like any transient database
    # error (retried: worker/lifecycle.DATABASE_AWAY holds lock_timeout's and statement_timeout's errors).
    apply_worker_timeouts()
    try:
        _warn_if_visibility_too_short()
        _warn_if_redis_may_evict()
    except Exception as exc:
        logger.warning("worker start-up checks failed", extra={"error": type(exc).__name__})
    finally:
        connection.close()  # never hand an open connection to forked pool children
        gc.freeze()  # nor what is imported by now to their collectors: a full collection skips it


@worker_ready.connect
def _on_worker_ready(**kwargs: Any) -> None:
    global _maintenance
    if _maintenance is None:
        # The first round before any message is taken: runs a previous Redis lost are re-published now,
        # not racing the runs launched right after start-up.
        maintenance_tick()
        connection.close()
        interval, stop = float(settings.WORKER_REAPER_INTERVAL_SECONDS), threading.Event()
        thread = threading.Thread(
            target=_maintain, args=(interval, stop), name="worker-maintenance", daemon=True
        )
        thread.start()
        _maintenance = (thread, stop)
        logger.info("worker maintenance started", extra={"interval": interval})


@worker_shutdown.connect
def _on_worker_shutdown(**kwargs: Any) -> None:
    global _maintenance
    if _maintenance is not None:
        thread, stop = _maintenance
        stop.set()
        thread.join(timeout=10)
        _maintenance = None
