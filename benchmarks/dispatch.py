"""Dispatch benchmark (issue 3 item 7): N schedules due at the same instant, 1 and 2 scheduler instances.

Reports, per scenario: seconds from the due instant until every run message is published, publish lag
(published_at - scheduled_for) p50/p99, duplicate slots (must be 0) and duplicate broker messages; then
the idle tick (one scheduler pass with nothing due) at 1,000 / 10,000 / 100,000 schedules.

Uses its own database (default cb_bench, dropped and re-created) and the Redis in REDIS_URL:

    REDIS_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m benchmarks.dispatch
    .venv/bin/python -m benchmarks.dispatch --sizes 1000 --instances 1 --idle-sizes 1000   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import redis

from benchmarks.common import proc_stats, read_statements

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
QUEUE = "jobs.sleep"


def pg_params(dbname: str) -> dict:
    return {
        "host": os.environ.get("POSTGRES_HOST", "127.0.0.1"),
        "port": os.environ.get("POSTGRES_PORT", "5432"),
        "user": os.environ.get("POSTGRES_USER", "postgres"),
        "password": os.environ.get("POSTGRES_PASSWORD", ""),
        "dbname": dbname,
    }


def connect(dbname: str):
    conn = psycopg2.connect(**pg_params(dbname))
    conn.autocommit = True
    return conn


def q(conn, statement: str, params=None) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute(statement, params)
        return cur.fetchall() if cur.description else []


def recreate_database(name: str) -> None:
    admin = connect("postgres")
    q(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    q(admin, f'CREATE DATABASE "{name}"')
    admin.close()


def app_env(db: str, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "POSTGRES_DB": db,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": "benchmarks.bench_settings",
            "BENCH_DB": db,
            "SECRET_KEY": env.get("SECRET_KEY", "benchmark-only-secret-key"),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def reset(conn, broker) -> None:
    q(conn, "TRUNCATE schedules_scheduledrun, orchestrator_run, schedules_schedule RESTART IDENTITY CASCADE")
    broker.delete(QUEUE, "unacked", "unacked_index")


def insert_schedules(conn, n: int, due_sql: str) -> None:
    q(
        conn,
        f"""INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled, schedule_type,
                interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy,
                next_run_at, claimed_by, created_at, updated_at)
            SELECT 'bench-' || g, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '0.1', true,
                   'interval', 60, '', 'UTC', 'allowlist', 'run_once', 'allow', {due_sql}, '', now(), now()
              FROM generate_series(1, %s) g""",
        [n],
    )
    q(conn, "ANALYZE schedules_schedule")


def listening(conn) -> int:
    return q(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query = 'LISTEN schedules_wake' AND state = 'idle'",
    )[0][0]


def burst(conn, broker, env, n: int, instances: int, log_dir: Path) -> dict:
    reset(conn, broker)
    procs = []
    try:
        for i in range(instances):
            log = open(log_dir / f"burst-{n}-{instances}-{i}.log", "wb")
            procs.append(
                subprocess.Popen(
                    [PYTHON, "manage.py", "run_scheduler", "--interval", "30", "--claimant", f"bench-{i}"],
                    cwd=ROOT,
                    env={
                        **env,
                        "BENCH_STATEMENTS_FILE": str(log_dir / f"statements-{n}-{instances}-{i}.json"),
                    },
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 120
        while listening(conn) < instances:
            if time.monotonic() > deadline:
                raise RuntimeError("schedulers did not start")
            time.sleep(0.1)
        # Every schedule due at the same instant, a few seconds ahead (the database clock).
        (due_at,) = q(conn, "SELECT date_trunc('second', now()) + interval '3 seconds'")[0]
        insert_schedules(conn, n, f"'{due_at.isoformat()}'::timestamptz")
        deadline = time.monotonic() + 900
        while True:
            (published,) = q(
                conn, "SELECT count(*) FROM schedules_scheduledrun WHERE published_at IS NOT NULL"
            )[0]
            if published >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {published}/{n} published")
            time.sleep(0.1)
        stats = [proc_stats(proc.pid) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    (all_published, p50, p99, rows, slots) = q(
        conn,
        """SELECT EXTRACT(EPOCH FROM max(published_at) - %s),
                  percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),
                  percentile_cont(0.99) WITHIN GROUP (ORDER BY lag),
                  count(*), count(DISTINCT (schedule_id, scheduled_for))
             FROM (SELECT *, EXTRACT(EPOCH FROM published_at - scheduled_for) AS lag
                     FROM schedules_scheduledrun) sr""",
        [due_at],
    )[0]
    statements = [read_statements(log_dir / f"statements-{n}-{instances}-{i}.json") for i in range(instances)]
    messages = broker.lrange(QUEUE, 0, -1)
    task_ids = [json.loads(raw)["headers"]["id"] for raw in messages]
    return {
        "n": n,
        "instances": instances,
        "all_published_s": round(float(all_published), 2),
        "lag_p50_s": round(float(p50), 3),
        "lag_p99_s": round(float(p99), 3),
        "duplicate_slots": rows - slots,
        "missing_slots": n - slots,
        "broker_messages": len(task_ids),
        "broker_duplicates": len(task_ids) - len(set(task_ids)),
        "cpu_seconds": round(sum(s.cpu_seconds for s in stats), 2),
        "peak_rss_mb": round(max(s.peak_rss_mb for s in stats), 1),
        "statements_per_slot": round(sum(x or 0 for x in statements) / n, 2),
    }


def idle_ticks(conn, broker, sizes: list[int], passes: int, *, held: bool = False) -> list[dict]:
    """One pass with nothing to do. `held`: every schedule is due but claimed by another (live)
    instance, the case where a plain `next_run_at <= now()` scan would step over every row."""
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
    from django.db import connection

    from project.celery import app
    from schedules.beat import DatabaseScheduler

    results = []
    for m in sizes:
        connection.close()
        reset(conn, broker)
        if held:
            insert_schedules(conn, m, "now() - interval '1 minute'")
            q(
                conn,
                "UPDATE schedules_schedule"
                " SET claimed_by = 'other:1', claimed_until = now() + interval '1 hour'",
            )
        else:
            insert_schedules(conn, m, "now() + interval '1 day'")
        q(conn, "VACUUM ANALYZE schedules_schedule")
        scheduler = DatabaseScheduler(app=app, lazy=True, claimant="bench-idle", interval=30)
        for _ in range(5):
            scheduler.run_pass()
        timings = []
        statements: list[str] = []

        def count(execute, sql, params, many, context, statements=statements):
            statements.append(sql)
            return execute(sql, params, many, context)

        with connection.execute_wrapper(count):
            for _ in range(passes):
                started = time.perf_counter()
                scheduler.run_pass()
                timings.append((time.perf_counter() - started) * 1000)
        timings.sort()
        results.append(
            {
                "schedules": f"{m} held" if held else m,
                "idle_tick_ms_median": round(statistics.median(timings), 3),
                "idle_tick_ms_p99": round(timings[int(len(timings) * 0.99) - 1], 3),
                "statements_per_tick": round(len(statements) / passes, 2),
                "peak_rss_mb": round(proc_stats(os.getpid()).peak_rss_mb, 1),
            }
        )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default="cb_bench")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/4"))
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--instances", default="1,2")
    parser.add_argument("--idle-sizes", default="1000,10000,100000")
    parser.add_argument("--idle-passes", type=int, default=200)
    parser.add_argument("--json", help="also write every result to this file (used by benchmarks.compare)")
    args = parser.parse_args(argv)
    results: list[dict] = []

    env = app_env(args.db, args.redis_url)
    os.environ.update({k: env[k] for k in ("POSTGRES_DB", "REDIS_URL", "CELERY_BROKER_URL", "SECRET_KEY")})
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.bench_settings"
    os.environ["BENCH_DB"] = args.db
    os.environ["LOG_LEVEL"] = "WARNING"
    sys.path.insert(0, str(ROOT))

    recreate_database(args.db)
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--no-input"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    conn = connect(args.db)
    broker = redis.Redis.from_url(args.redis_url)
    log_dir = Path(tempfile.mkdtemp(prefix="cb-bench-"))

    print(f"dispatch benchmark: database {args.db}, broker {args.redis_url}, logs {log_dir}")
    print(
        f"{'due':>7} {'inst':>4} {'all published (s)':>18} {'lag p50 (s)':>12} {'lag p99 (s)':>12} "
        f"{'dup slots':>9} {'missing':>7} {'msgs':>6} {'dup msgs':>8}"
    )
    for n in [int(x) for x in args.sizes.split(",") if x]:
        for k in [int(x) for x in args.instances.split(",") if x]:
            r = burst(conn, broker, env, n, k, log_dir)
            results.append({"kind": "dispatch", **r})
            print(
                f"{r['n']:>7} {r['instances']:>4} {r['all_published_s']:>18} {r['lag_p50_s']:>12} "
                f"{r['lag_p99_s']:>12} {r['duplicate_slots']:>9} {r['missing_slots']:>7} "
                f"{r['broker_messages']:>6} {r['broker_duplicates']:>8}",
                flush=True,
            )
    idle_sizes = [int(x) for x in args.idle_sizes.split(",") if x]
    if idle_sizes:
        print(f"{'schedules (none due)':>20} {'idle tick median (ms)':>22} {'p99 (ms)':>9}")
        rows = idle_ticks(conn, broker, idle_sizes, args.idle_passes)
        rows += idle_ticks(conn, broker, idle_sizes[-1:], args.idle_passes, held=True)
        results.extend({"kind": "idle", **r} for r in rows)
        for r in rows:
            print(
                f"{r['schedules']!s:>20} {r['idle_tick_ms_median']:>22} {r['idle_tick_ms_p99']:>9}",
                flush=True,
            )
        print("(held: every schedule due but claimed by another live instance)")
    reset(conn, broker)
    conn.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
