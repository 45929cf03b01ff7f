"""Prometheus metrics, computed at scrape time from PostgreSQL and Redis (GET /metrics).

Why at scrape time, and not prometheus-client's multiprocess mode: the facts live in the database
already (every run's status, timings and trigger; every slot skipped and why; each schedule's next run),
written by whichever of many scheduler, worker and web processes did the work. Counting them where they
are is correct whatever number of processes run, restart or die (multiprocess mode loses a killed
process's counts unless its files are swept correctly, and needs a shared directory on one host). The
few facts only a scheduler process knows (its ticks and claims, that it is alive) it records in Redis
(record_scheduler_pass), read here as well.

The history counters (`cb_runs_total`, `cb_slots_skipped_total`, the duration and lag histograms) are
not counted over the history, which retention prunes (a drop would read as a counter reset, and
`increase()` would spike) and which holds up to 10,000,000 runs: PostgreSQL triggers count each run and
slot once, when it reaches its final status, into small totals tables (monitoring/models.py) that
pruning never touches. So those counters only go up, and equal the runs finished since the totals
began (migration 0002, which counted the history then present).

What a build reads (each on an index or a small table, none over the history):
- RUN_TOTALS_SQL, SLOT_TOTALS_SQL: the totals, after compact_totals folded the rows appended since;
- WAITING_SQL: queued runs waiting for a slot (run_status_heartbeat_idx), per job;
- RETRY_WAITING_SQL: queued runs waiting to retry (run_retry_idx), per job;
- the jobs, for the caps, and Redis (scheduler counters, live leases);
- PER_SCHEDULE_SQL: METRICS_PER_SCHEDULE's schedules (top-N: a sort of schedules_schedule) and, for
  each, its newest succeeded slot (scheduledrun_history_idx).
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import time
from collections.abc import Iterator

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from project import redisconn
from schedules import retention
from worker.ratelimit import LIMITED_KEY, waiters_key
from worker.semaphore import GLOBAL_SCOPE, holders_key, job_scope

logger = logging.getLogger(__name__)

# Redis keys the scheduler writes (monitoring.scheduler.after_pass).
SCHEDULER_COUNTERS_KEY = "cb:metrics:scheduler"  # hash: ticks, claimed, paused
SCHEDULER_INSTANCES_KEY = "cb:metrics:scheduler-instances"  # zset: claimant -> unix seconds it is alive until

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

SKIP_REASONS = ("missed", "overlap_skip", "overlap_buffer", "overlap_replaced", "job_disabled", "other")

# The history counters and histograms come from the totals the triggers of migration 0002 keep
# (monitoring/models.py): small tables, one row per key once compacted, whatever the history's size.
RUN_TOTALS_SQL = """
SELECT job, trigger, status, le, sum(runs), sum(seconds) FROM monitoring_runtotal GROUP BY 1, 2, 3, 4
"""
SLOT_TOTALS_SQL = """
SELECT status, reason, dispatch_le, start_le, sum(slots), sum(dispatch_seconds), sum(start_seconds)
  FROM monitoring_slottotal GROUP BY 1, 2, 3, 4
"""

# Every job, 0 when none waits: a gauge that disappears reads as "no data", not "none waiting".
# The waiting runs are found on run_status_heartbeat_idx (status = 'queued'), not by a pass over runs.
# Runs waiting for a retry's backoff to pass (schedules/retries.py), on run_retry_idx.
RETRY_WAITING_SQL = """
SELECT j.key, count(*) FROM orchestrator_run r JOIN orchestrator_job j ON j.id = r.job_id
 WHERE r.status = 'queued' AND r.retry_at > now() GROUP BY 1
"""

WAITING_SQL = """
SELECT j.key, coalesce(w.n, 0)
  FROM orchestrator_job j
  LEFT JOIN (SELECT job_id, count(*) AS n FROM orchestrator_run
              WHERE status = 'queued' AND waiting_since IS NOT NULL GROUP BY job_id) AS w
    ON w.job_id = j.id
"""

# Folding the rows the triggers appended into one row per key: the oldest `limit` rows in one
# transaction, moved and summed (any subset may be folded: a total is the sum over its key). One
# compaction at a time: a second one finds the advisory lock taken and leaves it to the first.
COMPACT_SQL = """
WITH moved AS (
    DELETE FROM {table} WHERE id = ANY(ARRAY(SELECT id FROM {table} ORDER BY id LIMIT %(limit)s))
    RETURNING {keys}, {values}
), folded AS (
    INSERT INTO {table} ({keys}, {values})
    SELECT {keys}, {sums} FROM moved GROUP BY {keys}
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM folded)
"""
COMPACT_TABLES = {
    "monitoring_runtotal": (("job", "trigger", "status", "le"), ("runs", "seconds")),
    "monitoring_slottotal": (
        ("status", "reason", "dispatch_le", "start_le"),
        ("slots", "dispatch_seconds", "start_seconds"),
    ),
    "monitoring_slotcount": (("quarter", "job_id", "labels", "status"), ("slots",)),
}
COMPACT_LOCK = 0x63620031  # any constant: the advisory lock key of compact_totals
# The calendar's slot counts carry their quarter hour, so unlike the totals they grow with time: those
# older than the history's age rule (HISTORY_KEEP_DAYS) go, a batch at a time, after each compaction.
PRUNE_SLOT_COUNTS_SQL = """
DELETE FROM monitoring_slotcount WHERE id = ANY(ARRAY(
    SELECT id FROM monitoring_slotcount
     WHERE quarter < now() - make_interval(secs => %(keep)s) LIMIT %(limit)s))
"""
COMPACT_BATCH = 50_000
COMPACT_EVERY_SECONDS = 60.0

# Per-schedule series, rendered in exposition format by PostgreSQL itself: building 2 samples per
# schedule as Python objects would cost most of the scrape budget on its own. Which schedules:
# METRICS_PER_SCHEDULE (`top:N` by default), the N latest first: enabled schedules by next_run_at
# (most overdue first), then the others. The last success is the newest succeeded slot's finish, read
# on scheduledrun_history_idx (a few index entries per schedule, not the whole history).
_LABEL = "replace(replace(replace(c.name, E'\\\\', E'\\\\\\\\'), '\"', E'\\\\\"'), E'\\n', E'\\\\n')"
PER_SCHEDULE_SQL = f"""
WITH chosen AS (
    SELECT s.id, s.name, s.enabled, s.next_run_at FROM schedules_schedule s
     ORDER BY (s.enabled AND s.next_run_at IS NOT NULL) DESC, s.next_run_at, s.id
     LIMIT %(limit)s
)
SELECT coalesce(string_agg(
         'cb_schedule_next_run_timestamp_seconds{{schedule="' || {_LABEL} || '"}} '
         || extract(epoch FROM c.next_run_at)::numeric(20, 3)::text, E'\\n'
         ORDER BY c.id) FILTER (WHERE c.enabled AND c.next_run_at IS NOT NULL), ''),
       coalesce(string_agg(
         'cb_schedule_last_success_timestamp_seconds{{schedule="' || {_LABEL} || '"}} '
         || extract(epoch FROM l.at)::numeric(20, 3)::text, E'\\n'
         ORDER BY c.id) FILTER (WHERE l.at IS NOT NULL), '')
  FROM chosen c
  LEFT JOIN LATERAL (SELECT r.finished_at AS at FROM schedules_scheduledrun r
                      WHERE r.schedule_id = c.id AND r.status = 'succeeded'
                      ORDER BY r.scheduled_for DESC LIMIT 1) AS l ON true
"""
PER_SCHEDULE_HEADER = {
    "cb_schedule_next_run_timestamp_seconds": "When the schedule's next slot is due (enabled schedules).",
    "cb_schedule_last_success_timestamp_seconds": "When the schedule's last successful run finished.",
}


def _rows(sql: str, params: dict | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


class _Histogram:
    """Observations counted by bucket bound (`le`: the smallest bound each fits, Infinity above the
    last, None for none), rendered cumulative as Prometheus wants."""

    def __init__(self) -> None:
        self.counts: dict[float, int] = {}
        self.sum = 0.0

    def add(self, le: float | None, count: int, seconds: float) -> None:
        if le is not None:
            self.counts[le] = self.counts.get(le, 0) + int(count)
            self.sum += float(seconds)

    def buckets(self, bounds: tuple[float, ...]) -> list[tuple[str, int]]:
        cumulative = [(repr(float(b)), sum(n for le, n in self.counts.items() if le <= b)) for b in bounds]
        return [*cumulative, ("+Inf", sum(self.counts.values()))]


def compact_totals(*, budget_seconds: float = 5.0) -> int:
    """Fold the totals' rows into one per key (COMPACT_SQL), batch after batch while a batch is full
    and the budget lasts. Returns the rows folded away."""
    deadline = time.monotonic() + budget_seconds
    removed = 0
    for table, (keys, values) in COMPACT_TABLES.items():
        sql = COMPACT_SQL.format(
            table=table,
            keys=", ".join(keys),
            values=", ".join(values),
            sums=", ".join(f"sum({v})" for v in values),
        )
        while True:
            with transaction.atomic():
                if not _rows("SELECT pg_try_advisory_xact_lock(%(lock)s)", {"lock": COMPACT_LOCK})[0][0]:
                    return removed  # another process is compacting
                moved, folded = _rows(sql, {"limit": COMPACT_BATCH})[0]
            removed += moved - folded
            if moved < COMPACT_BATCH or time.monotonic() > deadline:
                break
    return removed


def prune_slot_counts(*, budget_seconds: float = 5.0) -> int:
    """Delete the calendar's slot counts (monitoring_slotcount) of quarter hours older than
    HISTORY_KEEP_DAYS, batch after batch while a batch is full and the budget lasts; none when it is 0
    (history kept for ever). Returns the rows deleted."""
    keep = retention.keep_seconds()
    if keep is None:
        return 0
    deadline = time.monotonic() + budget_seconds
    deleted = 0
    while True:
        with connection.cursor() as cursor:
            cursor.execute(PRUNE_SLOT_COUNTS_SQL, {"keep": keep, "limit": COMPACT_BATCH})
            deleted += cursor.rowcount
        if cursor.rowcount < COMPACT_BATCH or time.monotonic() > deadline:
            return deleted


def per_schedule_limit(value: str) -> int | None:
    """METRICS_PER_SCHEDULE as a row limit: `top:N` -> N, `all` -> None (no limit), `none` -> 0."""
    text = value.strip().lower()
    if text in {"all", "none"}:
        return None if text == "all" else 0
    prefix, _, count = text.partition(":")
    if prefix == "top" and count.isdigit():
        return int(count)
    raise ImproperlyConfigured(f"METRICS_PER_SCHEDULE must be top:N, all or none, not {value!r}")


class DatabaseCollector:
    """Every aggregate series, read from PostgreSQL and Redis when Prometheus scrapes."""

    def collect(self) -> Iterator:
        yield from self._runs()
        yield from self._slots()
        yield from self._scheduler()

    def describe(self) -> list:
        return []  # computed at scrape time; nothing to register ahead

    def _runs(self) -> Iterator:
        runs = CounterMetricFamily(
            "cb_runs", "Finished runs by job, trigger and status.", labels=["job", "trigger", "status"]
        )
        counted: dict[tuple[str, str, str], int] = {}
        durations: dict[str, _Histogram] = {}
        for job, trigger, status, le, count, seconds in _rows(RUN_TOTALS_SQL):
            counted[(job, trigger, status)] = counted.get((job, trigger, status), 0) + int(count)
            durations.setdefault(job, _Histogram()).add(le, count, seconds)
        for labels, count in sorted(counted.items()):
            runs.add_metric(list(labels), count)
        yield runs
        duration = HistogramMetricFamily(
            "cb_run_duration_seconds", "Run duration, start to finish (finished runs).", labels=["job"]
        )
        for job, histogram in sorted(durations.items()):
            if histogram.counts:  # jobs with a run that started and finished
                duration.add_metric([job], histogram.buckets(DURATION_BUCKETS), histogram.sum)
        yield duration
        waiting = GaugeMetricFamily(
            "cb_runs_waiting", "Runs waiting for a concurrency slot now.", labels=["job"]
        )
        for job, count in _rows(WAITING_SQL):
            waiting.add_metric([job], count)
        yield waiting
        retrying = GaugeMetricFamily(
            "cb_runs_waiting_to_retry",
            "Runs whose attempt failed, waiting for the backoff before their next one (retry_policy).",
            labels=["job"],
        )
        for job, count in _rows(RETRY_WAITING_SQL):
            retrying.add_metric([job], count)
        yield retrying

    def _slots(self) -> Iterator:
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        dispatch, start = _Histogram(), _Histogram()
        for status, reason, dispatch_le, start_le, count, dispatch_s, start_s in _rows(SLOT_TOTALS_SQL):
            if status == "skipped":
                skipped[reason] = skipped.get(reason, 0) + int(count)
            dispatch.add(dispatch_le, count, dispatch_s)
            start.add(start_le, count, start_s)
        family = CounterMetricFamily(
            "cb_slots_skipped", "Slots recorded as skipped, by reason.", labels=["reason"]
        )
        for reason, count in skipped.items():
            family.add_metric([reason], count)
        yield family
        for name, doc, histogram in (
            ("cb_dispatch_lag_seconds", "Slot time to hand-over to the broker (scheduled runs).", dispatch),
            ("cb_start_lag_seconds", "Hand-over to the broker to the run's start.", start),
        ):
            family = HistogramMetricFamily(name, f"{doc} Counted when the slot is settled.")
            family.add_metric([], histogram.buckets(LAG_BUCKETS), histogram.sum)
            yield family

    def _scheduler(self) -> Iterator:
        from orchestrator.models import Job

        client = redis_client()
        jobs = list(Job.objects.values_list("key", "max_concurrency"))
        rated = list(Job.objects.exclude(rate_limit=None).values_list("key", "rate_limit"))
        scopes = [GLOBAL_SCOPE] + [job_scope(key) for key, _ in jobs]
        with client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hgetall(SCHEDULER_COUNTERS_KEY)
            pipe.hgetall(LIMITED_KEY)
            for key, _ in rated:
                pipe.zcard(waiters_key(key))
            results = pipe.execute()
        (seconds, micros), counters, limited, *rate_waiting = results
        now_ms = seconds * 1000 + micros // 1000
        with client.pipeline(transaction=False) as pipe:
            pipe.zcount(SCHEDULER_INSTANCES_KEY, seconds, "+inf")
            for scope in scopes:
                pipe.zcount(holders_key(scope), f"({now_ms}", "+inf")  # leases not yet expired
            instances, *in_use = pipe.execute()
        counters = {k.decode(): int(v) for k, v in counters.items()}
        yield CounterMetricFamily(
            "cb_scheduler_ticks", "Scheduler passes, all instances.", value=counters.get("ticks", 0)
        )
        yield CounterMetricFamily(
            "cb_scheduler_claims",
            "Schedules claimed by scheduler passes, all instances.",
            value=counters.get("claimed", 0),
        )
        yield CounterMetricFamily(
            "cb_schedules_paused_after_failures",
            "Schedules the scheduler disabled after pause_after_failures consecutive failed slots.",
            value=counters.get("paused", 0),
        )
        yield GaugeMetricFamily(
            "cb_scheduler_instances", "Scheduler instances that completed a pass recently.", value=instances
        )
        used = GaugeMetricFamily("cb_cap_in_use", "Concurrency slots held now (live leases).", labels=["cap"])
        for scope, count in zip(scopes, in_use, strict=True):
            used.add_metric([scope], count)
        yield used
        limit = GaugeMetricFamily("cb_cap_limit", "Configured concurrency limits.", labels=["cap"])
        if settings.SCHEDULER_MAX_GLOBAL:
            limit.add_metric([GLOBAL_SCOPE], settings.SCHEDULER_MAX_GLOBAL)
        for key, max_concurrency in jobs:
            if max_concurrency:
                limit.add_metric([job_scope(key)], max_concurrency)
        yield limit
        yield from _rate_limits(rated, limited, rate_waiting)


def _rate_limits(rated: list[tuple[str, str]], limited: dict, waiting: list[int]) -> Iterator:
    """Rate limits (worker/ratelimit.py): runs that waited behind one (counted in Redis as they join
    the line; a Redis that lost its data starts again from 0, which Prometheus reads as a reset), and
    how many wait now."""
    counts = {key.decode(): int(value) for key, value in limited.items()}
    total = CounterMetricFamily(
        "cb_rate_limited", "Runs that waited as throttled behind their job's rate limit.", labels=["job"]
    )
    now = GaugeMetricFamily(
        "cb_rate_limit_waiting", "Runs waiting for their job's rate limit now.", labels=["job"]
    )
    for (key, _), count in zip(rated, waiting, strict=True):
        total.add_metric([key], counts.get(key, 0))
        now.add_metric([key], count)
    yield total
    yield now


_redis: redis.Redis | None = None


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redisconn.client(socket_timeout=2, socket_connect_timeout=2)
    return _redis


def render() -> bytes:
    """The whole exposition: the aggregate families, then the per-schedule ones from PostgreSQL.
    The totals are compacted first, so what is read is one row per key plus a build's worth of new rows."""
    limit = per_schedule_limit(settings.METRICS_PER_SCHEDULE)
    compact_totals()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    parts = [generate_latest(registry)]
    next_runs, last_successes = ("", "") if limit == 0 else _rows(PER_SCHEDULE_SQL, {"limit": limit})[0]
    for (name, doc), body in zip(PER_SCHEDULE_HEADER.items(), (next_runs, last_successes), strict=True):
        parts.append(f"# HELP {name} {doc}\n# TYPE {name} gauge\n".encode())
        if body:
            parts.append(body.encode() + b"\n")
    return b"".join(parts)


# --- serving: the exposition is built at most every METRICS_MAX_AGE_SECONDS -----------------------------

# At 100,000 schedules and their history, building the exposition reads every run row and renders
# ~200,000 per-schedule samples: about a second of database time (docs/BENCHMARKS.md). A scrape must
# not wait for that, so scrapes are served from the last build, kept in Redis (one copy for every web
# process), and a scrape that finds it older than METRICS_MAX_AGE_SECONDS starts a rebuild in the
# background; a Redis lock makes it one rebuild at a time across processes. Values are thus at most
# one max-age plus one build old. METRICS_MAX_AGE_SECONDS=0 builds on every scrape (small installs, tests).
EXPOSITION_KEY = "cb:metrics:exposition"  # hash: built_at (unix s), body
REFRESH_LOCK_KEY = "cb:metrics:refresh-lock"
REFRESH_LOCK_SECONDS = 120


def exposition() -> bytes:
    """What GET /metrics answers, gzip-compressed: a fresh build, or the cached one (rebuilt in the
    background when older than METRICS_MAX_AGE_SECONDS). Compressed once per build, not per scrape:
    at 100,000 schedules the text is ~15 MB and ~1 MB gzipped, which is what Redis and the wire carry."""
    max_age = float(settings.METRICS_MAX_AGE_SECONDS)
    if max_age <= 0:
        return gzip.compress(render(), compresslevel=1)
    client = redis_client()
    built_at, body = client.hmget(EXPOSITION_KEY, ["built_at", "body"])
    if body is None:
        # First scrape (or Redis emptied): build now.
        return rebuild(client) or gzip.compress(render(), compresslevel=1)
    if time.time() - float(built_at) > max_age:
        threading.Thread(target=_rebuild_in_background, name="metrics-rebuild", daemon=True).start()
    return body


def rebuild(client: redis.Redis) -> bytes | None:
    """Build, compress and store the exposition, unless another process is building it (then None)."""
    if not client.set(REFRESH_LOCK_KEY, os.getpid(), nx=True, ex=REFRESH_LOCK_SECONDS):
        return None
    try:
        body = gzip.compress(render(), compresslevel=1)
        ttl = int(max(600, 10 * float(settings.METRICS_MAX_AGE_SECONDS)))
        with client.pipeline() as pipe:
            pipe.hset(EXPOSITION_KEY, mapping={"built_at": time.time(), "body": body})
            pipe.expire(EXPOSITION_KEY, ttl)
            pipe.execute()
        return body
    finally:
        client.delete(REFRESH_LOCK_KEY)


def _rebuild_in_background() -> None:
    try:
        rebuild(redis_client())
    except Exception as exc:
        logger.warning("metrics rebuild failed", extra={"error": type(exc).__name__})
    finally:
        connection.close()  # this thread's own connection


def record_scheduler_pass(*, claimant: str, claimed: int, alive_for: float) -> None:
    """Called by each scheduler pass: count it, and mark the instance alive for `alive_for` seconds."""
    client = redis_client()
    with client.pipeline(transaction=False) as pipe:
        pipe.hincrby(SCHEDULER_COUNTERS_KEY, "ticks", 1)
        if claimed:
            pipe.hincrby(SCHEDULER_COUNTERS_KEY, "claimed", claimed)
        pipe.zadd(SCHEDULER_INSTANCES_KEY, {claimant: time.time() + alive_for})
        # Instances gone for a day drop out, so the set stays the size of the fleet.
        pipe.zremrangebyscore(SCHEDULER_INSTANCES_KEY, "-inf", time.time() - 86400)
        pipe.execute()
    compact_totals_if_due()


def count_pauses(paused: int) -> None:
    """Count schedules paused after failures (called once their pause committed); never raises: a
    metric must not undo or fail a pause."""
    try:
        redis_client().hincrby(SCHEDULER_COUNTERS_KEY, "paused", paused)
    except Exception as exc:
        logger.warning("pause not counted", extra={"error": type(exc).__name__})


_next_compaction = 0.0


def compact_totals_if_due() -> None:
    """Every COMPACT_EVERY_SECONDS, from the scheduler's pass: the totals stay one row per key even
    when nobody scrapes /metrics (each finished run adds a row until folded). Never raises."""
    global _next_compaction
    now = time.monotonic()
    if now < _next_compaction:
        return
    _next_compaction = now + COMPACT_EVERY_SECONDS
    try:
        compact_totals(budget_seconds=1.0)
        prune_slot_counts(budget_seconds=1.0)
    except Exception as exc:
        logger.warning("metrics totals not compacted", extra={"error": type(exc).__name__})
