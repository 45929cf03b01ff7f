"""Handing run messages to the broker, by task name (schedules never imports worker), and the outbox sweep.

The message for a run is published only after the transaction that created the run commits, and
always with the run's own task id, so a re-publish (the outbox sweep) is recognisably the same run and
the worker's conditional `queued -> running` transition absorbs the duplicate.

`published_at` is the outbox's clock: NULL means "not known to be in the broker". The sweep hands such
rows over again, and re-publishes rows whose start gate is still closed: soon when their queue holds no
message any more (the message was taken, and nobody started the run: a worker host that vanished took
it), late and backing off otherwise (it may be waiting in a long queue). Of the broker it asks only how
many messages a queue holds (a passive queue declare, as for Redis as for RabbitMQ).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime

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
    """What a worker needs to find and start a run; made by `RunMessage.build` (also when read back)."""

    task_id: str
    run_id: int
    scheduled_run_id: int | None
    job_key: str
    queue: str

    @classmethod
    def build(
        cls,
        *,
        run_id: int,
        task_id: str,
        job_key: str,
        job_queue: str = "",
        scheduled_run_id: int | None = None,
    ) -> RunMessage:
        """The one place a run message is made: to the job's own queue, or its default `jobs.<key>`."""
        from orchestrator.models import default_queue

        return cls(
            task_id=task_id,
            run_id=run_id,
            scheduled_run_id=scheduled_run_id,
            job_key=job_key,
            queue=job_queue or default_queue(job_key),
        )


# What a caller may already know about its messages, so that the publish need not read it again:
# (hard, soft) time limits by job key (`time_limits`) and schedule names by scheduled run id.
Limits = dict[str, tuple[float | None, float | None]]
Names = dict[int, str]


def send_messages(
    messages: list[RunMessage],
    *,
    limits: Limits | None = None,
    names: Names | None = None,
    countdown: float | None = None,
) -> None:
    """Hand the messages to the broker on one producer connection, pipelined; raise if the broker fails.

    Publishing the same task id twice is safe (the worker's duplicate check); losing one is not, so a
    failure raises and the caller leaves `published_at` unset for the outbox sweep. `limits` and
    `names`, when the caller has them for every message (run-now does), save their two reads.
    `countdown`: deliver not before so many seconds (a Celery ETA; a rate-limited run's wake-up).
    """
    if not messages:
        return
    keys = {message.job_key for message in messages}
    if limits is None or not keys <= limits.keys():
        limits = job_time_limits(keys)
    scheduled = {m.scheduled_run_id for m in messages if m.scheduled_run_id is not None}
    if names is None or not scheduled <= names.keys():
        names = schedule_names(scheduled)
    with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_BATCH_SIZE):
        for message in messages:
            hard, soft = limits.get(message.job_key, (None, None))
            schedule = names.get(message.scheduled_run_id, "")
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
                countdown=countdown,
                # What Flower's task list shows (issue 17.4): the job and schedule as the name, the run
                # as the arguments, instead of "worker.execute_run" for every run.
                shadow=f"{message.job_key}: {schedule}" if schedule else f"{message.job_key}: manual run",
                argsrepr=f"run={message.run_id} scheduled_run={message.scheduled_run_id} {schedule!r}",
            )


def schedule_names(scheduled_run_ids: Iterable[int]) -> dict[int, str]:
    """Schedule name per scheduled run (one query per batch), for the Flower name of each message."""
    from schedules.models import ScheduledRun

    ids = set(scheduled_run_ids)
    if not ids:
        return {}
    return dict(ScheduledRun.objects.filter(pk__in=ids).values_list("pk", "schedule__name"))


def job_time_limits(job_keys: Iterable[str]) -> dict[str, tuple[float | None, float | None]]:
    """(hard, soft) time limits per job, Celery's order: soft = `Job.timeout_seconds`, hard = soft +
    `WORKER_HARD_LIMIT_GRACE_SECONDS`. They travel in each message (one query per batch), so the worker's
    parent enforces them per run however the pool process is stuck; an edit applies to runs published
    after it (a throttled run's retries keep the limits it was published with)."""
    from orchestrator.models import Job

    return {
        key: time_limits(timeout)
        for key, timeout in Job.objects.filter(key__in=set(job_keys)).values_list("key", "timeout_seconds")
    }


def time_limits(timeout_seconds: int | None) -> tuple[float | None, float | None]:
    """(hard, soft) for a job whose `timeout_seconds` is this (see job_time_limits)."""
    if not timeout_seconds:
        return None, None
    return float(timeout_seconds) + float(settings.WORKER_HARD_LIMIT_GRACE_SECONDS), float(timeout_seconds)


def publish_messages(
    messages: list[RunMessage], *, limits: Limits | None = None, names: Names | None = None
) -> list[RunMessage]:
    """Publish the messages and stamp `published_at`; return the ones that were handed over."""
    if not messages:
        return []
    send_messages(messages, limits=limits, names=names)
    stamp_published(messages)
    return list(messages)


def stamp_published(messages: Iterable[RunMessage]) -> None:
    """Record that the messages reached the broker (database clock), on runs and scheduled runs."""
    messages = list(messages)
    run_ids = [m.run_id for m in messages]
    scheduled_ids = [m.scheduled_run_id for m in messages if m.scheduled_run_id is not None]
    with connection.cursor() as cursor:
        if run_ids and scheduled_ids:
            # One statement (one round trip, one commit) for both tables.
            cursor.execute(
                "WITH runs AS (UPDATE orchestrator_run SET published_at = now() WHERE id = ANY(%s))"
                " UPDATE schedules_scheduledrun SET published_at = now() WHERE id = ANY(%s)",
                [run_ids, scheduled_ids],
            )
        elif run_ids:
            cursor.execute("UPDATE orchestrator_run SET published_at = now() WHERE id = ANY(%s)", [run_ids])
        elif scheduled_ids:
            cursor.execute(
                "UPDATE schedules_scheduledrun SET published_at = now() WHERE id = ANY(%s)", [scheduled_ids]
            )


def publish_on_commit(
    messages: list[RunMessage], *, limits: Limits | None = None, names: Names | None = None
) -> None:
    """Publish once the current transaction commits; a failed publish is left to the outbox sweep.
    `limits`, `names`: as for send_messages."""

    def _publish() -> None:
        try:
            publish_messages(messages, limits=limits, names=names)
        except Exception:
            # The runs stay `queued` with no published_at: the scheduler's outbox sweep re-publishes them.
            logger.exception("publish failed; left for the outbox sweep", extra={"count": len(messages)})

    transaction.on_commit(_publish)


# --- Outbox sweep ----------------------------------------------------------------------------------

# The sweep decides from the run's own state, and asks the broker only how many messages a queue holds
# (issue 15.8: it used to parse kombu's Redis layout, a private format that breaks on an upgrade and
# does not exist on RabbitMQ). A row is handed to the broker again when its start gate is still closed
# (Run and ScheduledRun `queued`: no worker started it, none parked it as throttled) and either
# - it never reached the broker: published_at NULL and created more than `grace` ago (its own
#   on-commit publish had its chance), or
# - its message was taken and nobody started the run (issue 34.4): published more than
#   `republish_after` seconds ago (15 s by default) to a queue that now holds no message at all. An empty
#   queue means the message left it; a worker that takes a message starts its run within moments
#   (prefetch 1: project/celery.py, WORKER_PREFETCH_MULTIPLIER), so a run still queued that long after
#   is one whose taker vanished (a host cut off as its blocking read took the message: the message is
#   in no queue and in no live worker's hands). A message that waits in a long queue never qualifies,
#   however long it waits: no copies for a backlog. The copy a run gets here lands in a queue that then
#   holds it, so no second copy follows until a worker has taken that one: one extra message in flight
#   per run at most, and the start gate drops it if the first one ran.
# - it was last published long ago, whatever its queue holds (the backstop: a message lost while its
#   queue stays busy, a broker that cannot be asked). It may as well be waiting in a long queue: the
#   start gate runs a run at most once however many copies are delivered. "Long ago" backs off per run
#   so the copies stay few: at least `republish_backlog_after` seconds, and at least as long as the run
#   had already waited when it was last published (published_at - created_at). The re-publishes of a
#   run fall at ages B, 2B, 4B, 8B... (B = republish_backlog_after): a message that waits T seconds
#   gets floor(log2(T / B)) + 1 copies besides its first publish (9 in a day with B = 300 s).
# Every time is the database's (now(), created_at, published_at as stamped with now()).
# All conditions are range scans of the partial index scheduledrun_outbox_idx (status = 'queued'); the
# back-off and the drained jobs are filters on the rows that range finds.
SWEEP_SCHEDULED_SQL = """
SELECT sr.id, sr.run_id, r.task_id, j.key, j.queue, sr.published_at
  FROM schedules_scheduledrun sr
  JOIN orchestrator_run r ON r.id = sr.run_id
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE sr.status = 'queued' AND sr.run_id IS NOT NULL AND r.status = 'queued'
   -- A run waiting to retry is published when its retry is due (schedules/retries.py), not before.
   AND (r.retry_at IS NULL OR r.retry_at <= now())
   AND ((sr.published_at IS NULL AND sr.created_at < now() - make_interval(secs => %(grace)s))
        OR (sr.published_at < now() - make_interval(secs => %(republish_after)s)
            AND r.job_id = ANY(%(drained_jobs)s))
        OR (sr.published_at < now() - make_interval(secs => %(backlog_after)s)
            AND sr.published_at + (sr.published_at - sr.created_at) < now()))
 ORDER BY sr.id
 LIMIT %(limit)s
"""

# Runs launched via /api/runs/ (no ScheduledRun) whose publish failed or whose message was lost.
SWEEP_MANUAL_SQL = """
SELECT r.id, r.task_id, j.key, j.queue, r.published_at
  FROM orchestrator_run r
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE r.status = 'queued' AND (r.retry_at IS NULL OR r.retry_at <= now())
   AND ((r.published_at IS NULL AND r.created_at < now() - make_interval(secs => %(grace)s))
        OR (r.published_at < now() - make_interval(secs => %(republish_after)s)
            AND r.job_id = ANY(%(drained_jobs)s))
        OR (r.published_at < now() - make_interval(secs => %(backlog_after)s)
            AND r.published_at + (r.published_at - r.created_at) < now()))
   AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun sr WHERE sr.run_id = r.id)
   -- A run waiting for a slot (parked in Redis, its message acknowledged) is not a lost message: the
   -- worker's release wakes it, and worker/reaper.py re-publishes one nothing will wake.
   AND r.waiting_since IS NULL
 ORDER BY r.id
 LIMIT %(limit)s
"""

# The jobs (and so the queues) that have a run the drained-queue rule could pick: only their queues are
# asked about, once each per sweep, before the candidates are read (asking afterwards would let a long
# backlog fill the LIMIT and hide a lost run of another queue).
SWEEP_JOBS_SQL = """
SELECT DISTINCT j.id, j.key, j.queue
  FROM schedules_scheduledrun sr
  JOIN orchestrator_run r ON r.id = sr.run_id
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE sr.status = 'queued' AND r.status = 'queued'
   AND sr.published_at < now() - make_interval(secs => %(republish_after)s)
"""

SWEEP_MANUAL_JOBS_SQL = """
SELECT DISTINCT j.id, j.key, j.queue
  FROM orchestrator_run r
  JOIN orchestrator_job j ON j.id = r.job_id
 WHERE r.status = 'queued' AND r.waiting_since IS NULL
   AND r.published_at < now() - make_interval(secs => %(republish_after)s)
"""

# The sweep holds no row lock while it talks to the broker (issue 15.4). It reads candidates with plain
# SELECTs, *takes* them with one conditional UPDATE per table (a row is taken only if it is still
# `queued` and its published_at is still what was read, so two sweepers never both take a row and a
# run started meanwhile is left alone; rows another session holds locked are skipped, never waited
# on), then publishes what it took and stamps now().
# The take's stamp is provisional: the one instant whose back-off (above) ends `grace` seconds from
# now, so an instance killed between the take and the publish leaves the row to a sweep `grace`
# seconds later, not to the next doubling. Solving p + max(B, p - created_at) = now() + grace for p:
# p = LEAST(now() + grace - B, created_at + (now() + grace - created_at) / 2). (The drained-queue rule
# finds such a row sooner: p is at least `republish_backlog_after` - `grace` in the past.)
_PROVISIONAL_STAMP = """LEAST(
       now() + make_interval(secs => %(grace)s - %(backlog_after)s),
       {t}.created_at + (now() + make_interval(secs => %(grace)s) - {t}.created_at) / 2)"""

TAKE_SCHEDULED_SQL = f"""
UPDATE schedules_scheduledrun AS sr
   SET published_at = {_PROVISIONAL_STAMP.format(t="sr")}
  FROM unnest(%(ids)s::bigint[], %(previous)s::timestamptz[]) AS v(id, previous)
 WHERE sr.id = v.id
   AND sr.id = ANY(ARRAY(SELECT id FROM schedules_scheduledrun WHERE id = ANY(%(ids)s)
                          FOR UPDATE SKIP LOCKED))
   AND sr.status = 'queued' AND sr.published_at IS NOT DISTINCT FROM v.previous
RETURNING sr.id, sr.published_at
"""

TAKE_MANUAL_SQL = f"""
UPDATE orchestrator_run AS r
   SET published_at = {_PROVISIONAL_STAMP.format(t="r")}
  FROM unnest(%(ids)s::bigint[], %(previous)s::timestamptz[]) AS v(id, previous)
 WHERE r.id = v.id
   AND r.id = ANY(ARRAY(SELECT id FROM orchestrator_run WHERE id = ANY(%(ids)s) FOR UPDATE SKIP LOCKED))
   AND r.status = 'queued' AND r.published_at IS NOT DISTINCT FROM v.previous
RETURNING r.id, r.published_at
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
    published: int = 0  # handed to the broker by this sweep (first publishes and re-publishes)
    republished: int = 0  # of which had been published before: presumed lost, or still waiting
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
    *,
    grace: float,
    republish_after: float,
    republish_backlog_after: float = 300.0,
    limit: int = 1000,
    include_manual: bool = True,
) -> SweepResult:
    """Publish queued runs whose message never reached the broker, or was taken and never started, or
    was published long ago.

    `grace`: seconds a never-published row is left to its own on-commit publish (another process's).
    `republish_after`: the shortest wait after a publish before a run still not started is published
    again when its queue holds no message (its message was taken: see SWEEP_SCHEDULED_SQL).
    `republish_backlog_after`: the same, whatever its queue holds; the wait doubles with the run's age.
    Of the broker only queue depths are read (any Celery broker), and the worker's start gate drops the
    copies of a run already started.
    `include_manual`: also look at runs with no scheduled run (/api/runs/). That query walks every
    queued run (no index on orchestrator_run fits it), so the loop runs it less often than each tick.
    No row lock is held while the broker is written.
    """
    result = SweepResult()
    params = {
        "grace": float(grace),
        "republish_after": float(republish_after),
        "backlog_after": max(float(republish_backlog_after), float(republish_after)),
        "limit": int(limit),
    }
    params["drained_jobs"] = _drained_jobs(params, include_manual=include_manual)
    picked = _sweep_candidates(params, include_manual=include_manual)
    if not picked:
        return result
    # Take the rows (no wait on any lock); only what this sweep took is published.
    taken = _take(picked, params)
    to_send = [c for c in picked if c.key in taken]
    if not to_send:
        return result
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
        return result
    stamp_published(messages)
    result.published = len(messages)
    result.republished = sum(1 for c in to_send if c.previous is not None)
    logger.info(
        "outbox swept",
        extra={"published": result.published - result.republished, "republished": result.republished},
    )
    return result


def _drained_jobs(params: dict, *, include_manual: bool) -> list[int]:
    """The jobs with a run old enough for the drained-queue rule whose queue holds no message."""
    with connection.cursor() as cursor:
        cursor.execute(SWEEP_JOBS_SQL, params)
        jobs = set(cursor.fetchall())
        if include_manual:
            cursor.execute(SWEEP_MANUAL_JOBS_SQL, params)
            jobs.update(cursor.fetchall())
    if not jobs:
        return []
    queue_of = {
        job_id: RunMessage.build(run_id=0, task_id="", job_key=key, job_queue=queue).queue
        for job_id, key, queue in jobs
    }
    drained = drained_queues(set(queue_of.values()))
    return sorted(job_id for job_id, queue in queue_of.items() if queue in drained)


def drained_queues(queues: Iterable[str]) -> set[str]:
    """The queues among these that hold no message ready for a worker, by the broker's own count (a
    passive queue declare: public kombu, Redis and RabbitMQ alike). A queue the broker does not know
    holds nothing (kombu's Redis transport answers an empty list so). A broker that cannot be asked
    gives none: then only the backstop republishes."""
    drained: set[str] = set()
    try:
        with app.pool.acquire(block=True) as conn:  # the publishers' pool: no new connection per sweep
            channel = conn.channel()
            try:
                for queue in sorted(set(queues)):
                    try:
                        count = channel.queue_declare(queue=queue, passive=True).message_count
                    except conn.channel_errors:
                        count = 0  # NOT_FOUND; AMQP closes the channel on it, so take a new one
                        with suppress(Exception):
                            channel.close()
                        channel = conn.channel()
                    if count == 0:
                        drained.add(queue)
            finally:
                with suppress(Exception):
                    channel.close()
    except Exception as exc:
        logger.warning("outbox sweep could not read queue depths", extra={"error": type(exc).__name__})
        return set()
    return drained


def _sweep_candidates(params: dict, *, include_manual: bool) -> list[_Candidate]:
    with connection.cursor() as cursor:
        cursor.execute(SWEEP_SCHEDULED_SQL, params)
        picked = [
            _Candidate(
                RunMessage.build(run_id=rid, task_id=tid, job_key=key, job_queue=queue, scheduled_run_id=sid),
                prev,
            )
            for sid, rid, tid, key, queue, prev in cursor.fetchall()
        ]
        if include_manual:
            cursor.execute(SWEEP_MANUAL_SQL, params)
            picked += [
                _Candidate(RunMessage.build(run_id=rid, task_id=tid, job_key=key, job_queue=queue), prev)
                for rid, tid, key, queue, prev in cursor.fetchall()
            ]
    return picked


def _take(candidates: list[_Candidate], params: dict) -> dict[tuple[bool, int], datetime]:
    """Stamp the candidates still as read, one statement per table; the taken ones' stamps by key."""
    taken: dict[tuple[bool, int], datetime] = {}
    with connection.cursor() as cursor:
        for scheduled, sql in ((True, TAKE_SCHEDULED_SQL), (False, TAKE_MANUAL_SQL)):
            part = [c for c in candidates if c.scheduled is scheduled]
            if not part:
                continue
            cursor.execute(
                sql,
                {
                    "ids": [c.key[1] for c in part],
                    "previous": [c.previous for c in part],
                    "grace": params["grace"],
                    "backlog_after": params["backlog_after"],
                },
            )
            for row_id, stamp in cursor.fetchall():
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
