"""Pages at production size (issue 31.5): every API list, admin list and change page, dashboard page and
/metrics, timed against a history as big as retention's defaults keep.

Retention keeps 30 days and at least 100 runs per schedule (HISTORY_KEEP_DAYS, Schedule.history_keep), so
100,000 schedules keep up to 10,000,000 runs. The seed writes that shape server-side (INSERT ... SELECT
FROM generate_series, in chunks of a million rows): N schedules (interval and cron, three time zones, one
in ten disabled), RUNS runs spread round-robin over them back to 30 days ago (one in seven failed, one in
fifty manual, the newest run of one schedule in a hundred still running), a ScheduledRun and a
django-celery-results TaskResult per run as the worker writes them, a skipped slot for one schedule in
twenty, change records and alerts. Then VACUUM ANALYZE, as autovacuum would have done.

Each page is requested through Django's full request path in-process (the test Client, as
benchmarks/metrics_scrape.py does: middleware, session or token auth, templates), once to warm up and
then REPEAT times; the table shows the median in milliseconds, and the slowest page's name:

    .venv/bin/python -m benchmarks.pages                                  # 100,000 and 10,000,000
    .venv/bin/python -m benchmarks.pages --schedules 2000 --runs 100000   # a small run, a minute
    .venv/bin/python -m benchmarks.pages --reuse                          # time again, no seeding

`--reuse` keeps the database of the last run (default cb_pages_bench) and only applies migrations, so a
change to indexes or pages can be measured before and after on the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, recreate_database

CHUNK = 1_000_000
TARGET_MS = 300.0

SCHEDULES_SQL = """
INSERT INTO schedules_schedule (id, name, job_id, custom_directive_text, enabled, schedule_type,
        interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy, last_run_at,
        next_run_at, claimed_by, jitter_seconds, scheduled_run_count, paused_note, paused_by, managed,
        history_keep, alert_after_failures, alert_webhook_url, created_at, updated_at)
SELECT g, 'bench-' || g, (%(jobs)s::bigint[])[1 + g %% cardinality(%(jobs)s::bigint[])], '0.1', g %% 10 <> 0,
       CASE WHEN g %% 3 = 0 THEN 'cron' ELSE 'interval' END,
       CASE WHEN g %% 3 = 0 THEN NULL ELSE 10 + g %% 50 END,
       CASE WHEN g %% 3 = 0 THEN (g %% 60) || ' * * * *' ELSE '' END,
       (ARRAY['UTC', 'Europe/Paris', 'America/New_York'])[1 + g %% 3], 'allowlist', 'run_once', 'buffer_one',
       now() - make_interval(secs => g %% 3600), now() + make_interval(secs => g %% 3600), '', 0, 0, '', '',
       false, 100, 1, '', now() - interval '60 days', now() - interval '1 day'
  FROM generate_series(1, %(schedules)s) g
"""

# Run g belongs to schedule 1 + (g - 1) % S and is that schedule's k-th newest, k = (g - 1) / S, one
# `spacing` apart back to 30 days ago. The same expressions give its ScheduledRun and TaskResult.
_RUN_COLUMNS = """
    1 + (g - 1) %% %(schedules)s AS s,
    now() - interval '1 minute' - (((g - 1) / %(schedules)s) * %(spacing)s) * interval '1 second'
          - make_interval(secs => (g - 1) %% %(schedules)s %% 600) AS at,
    CASE WHEN (g - 1) / %(schedules)s = 0 AND g %% 100 = 0 THEN 'running'
         WHEN g %% 7 = 0 THEN 'failed' ELSE 'succeeded' END AS status,
    CASE WHEN g %% 50 = 0 THEN 'manual' ELSE 'schedule' END AS trigger,
    'bench-' || g AS task_id,
    'celery@bench-' || (g %% 4) AS worker
"""

RUNS_SQL = f"""
INSERT INTO orchestrator_run (id, job_id, custom_directive_text, trigger, task3_scope, status, created_at,
        started_at, finished_at, heartbeat_at, error_summary, stats, llm_calls, llm_prompt_tokens,
        llm_completion_tokens, report_path, task_id, worker, attempt, published_at)
SELECT g, (%(jobs)s::bigint[])[1 + x.s %% cardinality(%(jobs)s::bigint[])], '0.1', x.trigger, 'allowlist',
       x.status, x.at, x.at + interval '0.2 s',
       CASE WHEN x.status = 'running' THEN NULL ELSE x.at + make_interval(secs => 1 + g %% 90) END,
       CASE WHEN x.status = 'running' THEN now() ELSE NULL END,
       CASE WHEN x.status = 'failed' THEN 'TaskError: gather returned a negative count' ELSE '' END,
       '{{"tasks": {{"sleep": {{"outcome": "ok", "seconds": 0.1}}}}}}', 0, 0, 0, '', x.task_id, x.worker, 1,
       x.at + interval '0.1 s'
  FROM generate_series(%(lo)s, %(hi)s) g, LATERAL (SELECT {_RUN_COLUMNS}) x
"""

SCHEDULED_RUNS_SQL = f"""
INSERT INTO schedules_scheduledrun (id, schedule_id, run_id, trigger, scheduled_for, status, task_id, worker,
        created_at, published_at, started_at, finished_at, error_summary)
SELECT g, x.s, g, x.trigger, x.at, x.status, x.task_id, x.worker, x.at, x.at + interval '0.1 s',
       x.at + interval '0.2 s',
       CASE WHEN x.status = 'running' THEN NULL ELSE x.at + make_interval(secs => 1 + g %% 90) END,
       CASE WHEN x.status = 'failed' THEN 'TaskError: gather returned a negative count' ELSE '' END
  FROM generate_series(%(lo)s, %(hi)s) g, LATERAL (SELECT {_RUN_COLUMNS}) x
"""

TASK_RESULTS_SQL = f"""
INSERT INTO django_celery_results_taskresult (id, task_id, status, content_type, content_encoding, result,
        date_done, traceback, meta, task_args, task_kwargs, task_name, worker, date_created,
        periodic_task_name, date_started)
SELECT g, x.task_id, CASE WHEN x.status = 'failed' THEN 'FAILURE' ELSE 'SUCCESS' END, 'application/json',
       'utf-8', '{{"run_id": ' || g || '}}', x.at + make_interval(secs => 1 + g %% 90), NULL,
       '{{"children": []}}', '[' || g || ']', '{{}}', 'worker.execute_run', x.worker, x.at, NULL,
       x.at + interval '0.2 s'
  FROM generate_series(%(lo)s, %(hi)s) g, LATERAL (SELECT {_RUN_COLUMNS}) x
 WHERE x.status <> 'running'
"""

EXTRA_SQL = [
    # A skipped slot (no run) for one schedule in twenty, half a second off any run's time.
    """INSERT INTO schedules_scheduledrun (id, schedule_id, trigger, scheduled_for, status, task_id, worker,
            created_at, error_summary)
       SELECT %(runs)s + s, s, 'schedule', now() - interval '29 days' - make_interval(secs => s %% 600 + 0.5),
              'skipped', '', '', now() - interval '29 days', 'missed while the scheduler was down'
         FROM generate_series(20, %(schedules)s, 20) s""",
    # A create record per schedule, and an update for one in ten.
    """INSERT INTO schedules_schedulechange (schedule_id, schedule_name, action, source, actor, at, changes)
       SELECT g, 'bench-' || g, 'create', 'api', 'bench', now() - interval '60 days',
              jsonb_build_object('name', jsonb_build_object('old', NULL, 'new', 'bench-' || g),
                                 'enabled', jsonb_build_object('old', NULL, 'new', true))
         FROM generate_series(1, %(schedules)s) g""",
    """INSERT INTO schedules_schedulechange (schedule_id, schedule_name, action, source, actor, at, changes)
       SELECT g, 'bench-' || g, 'update', 'admin', 'bench', now() - interval '1 day',
              jsonb_build_object('interval_minutes', jsonb_build_object('old', 10, 'new', 10 + g %% 50))
         FROM generate_series(10, %(schedules)s, 10) g""",
    # Open failing alerts for one schedule in a hundred, resolved missed ones for one in twenty.
    """INSERT INTO schedules_alert (schedule_id, kind, opened_at, resolved_at, details)
       SELECT g, 'failing', now() - interval '2 hours', NULL, '{"failures": 3}'
         FROM generate_series(100, %(schedules)s, 100) g""",
    """INSERT INTO schedules_alert (schedule_id, kind, opened_at, resolved_at, details, notified_open_at,
            notified_resolved_at)
       SELECT g, 'missed', now() - interval '3 days', now() - interval '2 days', '{}',
              now() - interval '3 days', now() - interval '2 days'
         FROM generate_series(20, %(schedules)s, 20) g""",
    # Calendars (issue 33): one in twenty schedules excludes weekends, one in twenty a list of holidays, one
    # in fifty runs only on business days; and a team label on each, four teams (the calendar view's filter).
    """INSERT INTO schedules_calendar (id, name, timezone, rules, holidays, created_at, updated_at) VALUES
       (1, 'bench-weekend', 'Europe/Paris', '[{"weekdays": ["sat", "sun"]}]', NULL, now(), now()),
       (2, 'bench-holidays', 'America/New_York',
        '[{"yearly": "12-25"}, {"yearly": "01-01"}, {"yearly": "07-04"},
          {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}}]',
        '{"country": "US", "years": [2026, 2027]}', now(), now()),
       (3, 'bench-business', 'UTC', '[{"weekdays": ["mon", "tue", "wed", "thu", "fri"]}]', NULL,
        now(), now())""",
    """INSERT INTO schedules_schedule_exclude_calendars (schedule_id, calendar_id)
       SELECT g, 1 + g %% 20 FROM generate_series(1, %(schedules)s) g WHERE g %% 20 IN (0, 1)""",
    """INSERT INTO schedules_schedule_only_calendars (schedule_id, calendar_id)
       SELECT g, 3 FROM generate_series(7, %(schedules)s, 50) g""",
    """UPDATE schedules_schedule SET labels = jsonb_build_object('team', 't' || id %% 4)""",
    """INSERT INTO orchestrator_directive (key, name, text, job_id)
       SELECT 'bench-' || g, 'Bench directive ' || g, 'Look for anything unusual.', NULL
         FROM generate_series(1, 20) g""",
]

TABLES = [
    "schedules_calendar",
    "schedules_schedule",
    "orchestrator_run",
    "schedules_scheduledrun",
    "django_celery_results_taskresult",
    "schedules_schedulechange",
    "schedules_alert",
    "orchestrator_directive",
]


def seed(cursor, schedules: int, runs: int) -> dict[str, float]:
    """Write the history; returns seconds per step."""
    per = max(1, -(-runs // schedules))
    params = {
        "schedules": schedules,
        "runs": runs,
        "spacing": 30 * 86400 // per,
    }
    cursor.execute("SELECT array_agg(id ORDER BY id) FROM orchestrator_job")
    params["jobs"] = cursor.fetchone()[0]
    cursor.execute("SET synchronous_commit TO off")
    steps: dict[str, float] = {}
    t0 = time.monotonic()
    cursor.execute(SCHEDULES_SQL, params)
    steps["schedules"] = time.monotonic() - t0
    for name, sql in (
        ("runs", RUNS_SQL),
        ("scheduled_runs", SCHEDULED_RUNS_SQL),
        ("task_results", TASK_RESULTS_SQL),
    ):
        t0 = time.monotonic()
        for lo in range(1, runs + 1, CHUNK):
            cursor.execute(sql, {**params, "lo": lo, "hi": min(runs, lo + CHUNK - 1)})
            print(f"[pages] {name}: {min(runs, lo + CHUNK - 1):,} of {runs:,}", file=sys.stderr, flush=True)
        steps[name] = time.monotonic() - t0
    t0 = time.monotonic()
    for sql in EXTRA_SQL:
        cursor.execute(sql, params)
    for table in TABLES:
        cursor.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
        )
    steps["extras"] = time.monotonic() - t0
    t0 = time.monotonic()
    for table in TABLES:
        cursor.execute(f"VACUUM ANALYZE {table}")
    steps["vacuum_analyze"] = time.monotonic() - t0
    return steps


def pages(schedules: int, runs: int) -> list[tuple[str, str, str]]:
    """(group, label, url) of every page to time; objects from the middle of the history."""
    from django.apps import apps
    from django.contrib import admin
    from django.urls import reverse

    from orchestrator.models import Directive, Run
    from schedules.models import Alert, ScheduledRun

    sid = schedules // 2
    middle = max(1, schedules // 100)  # the middle page of 50 schedules each
    ids = ",".join(str(sid + i) for i in range(50))
    run_id = Run.objects.filter(pk__lte=runs // 2).order_by("-pk").values_list("pk", flat=True).first()
    sr_id = ScheduledRun.objects.filter(run_id=run_id).values_list("pk", flat=True).first()
    directive = Directive.objects.order_by("pk").first()
    alert_schedule = Alert.objects.order_by("pk").values_list("schedule_id", flat=True).first()
    out = [
        ("api", "schedules", "/api/schedules/"),
        ("api", f"schedules, page {middle}", f"/api/schedules/?page={middle}"),
        ("api", "schedule", f"/api/schedules/{sid}/"),
        ("api", "schedule history", f"/api/schedules/{sid}/history/"),
        ("api", "schedule history, failed", f"/api/schedules/{sid}/history/?status=failed"),
        ("api", "schedule changes", f"/api/schedules/{sid}/changes/"),
        ("api", "runs", "/api/runs/"),
        ("api", "runs, page 100", "/api/runs/?page=100"),
        ("api", "runs, status=failed", "/api/runs/?status=failed"),
        ("api", "runs, status=running", "/api/runs/?status=running"),
        ("api", "runs, trigger=manual", "/api/runs/?trigger=manual"),
        ("api", "runs, job_key=sleep", "/api/runs/?job_key=sleep"),
        ("api", "run", f"/api/runs/{run_id}/"),
        ("api", "jobs", "/api/jobs/"),
        ("api", "directives", "/api/directives/"),
        ("api", "directive", f"/api/directives/{directive.pk}/"),
        ("api", "alerts", "/api/alerts/"),
        ("api", "alerts, open", "/api/alerts/?open=true"),
        ("api", "alerts, one schedule", f"/api/alerts/?schedule={alert_schedule}"),
    ]
    filters = {
        "schedules.schedule": ["enabled__exact=0", f"q=bench-{sid}"],
        "schedules.scheduledrun": [
            "status__exact=failed",
            f"schedule__id__exact={sid}",
            "trigger__exact=manual",
        ],
        "orchestrator.run": ["status__exact=failed", "trigger__exact=manual", "status__exact=running"],
        "django_celery_results.taskresult": ["status__exact=FAILURE"],
    }
    objects = {"schedules.schedule": sid, "schedules.scheduledrun": sr_id, "orchestrator.run": run_id}
    for model in apps.get_models():
        if not admin.site.is_registered(model):
            continue
        label = model._meta.label_lower
        info = (model._meta.app_label, model._meta.model_name)
        changelist = reverse("admin:{}_{}_changelist".format(*info))
        out.append(("admin", f"{model._meta.verbose_name} list", changelist))
        for query in filters.get(label, []):
            out.append(("admin", f"{model._meta.verbose_name} list, {query}", f"{changelist}?{query}"))
        pk = objects.get(label)
        if pk is None:
            # The middle row of a small table, the newest of a big one.
            pk = model.objects.order_by("-pk").values_list("pk", flat=True).first()
        if pk is not None:
            out.append(
                (
                    "admin",
                    f"{model._meta.verbose_name} page",
                    reverse("admin:{}_{}_change".format(*info), args=[pk]),
                )
            )
    out += [
        ("dashboard", "index", "/dashboard/"),
        ("dashboard", f"index, page {middle}", f"/dashboard/?page={middle}"),
        ("dashboard", "index, search", f"/dashboard/?q=bench-{sid}"),
        ("dashboard", "state.json (50 schedules)", f"/dashboard/state.json?ids={ids}"),
        ("dashboard", "schedule", f"/dashboard/schedules/{sid}/"),
        ("dashboard", "run", f"/dashboard/runs/{run_id}/"),
        ("dashboard", "calendar, week", "/dashboard/calendar?view=week"),
        ("dashboard", "calendar, month", "/dashboard/calendar?view=month"),
        ("dashboard", "calendar, week, Europe/Paris", "/dashboard/calendar?view=week&tz=Europe/Paris"),
        ("dashboard", "calendar, month, label team=t1", "/dashboard/calendar?view=month&label=team%3Dt1"),
        ("dashboard", "calendar, week, job sleep", "/dashboard/calendar?view=week&job=sleep"),
    ]  # fmt: skip
    return out


def time_get(client, url: str, repeat: int, **headers: str) -> tuple[float, int]:
    response = client.get(url, **headers)  # warm-up: caches, connections, templates
    timings = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        response = client.get(url, **headers)
        timings.append((time.perf_counter() - t0) * 1000)
    return statistics.median(timings), response.status_code


def report(result: dict) -> str:
    lines = [
        f"{result['schedules']:,} schedules, {result['runs']:,} runs ({result['scheduled_runs']:,} scheduled"
        f" runs, {result['task_results']:,} task results); median of {result['repeat']} after a warm-up, ms "
        f"(target {TARGET_MS:.0f})\n",
        "| page | URL | ms | status |",
        "|---|---|---|---|",
    ]  # fmt: skip
    for row in result["pages"]:
        flag = " **over**" if row["ms"] > TARGET_MS else ""
        lines.append(
            f"| {row['group']}: {row['label']} | `{row['url'][:60]}` | {row['ms']:.1f}{flag} "
            f"| {row['status']} |"
        )
    slowest = max(result["pages"], key=lambda row: row["ms"])
    over = sum(1 for row in result["pages"] if row["ms"] > TARGET_MS)
    lines.append(
        f"\nslowest: {slowest['group']}: {slowest['label']} {slowest['ms']:.1f} ms;"
        f" {over} page(s) over target"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedules", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=10_000_000, help="at most 100 per schedule (retention)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database", default="cb_pages_bench")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the database of the last run; migrate only"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--only", default="", help="time only pages whose label contains this")
    args = parser.parse_args(argv)
    args.runs = min(args.runs, 100 * args.schedules)

    if not args.reuse:
        recreate_database(args.database)
    os.environ.update(
        {
            "POSTGRES_DB": args.database,
            "DJANGO_SETTINGS_MODULE": "project.settings_test",
            "METRICS_BASIC_AUTH": "prometheus:bench-secret",
            "LOG_LEVEL": "WARNING",
            "DEBUG": "0",
        }
    )
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/4")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client, override_settings
    from rest_framework.authtoken.models import Token

    call_command("migrate", verbosity=0)
    steps: dict[str, float] = {}
    if not args.reuse:
        with connection.cursor() as cursor:
            steps = seed(cursor, args.schedules, args.runs)
        took = json.dumps({k: round(v) for k, v in steps.items()})
        print(f"[pages] seeded in {sum(steps.values()):.0f} s: {took}", file=sys.stderr, flush=True)
    with connection.cursor() as cursor:
        counts = {}
        for table in ("schedules_schedule", "orchestrator_run", "schedules_scheduledrun",
                      "django_celery_results_taskresult"):  # fmt: skip
            cursor.execute(f"SELECT reltuples::bigint FROM pg_class WHERE relname = '{table}'")
            counts[table] = cursor.fetchone()[0]

    user, _ = get_user_model().objects.get_or_create(
        username="bench", defaults={"is_staff": True, "is_superuser": True}
    )
    token, _ = Token.objects.get_or_create(user=user)
    session = Client(HTTP_HOST="127.0.0.1")
    session.force_login(user)
    api = Client(HTTP_HOST="127.0.0.1", HTTP_AUTHORIZATION=f"Token {token.key}")

    rows = []
    for group, label, url in pages(counts["schedules_schedule"], counts["orchestrator_run"]):
        if args.only and args.only not in f"{group}: {label}":
            continue
        ms, code = time_get(api if group == "api" else session, url, args.repeat)
        rows.append({"group": group, "label": label, "url": url, "ms": round(ms, 1), "status": code})
        print(f"[pages] {group}: {label} {ms:.1f} ms ({code})", file=sys.stderr, flush=True)
    if not args.only or "metrics" in args.only:
        auth = {
            "HTTP_AUTHORIZATION": "Basic cHJvbWV0aGV1czpiZW5jaC1zZWNyZXQ=",
            "HTTP_ACCEPT_ENCODING": "gzip",
        }
        with override_settings(METRICS_MAX_AGE_SECONDS=0):  # built on every scrape
            built, built_code = time_get(session, "/metrics", args.repeat, **auth)
        served, served_code = time_get(session, "/metrics", args.repeat, **auth)
        for label, ms, code in (
            ("built per scrape (max age 0)", built, built_code),
            ("served (default max age)", served, served_code),
        ):
            rows.append(
                {"group": "metrics", "label": label, "url": "/metrics", "ms": round(ms, 1), "status": code}
            )
    result = {
        "schedules": counts["schedules_schedule"],
        "runs": counts["orchestrator_run"],
        "scheduled_runs": counts["schedules_scheduledrun"],
        "task_results": counts["django_celery_results_taskresult"],
        "repeat": args.repeat,
        "seed_seconds": {k: round(v, 1) for k, v in steps.items()},
        "pages": rows,
    }
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
