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
from datetime import datetime
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

# The sweep holds no row lock while it talks to Redis (issue 15.4: it used to hold FOR UPDATE on up to
# 1,000 rows while it read whole queues and the `unacked` hash). It reads candidates with plain SELECTs,
# inspects the broker for the stale ones, then *takes* the rows to publish with one conditional UPDATE
# each kind (TAKE_*): a row is taken only if it is still `queued` and its published_at is still what was
# read, so two sweepers never both take a row and a run started meanwhile is left alone; rows another
# session holds locked are skipped, never waited on. It then publishes what it took.
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
"""

# The take stamps `%(stamp)s` = now() minus `hold` seconds: for a row to publish, a provisional stamp
# that makes it stale again `grace` seconds later, so an instance killed between the take and the
# publish leaves it to a later sweep's broker check (republished if the message is not there, not
# doubled if it did get out); for a row whose message is still waiting, now(). After a publish the
# stamp becomes now() (stamp_published); after a failed one it goes back to what was read.
TAKE_SCHEDULED_SQL = """
UPDATE schedules_scheduledrun AS sr
   SET published_at = now() - make_interval(secs => v.hold)
  FROM unnest(%(ids)s::bigint[], %(previous)s::timestamptz[], %(hold)s::float8[]) AS v(id, previous, hold)
 WHERE sr.id = v.id
   AND sr.id = ANY(ARRAY(SELECT id FROM schedules_scheduledrun WHERE id = ANY(%(ids)s)
                          FOR UPDATE SKIP LOCKED))
   AND sr.status = 'queued' AND sr.published_at IS NOT DISTINCT FROM v.previous
RETURNING sr.id, v.previous, sr.published_at
"""

TAKE_MANUAL_SQL = """
UPDATE orchestrator_run AS r
   SET published_at = now() - make_interval(secs => v.hold)
  FROM unnest(%(ids)s::bigint[], %(previous)s::timestamptz[], %(hold)s::float8[]) AS v(id, previous, hold)
 WHERE r.id = v.id
   AND r.id = ANY(ARRAY(SELECT id FROM orchestrator_run WHERE id = ANY(%(ids)s) FOR UPDATE SKIP LOCKED))
   AND r.status = 'queued' AND r.published_at IS NOT DISTINCT FROM v.previous
RETURNING r.id, v.previous, r.published_at
"""

# A failed publish gives the rows back as they were read, unless someone stamped them since.
UNTAKE_SQL = """
UPDATE {table} AS t SET published_at = v.previous
  FROM unnest(%(ids)s::bigint[], %(previous)s::timestamptz[], %(stamp)s::timestamptz[])
       AS v(id, previous, stamp)
 WHERE t.id = v.id AND t.published_at = v.stamp
"""


@dataclass
class SweepResult:
    published: int = 0
    still_waiting: int = 0
    failed: int = 0


@dataclass(frozen=True)
class _Candidate:
    message: RunMessage
    previous: datetime | None  # published_at as read

    @property
    def scheduled(self) -> bool:
        return self.message.scheduled_run_id is not None

    @property
    def key(self) -> tuple[bool, int]:  # the row the take is conditional on: the scheduled run, or the run
        m = self.message
        return (True, m.scheduled_run_id) if m.scheduled_run_id is not None else (False, m.run_id)


def sweep_outbox(
    *, grace: float, republish_after: float, limit: int = 1000, include_manual: bool = True
) -> SweepResult:
    """Re-publish queued runs whose message never reached the broker, or that the broker lost.

    `grace`: seconds a never-published row is left to its own on-commit publish (another process's).
    `republish_after`: seconds after a publish before a still-queued run's message is looked for.
    `include_manual`: also look at runs with no scheduled run (/api/runs/). That query walks every
    queued run (no index on orchestrator_run fits it), so the loop runs it less often than each tick.
    No row lock is held while the broker is read or written.
    """
    result = SweepResult()
    params = {"grace": float(grace), "republish_after": float(republish_after), "limit": int(limit)}
    with connection.cursor() as cursor:
        cursor.execute(SWEEP_SCHEDULED_SQL, params)
        picked = [
            _Candidate(_message(tid, rid, sid, key, queue), prev)
            for sid, rid, tid, key, queue, prev in cursor.fetchall()
        ]
        if include_manual:
            cursor.execute(SWEEP_MANUAL_SQL, params)
            picked += [
                _Candidate(_message(tid, rid, None, key, queue), prev)
                for rid, tid, key, queue, prev in cursor.fetchall()
            ]
    if not picked:
        return result

    to_send = [c for c in picked if c.previous is None]
    stale = [c for c in picked if c.previous is not None]
    waiting: list[_Candidate] = []
    if stale:
        try:
            in_broker = task_ids_in_broker({c.message.queue for c in stale}, delivered_within=republish_after)
        except Exception as exc:
            # Unknown broker state: look again after another republish_after.
            logger.warning(
                "outbox sweep could not inspect the broker",
                extra={"count": len(stale), "error": type(exc).__name__},
            )
            in_broker = {c.message.task_id for c in stale}
        for candidate in stale:
            (waiting if candidate.message.task_id in in_broker else to_send).append(candidate)

    # Take the rows (no wait on any lock); only what this sweep took is published or stamped.
    hold = float(republish_after) - float(grace)
    taken = _take([(c, hold) for c in to_send] + [(c, 0.0) for c in waiting])
    to_send = [c for c in to_send if c.key in taken]
    waiting = [c for c in waiting if c.key in taken]
    result.still_waiting = len(waiting)
    if waiting:
        stamp_published(c.message for c in waiting)  # looked for again after republish_after
    if to_send:
        messages = [c.message for c in to_send]
        try:
            send_messages(messages)
        except Exception as exc:
            result.failed = len(messages)
            logger.warning(
                "outbox sweep publish failed; broker unreachable",
                extra={"count": result.failed, "error": type(exc).__name__},
            )
            _untake([(c, taken[c.key]) for c in to_send])
        else:
            stamp_published(messages)
            result.published = len(messages)
    if result.published or result.still_waiting:
        logger.info(
            "outbox swept",
            extra={"republished": result.published, "still_waiting": result.still_waiting},
        )
    return result


def _take(rows: list[tuple[_Candidate, float]]) -> dict[tuple[bool, int], datetime]:
    """Stamp the candidates still as read, one statement per table; the taken ones' stamps by key."""
    taken: dict[tuple[bool, int], datetime] = {}
    with connection.cursor() as cursor:
        for scheduled, sql in ((True, TAKE_SCHEDULED_SQL), (False, TAKE_MANUAL_SQL)):
            part = [(c, hold) for c, hold in rows if c.scheduled is scheduled]
            if not part:
                continue
            cursor.execute(
                sql,
                {
                    "ids": [c.key[1] for c, _ in part],
                    "previous": [c.previous for c, _ in part],
                    "hold": [hold for _, hold in part],
                },
            )
            for row_id, _previous, stamp in cursor.fetchall():
                taken[(scheduled, row_id)] = stamp
    return taken


def _untake(rows: list[tuple[_Candidate, datetime]]) -> None:
    with connection.cursor() as cursor:
        for scheduled, table in ((True, "schedules_scheduledrun"), (False, "orchestrator_run")):
            part = [(c, stamp) for c, stamp in rows if c.scheduled is scheduled]
            if part:
                cursor.execute(
                    UNTAKE_SQL.format(table=table),
                    {
                        "ids": [c.key[1] for c, _ in part],
                        "previous": [c.previous for c, _ in part],
                        "stamp": [stamp for _, stamp in part],
                    },
                )


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
