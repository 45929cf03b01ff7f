"""The incumbent: django-celery-beat 2.x's DatabaseScheduler on the same workload as ours.

N `PeriodicTask`s on one hourly `IntervalSchedule`, all due now, published to the same Redis as ours
(its own database and its own queue). Reports the same figures as benchmarks/dispatch.py.

    python -m benchmarks.celery_beat_baseline --n 1000 --instances 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.common import (
    PYTHON,
    ROOT,
    bench_env,
    manage,
    percentile,
    proc_stats,
    read_statements,
    recreate_database,
    stop,
    trace_queue,
)

QUEUE = "bench.dcb"
SETTINGS = "benchmarks.dcb_settings"
DB = os.environ.get("BENCH_DCB_DB", "cb_bench_dcb")


def _setup_django():
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ.setdefault("BENCH_DCB_DB", DB)
    import django

    django.setup()


def seed(n: int, *, due: bool) -> None:
    """(In a child process) N periodic tasks on an hourly interval, due now or not for an hour."""
    _setup_django()
    from django.utils import timezone
    from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

    PeriodicTask.objects.all().delete()
    every_hour, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
    last = timezone.now() - timezone.timedelta(hours=2) if due else timezone.now()
    batch = [
        PeriodicTask(
            name=f"bench-{i}",
            task="bench.noop",
            interval=every_hour,
            queue=QUEUE,
            enabled=True,
            last_run_at=last,
            start_time=None,
        )
        for i in range(n)
    ]
    PeriodicTask.objects.bulk_create(batch, batch_size=5000)
    PeriodicTasks.update_changed()


def _connections(db: str) -> int:
    import psycopg2

    from benchmarks.common import admin_dsn

    conn = psycopg2.connect(**admin_dsn())
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [db])
        (count,) = cur.fetchone()
    conn.close()
    return count


def run_dispatch(n: int, instances: int, redis_url: str) -> dict:
    """Start `instances` beat processes, then make N tasks due at once; measure until all are queued.

    As for ours, the clock starts when the tasks become due, with the schedulers already running, so
    neither side's figure includes interpreter start-up.
    """
    env = bench_env(SETTINGS, redis_url, BENCH_DCB_DB=DB)
    client = redis.Redis.from_url(redis_url)
    client.delete(QUEUE)
    seed_cmd = [PYTHON, "-m", "benchmarks.celery_beat_baseline", "--seed"]
    subprocess.run([*seed_cmd, "0"], env=env, cwd=ROOT, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="dcb-"))
    procs = []
    for i in range(instances):
        procs.append(
            subprocess.Popen(
                [
                    PYTHON, "-m", "celery", "-A", "project", "beat",
                    "-S", "django_celery_beat.schedulers:DatabaseScheduler",
                    "--max-interval", "1", "--pidfile=", "-l", "warning",
                ],
                env={**env, "BENCH_STATEMENTS_FILE": str(tmp / f"statements-{i}.json")},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"beat-{i}.log", "w"),
            )
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _connections(DB) < instances:
            if time.monotonic() > deadline:
                raise RuntimeError("celery beat did not connect")
            time.sleep(0.2)
        time.sleep(3)  # let each beat finish its first tick on the empty table
        subprocess.run([*seed_cmd, str(n), "--due"], env=env, cwd=ROOT, check=True)
        due_at = time.monotonic()
        trace = trace_queue(client, QUEUE, expected=n, settle=5.0, timeout=900)
        stats = [proc_stats(p.pid) for p in procs]
    finally:
        for proc in procs:
            stop(proc)
    statements = [read_statements(tmp / f"statements-{i}.json") for i in range(instances)]
    published = client.llen(QUEUE)
    client.delete(QUEUE)
    offset = trace.start - due_at
    arrivals = [t + offset for t in trace.arrival_times(n)]
    reached = trace.time_to_reach(n)
    total_statements = sum(s for s in statements if s is not None)
    return {
        "scheduler": "django-celery-beat",
        "n": n,
        "instances": instances,
        "seconds_to_all": None if reached is None else round(reached + offset, 3),
        "lag_p50": percentile(arrivals, 50),
        "lag_p99": percentile(arrivals, 99),
        "cpu_seconds": round(sum(s.cpu_seconds for s in stats), 2),
        "peak_rss_mb": round(max(s.peak_rss_mb for s in stats), 1),
        "statements_per_slot": round(total_statements / n, 2) if total_statements else None,
        "published": published,
        "duplicates": max(0, published - n),
    }


def idle_tick(n: int) -> dict:
    """(In a child process) one beat tick with N tasks, none due: seconds and statements."""
    _setup_django()
    from celery import current_app
    from django.db import connection
    from django_celery_beat.schedulers import DatabaseScheduler

    from benchmarks.common import proc_stats

    scheduler = DatabaseScheduler(app=current_app, lazy=False)
    scheduler.tick()  # warm: first load of all entries
    counted: list[str] = []

    def count(execute, sql, params, many, context):
        counted.append(sql)
        return execute(sql, params, many, context)

    ticks = 5
    with connection.execute_wrapper(count):
        start = time.perf_counter()
        for _ in range(ticks):
            scheduler.tick()
        seconds = (time.perf_counter() - start) / ticks
    return {
        "scheduler": "django-celery-beat",
        "n": n,
        "tick_ms": round(seconds * 1000, 3),
        "statements_per_tick": len(counted) / ticks,
        "peak_rss_mb": round(proc_stats(os.getpid()).peak_rss_mb, 1),
    }


def run_idle(n: int, redis_url: str) -> dict:
    env = bench_env(SETTINGS, redis_url, BENCH_DCB_DB=DB)
    subprocess.run(
        [PYTHON, "-m", "benchmarks.celery_beat_baseline", "--seed", str(n)], env=env, cwd=ROOT, check=True
    )
    out = subprocess.run(
        [PYTHON, "-m", "benchmarks.celery_beat_baseline", "--idle-child", str(n)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def prepare(redis_url: str) -> None:
    recreate_database(DB)
    manage(bench_env(SETTINGS, redis_url, BENCH_DCB_DB=DB), "migrate", "--verbosity", "0")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"))
    parser.add_argument("--idle", action="store_true", help="measure an idle tick instead of dispatch")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--due", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--idle-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed is not None:
        seed(args.seed, due=args.due)
        return
    if args.idle_child is not None:
        print(json.dumps(idle_tick(args.idle_child)))
        return
    prepare(args.redis_url)
    result = (
        run_idle(args.n, args.redis_url)
        if args.idle
        else run_dispatch(args.n, args.instances, args.redis_url)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
