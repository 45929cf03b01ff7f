"""GET /metrics at scale (issue 17): scrape time with 100,000 schedules and their run history.

Builds its own database (default cb_bench_metrics, dropped and re-created): N schedules, RUNS finished
runs spread over them (succeeded, failed, skipped), then times building the exposition (three builds),
and `GET /metrics` through Django's full request path (auth, view) REPEAT times as Prometheus sees it:
served from the last build (monitoring/metrics.py, METRICS_MAX_AGE_SECONDS). Prints the build times, the
first scrape (which builds), p50 / p95 / max of the served scrapes and the response size:

    REDIS_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m benchmarks.metrics_scrape
    .venv/bin/python -m benchmarks.metrics_scrape --schedules 1000 --runs 5000   # quick
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import time

from benchmarks.common import ROOT, percentile, recreate_database

SEED_SQL = [
    """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled, schedule_type,
            interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy,
            next_run_at, claimed_by, created_at, updated_at)
       SELECT 'bench-' || g, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '0.1', g %% 10 <> 0,
              'interval', 60, '', 'UTC', 'allowlist', 'run_once', 'allow',
              now() + make_interval(secs => g %% 3600), '', now(), now()
         FROM generate_series(1, %(schedules)s) g""",
    # Runs first (one per scheduled run), then their scheduled runs, round-robin over the schedules.
    """INSERT INTO orchestrator_run (job_id, custom_directive_text, trigger, task3_scope, status, created_at,
            started_at, finished_at, error_summary, stats, llm_calls, llm_prompt_tokens,
            llm_completion_tokens, report_path, task_id, worker, attempt, published_at)
       SELECT (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '', 'schedule', 'allowlist',
              CASE WHEN g %% 7 = 0 THEN 'failed' ELSE 'succeeded' END,
              now() - make_interval(secs => g), now() - make_interval(secs => g) + interval '0.2 s',
              now() - make_interval(secs => g) + make_interval(secs => 1 + g %% 90), '', '{}', 0, 0, 0, '',
              'bench-' || g, 'w1', 1, now() - make_interval(secs => g) + interval '0.1 s'
         FROM generate_series(1, %(runs)s) g""",
    """INSERT INTO schedules_scheduledrun (schedule_id, run_id, trigger, scheduled_for, status, task_id,
            worker, created_at, published_at, started_at, finished_at, error_summary)
       SELECT s.id, r.id, 'schedule', r.created_at, r.status, r.task_id, r.worker, r.created_at,
              r.published_at, r.started_at, r.finished_at, ''
         FROM orchestrator_run r
         JOIN schedules_schedule s ON s.name = 'bench-' || (1 + r.id %% %(schedules)s)""",
    # Some skipped slots, for cb_slots_skipped_total.
    """INSERT INTO schedules_scheduledrun (schedule_id, trigger, scheduled_for, status, task_id, worker,
            created_at, error_summary)
       SELECT id, 'schedule', now() - interval '30 days', 'skipped', '', '', now(),
              'missed while the scheduler was down (misfire_policy skip)'
         FROM schedules_schedule WHERE id %% 20 = 0""",
    "ANALYZE",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedules", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database", default="cb_bench_metrics")
    args = parser.parse_args()

    recreate_database(args.database)
    os.environ.update(
        {
            "POSTGRES_DB": args.database,
            "DJANGO_SETTINGS_MODULE": "project.settings_test",
            "METRICS_BASIC_AUTH": "prometheus:bench-secret",
            # The serving path: within the max age, every scrape is served from the last build.
            "METRICS_MAX_AGE_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
        }
    )
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/4")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    with connection.cursor() as cursor:
        for statement in SEED_SQL:
            cursor.execute(statement, {"schedules": args.schedules, "runs": args.runs})
    seeded = time.monotonic() - started

    from monitoring import metrics

    builds = []
    for _ in range(3):
        t0 = time.perf_counter()
        metrics.render()
        builds.append((time.perf_counter() - t0) * 1000)
    metrics.redis_client().delete(metrics.EXPOSITION_KEY)

    client = Client(HTTP_HOST="127.0.0.1")
    auth = "Basic " + base64.b64encode(b"prometheus:bench-secret").decode()
    t0 = time.perf_counter()
    response = client.get(
        "/metrics", HTTP_AUTHORIZATION=auth, HTTP_ACCEPT_ENCODING="gzip"
    )  # the first scrape builds synchronously
    first = (time.perf_counter() - t0) * 1000
    assert response.status_code == 200, response.status_code
    timings = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        response = client.get("/metrics", HTTP_AUTHORIZATION=auth, HTTP_ACCEPT_ENCODING="gzip")
        timings.append((time.perf_counter() - t0) * 1000)
        assert response.status_code == 200
    import gzip

    compressed = response.content
    body = gzip.decompress(compressed)
    print(
        json.dumps(
            {
                "schedules": args.schedules,
                "runs": args.runs,
                "seed_seconds": round(seeded, 1),
                "build_ms": [round(b, 1) for b in builds],
                "first_scrape_ms": round(first, 1),
                "scrapes": args.repeat,
                "p50_ms": round(statistics.median(timings), 1),
                "p95_ms": round(percentile(timings, 95), 1),
                "max_ms": round(max(timings), 1),
                "bytes": len(body),
                "gzip_bytes": len(compressed),
                "samples": body.count(b"\n") - body.count(b"\n#"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
