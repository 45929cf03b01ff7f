"""Prometheus metrics, computed at scrape time from PostgreSQL and Redis (GET /metrics).

Why at scrape time, and not prometheus-client's multiprocess mode: the facts live in the database
already (every run's status, timings and trigger; every slot skipped and why; each schedule's next run),
written by whichever of many scheduler, worker and web processes did the work. Counting them where they
are is correct whatever number of processes run, restart or die (multiprocess mode loses a killed
process's counts unless its files are swept correctly, and needs a shared directory on one host), and it
costs the run path nothing. The few facts only a scheduler process knows (its ticks and claims, that it
is alive) it records in Redis (record_scheduler_pass), read here as well.

Counters derived from history (`cb_runs_total`, `cb_slots_skipped_total`, the histograms) go down when
retention prunes old rows: Prometheus reads a decrease as a counter reset, so rate() stays right.
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
from django.db import connection
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from worker.semaphore import GLOBAL_SCOPE, holders_key, job_scope

logger = logging.getLogger(__name__)

# Redis keys the scheduler writes (monitoring.scheduler.after_pass).
SCHEDULER_COUNTERS_KEY = "cb:metrics:scheduler"  # hash: ticks, claimed
SCHEDULER_INSTANCES_KEY = "cb:metrics:scheduler-instances"  # zset: claimant -> unix seconds it is alive until

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

# The reason label of a skipped slot, from the reason text schedules/dispatch.py records.
SKIP_REASONS_SQL = """
CASE WHEN error_summary LIKE 'missed%%' THEN 'missed'
     WHEN error_summary LIKE '%%(overlap_policy skip)' THEN 'overlap_skip'
     WHEN error_summary LIKE '%%(overlap_policy buffer_one)' THEN 'overlap_buffer'
     WHEN error_summary = 'job disabled' THEN 'job_disabled'
     ELSE 'other' END
"""


def _bucket_counts(column: str, buckets: tuple[float, ...]) -> str:
    """The count at or under each bucket bound, the count and the sum of `column` (NULL: not counted),
    as one SELECT list, so several histograms come from one pass over a table. `column` is computed
    once per row in a subquery: repeating the expression in each FILTER costs more than the scan."""
    filters = ", ".join(f"count(*) FILTER (WHERE {column} <= {float(b)!r})" for b in buckets)
    return f"{filters}, count({column}), coalesce(sum({column}), 0)"


# One pass over the runs: counts by (job, trigger, status) and, in the same rows, the duration buckets
# (summed per job in Python). History tables are read once each per build.
RUNS_SQL = f"""
SELECT key, trigger, status, count(*), {_bucket_counts("d", DURATION_BUCKETS)}
  FROM (SELECT j.key, r.trigger, r.status, extract(epoch FROM r.finished_at - r.started_at) AS d
          FROM orchestrator_run r JOIN orchestrator_job j ON j.id = r.job_id) AS t
 GROUP BY 1, 2, 3
"""

# Every job, 0 when none waits: a gauge that disappears reads as "no data", not "none waiting".
WAITING_SQL = """
SELECT j.key, count(r.id)
  FROM orchestrator_job j
  LEFT JOIN orchestrator_run r
    ON r.job_id = j.id AND r.status = 'queued' AND r.waiting_since IS NOT NULL
 GROUP BY 1
"""
SKIP_REASONS = ("missed", "overlap_skip", "overlap_buffer", "job_disabled", "other")

SKIPPED_SQL = f"""
SELECT {SKIP_REASONS_SQL} AS reason, count(*)
  FROM schedules_scheduledrun WHERE status = 'skipped' GROUP BY 1
"""


# One pass over the scheduled runs: slot to hand-over (scheduled slots only: a run-now has no slot to be
# late for), and hand-over to start (for a run that waited for a slot, from its last wake-up).
LAGS_SQL = f"""
SELECT {_bucket_counts("dispatch", LAG_BUCKETS)}, {_bucket_counts("start", LAG_BUCKETS)}
  FROM (SELECT CASE WHEN trigger = 'schedule' AND run_id IS NOT NULL AND published_at IS NOT NULL
                    THEN greatest(0, extract(epoch FROM published_at - scheduled_for)) END AS dispatch,
               -- greatest() ignores NULLs: a run not started (or never published) has no start lag.
               CASE WHEN started_at IS NOT NULL AND published_at IS NOT NULL
                    THEN greatest(0, extract(epoch FROM started_at - published_at)) END AS start
          FROM schedules_scheduledrun) AS t
"""

# Per-schedule series, rendered in exposition format by PostgreSQL itself: at 100,000 schedules,
# building 200,000 samples as Python objects would cost most of the scrape budget on its own.
_LABEL = "replace(replace(replace(s.name, E'\\\\', E'\\\\\\\\'), '\"', E'\\\\\"'), E'\\n', E'\\\\n')"
PER_SCHEDULE_SQL = f"""
SELECT coalesce(string_agg(
         'cb_schedule_next_run_timestamp_seconds{{schedule="' || {_LABEL} || '"}} '
         || extract(epoch FROM s.next_run_at)::numeric(20, 3)::text, E'\\n'
         ORDER BY s.id) FILTER (WHERE s.enabled AND s.next_run_at IS NOT NULL), ''),
       coalesce(string_agg(
         'cb_schedule_last_success_timestamp_seconds{{schedule="' || {_LABEL} || '"}} '
         || extract(epoch FROM l.at)::numeric(20, 3)::text, E'\\n'
         ORDER BY s.id) FILTER (WHERE l.at IS NOT NULL), '')
  FROM schedules_schedule s
  LEFT JOIN (SELECT schedule_id, max(finished_at) AS at FROM schedules_scheduledrun
              WHERE status = 'succeeded' GROUP BY schedule_id) AS l ON l.schedule_id = s.id
"""
PER_SCHEDULE_HEADER = {
    "cb_schedule_next_run_timestamp_seconds": "When the schedule's next slot is due (enabled schedules).",
    "cb_schedule_last_success_timestamp_seconds": "When the schedule's last successful run finished.",
}


def _rows(sql: str) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _histogram(row: tuple, buckets: tuple[float, ...]) -> tuple[list[tuple[str, int]], float]:
    """(bucket bound, cumulative count) pairs and the sum, from the columns of _bucket_counts."""
    counts, total, summed = row[: len(buckets)], row[len(buckets)], row[len(buckets) + 1]
    pairs = [(repr(float(b)), int(c)) for b, c in zip(buckets, counts, strict=True)] + [("+Inf", int(total))]
    return pairs, float(summed)


class DatabaseCollector:
    """Every aggregate series, read from PostgreSQL and Redis when Prometheus scrapes."""

    def collect(self) -> Iterator:
        yield from self._runs()
        yield from self._lags()
        yield from self._scheduler()

    def describe(self) -> list:
        return []  # computed at scrape time; nothing to register ahead

    def _runs(self) -> Iterator:
        runs = CounterMetricFamily(
            "cb_runs", "Runs by job, trigger and status.", labels=["job", "trigger", "status"]
        )
        per_job: dict[str, list[float]] = {}
        for job, trigger, status, count, *histogram in _rows(RUNS_SQL):
            runs.add_metric([job, trigger, status], count)
            totals = per_job.setdefault(job, [0.0] * len(histogram))
            for i, value in enumerate(histogram):
                totals[i] += float(value)
        yield runs
        duration = HistogramMetricFamily(
            "cb_run_duration_seconds", "Run duration, start to finish (finished runs).", labels=["job"]
        )
        for job, totals in sorted(per_job.items()):
            if totals[len(DURATION_BUCKETS)]:  # jobs with a finished run
                pairs, summed = _histogram(totals, DURATION_BUCKETS)
                duration.add_metric([job], pairs, summed)
        yield duration
        waiting = GaugeMetricFamily(
            "cb_runs_waiting", "Runs waiting for a concurrency slot now.", labels=["job"]
        )
        for job, count in _rows(WAITING_SQL):
            waiting.add_metric([job], count)
        yield waiting
        skipped = CounterMetricFamily(
            "cb_slots_skipped", "Slots recorded as skipped, by reason.", labels=["reason"]
        )
        counted = dict(_rows(SKIPPED_SQL))
        for reason in SKIP_REASONS:
            skipped.add_metric([reason], counted.get(reason, 0))
        yield skipped

    def _lags(self) -> Iterator:
        row = _rows(LAGS_SQL)[0]
        width = len(LAG_BUCKETS) + 2
        for index, (name, doc) in enumerate(
            (
                ("cb_dispatch_lag_seconds", "Slot time to hand-over to the broker (scheduled runs)."),
                ("cb_start_lag_seconds", "Hand-over to the broker to the run's start."),
            )
        ):
            family = HistogramMetricFamily(name, doc)
            pairs, summed = _histogram(row[index * width : (index + 1) * width], LAG_BUCKETS)
            family.add_metric([], pairs, summed)
            yield family

    def _scheduler(self) -> Iterator:
        from orchestrator.models import Job

        client = redis_client()
        jobs = list(Job.objects.values_list("key", "max_concurrency"))
        scopes = [GLOBAL_SCOPE] + [job_scope(key) for key, _ in jobs]
        with client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hgetall(SCHEDULER_COUNTERS_KEY)
            results = pipe.execute()
        (seconds, micros), counters = results
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


_redis: redis.Redis | None = None


def redis_client() -> redis.Redis:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    return _redis


def render() -> bytes:
    """The whole exposition: the aggregate families, then the per-schedule ones from PostgreSQL."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    parts = [generate_latest(registry)]
    next_runs, last_successes = _rows(PER_SCHEDULE_SQL)[0]
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
