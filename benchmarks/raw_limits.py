"""The machine's raw limits and the worker path's figures, the yardsticks for everything else.

    python -m benchmarks.raw_limits all            # every figure below, JSON lines
    python -m benchmarks.raw_limits publish --n 10000

- publish: Celery `send_task` messages per second to Redis from one process on one connection, the floor
  under any scheduler's publish time (the same call django-celery-beat makes per entry);
- claim: rows per second that the SKIP LOCKED claim statement (schedules.claiming.claim_due) takes,
  batch by batch, from 100,000 due schedules;
- semaphore: acquire plus release per second of a global and a per-job cap (worker.semaphore), one
  Lua call each;
- runs: runs per second end to end (launch, publish, worker start, three task processes, finish) with one
  worker of 2 pool processes, for the `sleep` job with 0 seconds;
- run-now: run-now to task start latency (ScheduledRun.started_at - created_at) on an idle worker.

Uses its own database (cb_bench_raw, re-created) and Redis database 12 unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import redis

from benchmarks.common import PYTHON, ROOT, bench_env, manage, percentile, recreate_database, stop

DB = "cb_bench_raw"
SETTINGS = "benchmarks.bench_settings"


def _setup(redis_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ["BENCH_DB"] = DB
    os.environ["REDIS_URL"] = redis_url
    os.environ["CELERY_BROKER_URL"] = redis_url
    os.environ["LOG_LEVEL"] = "WARNING"
    import django

    django.setup()


def publish_rate(n: int, redis_url: str) -> dict:
    from project.celery import app

    queue = "bench.raw"
    client = redis.Redis.from_url(redis_url)
    client.delete(queue)
    with app.producer_or_acquire() as producer:
        app.send_task("bench.noop", kwargs={"i": -1}, queue=queue, producer=producer)  # warm the connection
        start = time.perf_counter()
        for i in range(n):
            app.send_task(
                "bench.noop",
                kwargs={"run_id": i, "scheduled_run_id": i, "job_key": "sleep"},
                task_id=str(uuid.uuid4()),
                queue=queue,
                producer=producer,
            )
        seconds = time.perf_counter() - start
    published = client.llen(queue) - 1
    client.delete(queue)
    return {
        "limit": "celery publish",
        "n": n,
        "seconds": round(seconds, 3),
        "per_second": round(n / seconds),
        "published": published,
    }


def claim_rate(n: int) -> dict:
    from django.db import connection

    from schedules.claiming import claim_due

    with connection.cursor() as cur:
        cur.execute("TRUNCATE schedules_scheduledrun, orchestrator_run, schedules_schedule CASCADE")
        cur.execute(
            """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled, schedule_type,
                   interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy,
                   next_run_at, claimed_by, created_at, updated_at)
               SELECT 'raw-' || g, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '', true,
                      'interval', 60, '', 'UTC', 'allowlist', 'run_once', 'allow',
                      now() - interval '1 minute', '', now(), now()
                 FROM generate_series(1, %s) g""",
            [n],
        )
        cur.execute("VACUUM ANALYZE schedules_schedule")
    claimed, start = 0, time.perf_counter()
    while True:
        batch = claim_due(claimant="raw", ttl=600, limit=500)
        if not batch:
            break
        claimed += len(batch)
    seconds = time.perf_counter() - start
    with connection.cursor() as cur:
        cur.execute("TRUNCATE schedules_schedule CASCADE")
    return {
        "limit": "claim statement",
        "rows": claimed,
        "seconds": round(seconds, 3),
        "rows_per_second": round(claimed / seconds),
    }


def semaphore_rate(n: int) -> dict:
    from django.utils import timezone

    from worker.semaphore import (
        Cap,
        semaphore_acquire,
        semaphore_client,
        semaphore_release,
    )

    semaphore_client().flushdb()  # nothing runs: floor 0, the first acquire starts the grant counter
    caps = [Cap("global", 1000, "global cap"), Cap("job:sleep", 1000, "per-job cap", "sleep")]
    due = timezone.now()
    timings = []
    for i in range(n):
        owner = f"raw-{i}"
        started = time.perf_counter()
        grant = semaphore_acquire(caps, owner=owner, waiter=owner, due=due, run_id=i, floor=0)
        semaphore_release(caps, owner=owner, run_id=i)
        timings.append(time.perf_counter() - started)
        assert grant.acquired, grant.reason
    total = sum(timings)
    return {
        "limit": "semaphore acquire+release",
        "n": n,
        "per_second": round(n / total),
        "p50_ms": round(statistics.median(timings) * 1000, 3),
        "p99_ms": round(percentile(timings, 99) * 1000, 3),
    }


def _start_worker(redis_url: str) -> subprocess.Popen:
    env = bench_env(SETTINGS, redis_url, BENCH_DB=DB, BENCH_STATEMENTS_FILE="")
    return subprocess.Popen(
        [
            PYTHON,
            "manage.py",
            "run_worker",
            "--concurrency",
            "2",
            "--loglevel",
            "WARNING",
            "--hostname",
            "raw@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.02)


def worker_figures(runs: int, latency_samples: int, redis_url: str) -> list[dict]:
    from orchestrator.models import Job, Run
    from schedules.dispatch import run_now
    from schedules.models import Schedule, ScheduledRun
    from schedules.services import launch_run_manually

    redis.Redis.from_url(redis_url).flushdb()
    job = Job.objects.get(key="sleep")
    Schedule.objects.all().delete()
    Run.objects.all().delete()
    schedule = Schedule.objects.create(
        name="raw-run-now", job=job, schedule_type="interval", interval_minutes=60, custom_directive_text="0",
        enabled=False, overlap_policy="allow",
    )  # fmt: skip
    worker = _start_worker(redis_url)
    try:
        # Warm: the worker is up once a first run has finished.
        warm = launch_run_manually(job=job, custom_directive_text="0", task3_scope="allowlist")
        _wait(lambda: Run.objects.get(pk=warm.pk).status == "succeeded", 180)

        latencies = []
        for _ in range(latency_samples):
            scheduled = run_now(schedule)
            _wait(
                lambda s=scheduled: ScheduledRun.objects.get(pk=s.pk).status in {"succeeded", "failed"}, 120
            )
            row = ScheduledRun.objects.get(pk=scheduled.pk)
            latencies.append((row.started_at - row.created_at).total_seconds())

        start = time.perf_counter()
        ids = [
            launch_run_manually(job=job, custom_directive_text="0", task3_scope="allowlist").pk
            for _ in range(runs)
        ]
        _wait(lambda: Run.objects.filter(pk__in=ids, status__in=["succeeded", "failed"]).count() == runs, 900)
        seconds = time.perf_counter() - start
        failed = Run.objects.filter(pk__in=ids, status="failed").count()
    finally:
        stop(worker, timeout=60)
    return [
        {
            "figure": "run-now to task start",
            "samples": len(latencies),
            "p50_ms": round(statistics.median(latencies) * 1000, 1),
            "p99_ms": round(percentile(latencies, 99) * 1000, 1),
        },
        {
            "limit": "no-op runs end to end (1 worker x 2 processes)",
            "runs": runs,
            "seconds": round(seconds, 2),
            "per_second": round(runs / seconds, 2),
            "failed": failed,
        },
    ]


def prepare(redis_url: str) -> None:
    recreate_database(DB)
    manage(bench_env(SETTINGS, redis_url, BENCH_DB=DB), "migrate", "--verbosity", "0")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["all", "publish", "claim", "semaphore", "worker"])
    parser.add_argument("--n", type=int, default=10000, help="messages to publish")
    parser.add_argument("--claim-rows", type=int, default=100_000)
    parser.add_argument("--semaphore-ops", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--latency-samples", type=int, default=10)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    args = parser.parse_args(argv)
    prepare(args.redis_url)
    _setup(args.redis_url)
    results = []
    if args.what in {"all", "publish"}:
        results.append(publish_rate(args.n, args.redis_url))
    if args.what in {"all", "claim"}:
        results.append(claim_rate(args.claim_rows))
    if args.what in {"all", "semaphore"}:
        results.append(semaphore_rate(args.semaphore_ops))
    if args.what in {"all", "worker"}:
        results.extend(worker_figures(args.runs, args.latency_samples, args.redis_url))
    for result in results:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
