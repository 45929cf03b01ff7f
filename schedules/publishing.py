"""Handing run messages to the broker, by task name (schedules never imports worker), and the outbox sweep.

The message for a run is published only after the transaction that created the run commits, and
always with the run's own task id, so a re-publish (the outbox sweep) is recognisably the same run and
the worker's conditional `queued -> running` transition absorbs the duplicate.

`published_at` is the outbox's clock: NULL means "not known to be in the broker". The sweep hands such
rows over again; rows published long ago and still `queued` are re-published only when their message is
no longer waiting in the broker (a Redis restart dropped it), so a slow backlog is not doubled.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlparse

from django.conf import settings
from django.db import connection, transaction

from project.celery import app

logger = logging.getLogger(__name__)

# The worker registers its task under this name; see worker/tasks.py.
RUN_TASK_NAME = "worker.execute_run"

# Messages buffered per Redis pipeline flush: one round trip per this many messages.
PUBLISH_BATCH_SIZE = 1000


@dataclass(frozen=True)
class RunMessage:
    task_id: str
    run_id: int
    scheduled_run_id: int | None
    job_key: str
    queue: str


def send_messages(messages: list[RunMessage]) -> None:
    """Hand the messages to the broker on one producer connection, pipelined; raise if the broker fails.

    Publishing the same task id twice is safe (the worker's duplicate check); losing one is not, so a
    failure raises and the caller leaves `published_at` unset for the outbox sweep.
    """
    if not messages:
        return
    limits = job_time_limits({message.job_key for message in messages})
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH_SIZE):
        for message in messages:
            hard, soft = limits.get(message.job_key, (None, None))
            app.send_task(
                RUN_TASK_NAME,
                kwargs={
                    "run_id": message.run_id,
                    "scheduled_run_id": message.scheduled_run_id,
                    "job_key": message.job_key,
                },
                task_id=message.task_id,
                queue=message.queue,
                routing_key=message.queue,
                producer=producer,
                time_limit=hard,
                soft_time_limit=soft,
            )


def job_time_limits(job_keys: Iterable[str]) -> dict[str, tuple[float | None, float | None]]:
    """(hard, soft) time limits per job, Celery's order: soft = `Job.timeout_seconds`, hard = soft +
    `WORKER_HARD_LIMIT_GRACE_SECONDS`. They travel in each message (one query per batch), so the worker's
    parent enforces them per run however the pool process is stuck; an edit applies to runs published
    after it (a throttled run's retries keep the limits it was published with)."""
    from orchestrator.models import Job

    grace = float(settings.WORKER_HARD_LIMIT_GRACE_SECONDS)
    limits: dict[str, tuple[float | None, float | None]] = {}
    for key, timeout in Job.objects.filter(key__in=set(job_keys)).values_list("key", "timeout_seconds"):
        limits[key] = (float(timeout) + grace, float(timeout)) if timeout else (None, None)
    return limits


def publish_messages(messages: list[RunMessage]) -> list[RunMessage]:
    """Publish the messages and stamp `published_at`; return the ones that were handed over."""
    if not messages:
        return []
    send_messages(messages)
    stamp_published(messages)
    return list(messages)


def stamp_published(messages: Iterable[RunMessage]) -> None:
    """Record that the messages reached the broker (database clock), on runs and scheduled runs."""
    messages = list(messages)
    run_ids = [m.run_id for m in messages]
    scheduled_ids = [m.scheduled_run_id for m in messages if m.scheduled_run_id is not None]
    with connection.cursor() as cursor:
        if run_ids:
            cursor.execute("UPDATE orchestrator_run SET published_at = now() WHERE id = ANY(%s)", [run_ids])
        if scheduled_ids:
            cursor.execute(
                "UPDATE schedules_scheduledrun SET published_at = now() WHERE id = ANY(%s)", [scheduled_ids]
            )


def publish_on_commit(messages: list[RunMessage]) -> None:
    """Publish once the current transaction commits; a failed publish is left to the outbox sweep."""

    def _publish() -> None:
        try:
            publish_messages(messages)
        except Exception:
            # The runs stay `queued` with no published_at: the scheduler's outbox sweep re-publishes them.
            logger.exception("publish failed; left for the outbox sweep", extra={"count": len(messages)})

    transaction.on_commit(_publish)


# --- Outbox sweep ----------------------------------------------------------------------------------

# The sweep runs in one transaction: pick rows FOR UPDATE SKIP LOCKED (two instances sweeping at once
# never pick the same row), hand the messages to the broker, stamp published_at, commit. An instance
# killed in the middle rolls back to published_at NULL, so the next sweep picks the rows straight away
# (a message it did send is a duplicate the worker absorbs; one it did not send is not lost).
# NULL published_at means "never reached the broker": publish. An old published_at on a still-queued
# run means "published long ago": publish only if the broker no longer holds the message.
# Both conditions are range scans of the partial index scheduledrun_outbox_idx (status = 'queued').
SWEEP_SCHEDULED_SQL = """
SELECT sr.id, sr.run_id, r.task_id, j.key, j.queue, sr.published_at
  FROM schedules_scheduledrun sr
  JOIN orchestrator_run r ON r.id = sr.run_id
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE sr.status = 'queued' AND sr.run_id IS NOT NULL
   AND ((sr.published_at IS NULL AND sr.created_at < now() - make_interval(secs => %(grace)s))
        OR sr.published_at < now() - make_interval(secs => %(republish_after)s))
 ORDER BY sr.id
 LIMIT %(limit)s
   FOR UPDATE OF sr SKIP LOCKED
"""

# Runs launched via /api/runs/ (no ScheduledRun) whose publish failed or whose message was lost.
SWEEP_MANUAL_SQL = """
SELECT r.id, r.task_id, j.key, j.queue, r.published_at
  FROM orchestrator_run r
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE r.status = 'queued'
   AND ((r.published_at IS NULL AND r.created_at < now() - make_interval(secs => %(grace)s))
        OR r.published_at < now() - make_interval(secs => %(republish_after)s))
   AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr WHERE sr.run_id = r.id)
   -- A run waiting for a slot (parked in Redis, its message acknowledged) is not a lost message: the
   -- worker's release wakes it, and worker/reaper.py re-publishes one nothing will wake.
   AND r.error_summary NOT LIKE 'waiting:%%'
 ORDER BY r.id
 LIMIT %(limit)s
   FOR UPDATE OF r SKIP LOCKED
"""


@dataclass
class SweepResult:
    published: int = 0
    still_waiting: int = 0
    failed: int = 0


def sweep_outbox(
    *, grace: float, republish_after: float, limit: int = 1000, include_manual: bool = True
) -> SweepResult:
    """Re-publish queued runs whose message never reached the broker, or that the broker lost.

    `grace`: seconds a never-published row is left to its own on-commit publish (another process's).
    `republish_after`: seconds after a publish before a still-queued run's message is looked for.
    `include_manual`: also look at runs with no scheduled run (/api/runs/). That query walks every
    queued run (no index on orchestrator_run fits it), so the loop runs it less often than each tick.
    """
    result = SweepResult()
    params = {"grace": float(grace), "republish_after": float(republish_after), "limit": int(limit)}
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(SWEEP_SCHEDULED_SQL, params)
            picked = [
                (_message(tid, rid, sid, key, queue), prev)
                for sid, rid, tid, key, queue, prev in cursor.fetchall()
            ]
            if include_manual:
                cursor.execute(SWEEP_MANUAL_SQL, params)
                picked += [
                    (_message(tid, rid, None, key, queue), prev)
                    for rid, tid, key, queue, prev in cursor.fetchall()
                ]
        if not picked:
            return result

        to_send = [message for message, previous in picked if previous is None]
        stale = [message for message, previous in picked if previous is not None]
        waiting_messages: list[RunMessage] = []
        if stale:
            try:
                waiting = task_ids_in_broker({m.queue for m in stale}, delivered_within=republish_after)
            except Exception as exc:
                # Unknown broker state: look again after another republish_after.
                logger.warning(
                    "outbox sweep could not inspect the broker",
                    extra={"count": len(stale), "error": type(exc).__name__},
                )
                waiting = {m.task_id for m in stale}
            for message in stale:
                if message.task_id in waiting:
                    waiting_messages.append(message)
                else:
                    to_send.append(message)
        result.still_waiting = len(waiting_messages)
        if to_send:
            try:
                send_messages(to_send)
            except Exception as exc:
                result.failed = len(to_send)
                to_send = []
                logger.warning(
                    "outbox sweep publish failed; broker unreachable",
                    extra={"count": result.failed, "error": type(exc).__name__},
                )
        # Sent ones are published now; ones still waiting are not looked for again for a while.
        stamp_published(to_send + waiting_messages)
        result.published = len(to_send)
    if result.published or result.still_waiting:
        logger.info(
            "outbox swept",
            extra={"republished": result.published, "still_waiting": result.still_waiting},
        )
    return result


def _message(task_id: str, run_id: int, scheduled_run_id: int | None, key: str, queue: str) -> RunMessage:
    return RunMessage(
        task_id=task_id,
        run_id=run_id,
        scheduled_run_id=scheduled_run_id,
        job_key=key,
        queue=queue or f"jobs.{key}",
    )


# kombu's Redis transport keeps a queue's messages in a list named after the queue (one per priority
# step) and messages delivered to a worker but not yet acknowledged in the `unacked` hash.
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
_TASK_ID = re.compile(rb'"id":\s*"([^"]+)"')


def task_ids_in_broker(queues: Iterable[str], *, delivered_within: float | None = None) -> set[str]:
    """Task ids of run messages still waiting in the broker (queued or delivered but unacknowledged).

    `delivered_within`: count an unacknowledged message only if it was delivered to a worker less than
    this many seconds ago. The sweep only asks about runs still `queued`, which a live worker starts (or
    marks throttled) as soon as it takes the message; one delivered long ago and never started went with
    a worker that died holding it, and Redis would give it back only after the visibility timeout (an
    hour). Re-publishing it is harmless: the start gate runs it once (found by scripts/soak.py).
    """
    import redis

    broker_url = settings.CELERY_BROKER_URL
    if urlparse(broker_url).scheme not in {"redis", "rediss"}:
        # Another broker: we cannot look inside it, so assume the messages are still there.
        raise RuntimeError("broker inspection is only implemented for Redis")
    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    found: set[str] = set()
    try:
        keys = [
            queue if step == 0 else f"{queue}{_KOMBU_PRIORITY_SEP}{step}"
            for queue in queues
            for step in _KOMBU_PRIORITY_STEPS
        ]
        for key in keys:
            start = 0
            while True:
                chunk = client.lrange(key, start, start + 999)
                if not chunk:
                    break
                for raw in chunk:
                    found.update(_task_ids_of(raw))
                start += len(chunk)
        unacked = client.hgetall("unacked")
        if delivered_within is not None and unacked:
            # kombu scores each delivery tag with the delivering worker's time.time().
            delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
            oldest = time.time() - delivered_within
            unacked = {tag: raw for tag, raw in unacked.items() if delivered.get(tag, oldest + 1) >= oldest}
        for raw in unacked.values():
            found.update(_task_ids_of(raw))
    finally:
        client.close()
    return found


def _task_ids_of(raw: bytes) -> set[str]:
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):  # unacked entries are [message, exchange, routing_key]
            payload = payload[0]
        task_id = payload.get("headers", {}).get("id")
        return {task_id} if task_id else set()
    except Exception:
        return {m.decode() for m in _TASK_ID.findall(raw)}
