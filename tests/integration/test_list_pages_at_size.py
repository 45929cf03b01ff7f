"""List pages at production size (issue 31.5): no count(*) over the run history, indexes in each list's order.

Timings are benchmarks/pages.py's business (docs/BENCHMARKS.md); here the two things that make them hold,
deterministically: above 10,000 rows a list page counts nothing (PostgreSQL's estimate instead), below it
every count is bounded by a LIMIT; and the lists' newest-first queries walk an index instead of sorting.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orchestrator.models import Job, Run
from project.pagination import EXACT_COUNT_LIMIT, EstimatedCountPaginator
from schedules import services
from schedules.models import ScheduledRun

pytestmark = pytest.mark.django_db

BIG_TABLES = ("orchestrator_run", "schedules_scheduledrun", "django_celery_results_taskresult")
ROWS = EXACT_COUNT_LIMIT + 2_000


@pytest.fixture
def history():
    """ROWS runs, each with its ScheduledRun and TaskResult, written server-side, then ANALYZEd."""
    schedule = services.create_schedule(
        name="busy", job=Job.objects.get(key="sleep"), schedule_type="interval", interval_minutes=1
    )
    with connection.cursor() as cursor:
        cursor.execute(
            """INSERT INTO orchestrator_run (job_id, custom_directive_text, trigger, task3_scope, status,
                    created_at, error_summary, stats, llm_calls, llm_prompt_tokens, llm_completion_tokens,
                    report_path, task_id, worker, attempt)
               SELECT %s, '', CASE WHEN g %% 50 = 0 THEN 'manual' ELSE 'schedule' END, 'allowlist',
                      CASE WHEN g %% 7 = 0 THEN 'failed' ELSE 'succeeded' END,
                      now() - make_interval(mins => g), '', '{}', 0, 0, 0, '', 't-' || g, '', 1
                 FROM generate_series(1, %s) g""",
            [schedule.job_id, ROWS],
        )
        cursor.execute(
            """INSERT INTO schedules_scheduledrun (schedule_id, run_id, trigger, scheduled_for, status,
                    task_id, worker, error_summary)
               SELECT %s, id, trigger, created_at, status, task_id, '', '' FROM orchestrator_run""",
            [schedule.pk],
        )
        cursor.execute(
            """INSERT INTO django_celery_results_taskresult (task_id, status, content_type, content_encoding,
                    date_done, date_created, meta, task_name)
               SELECT task_id, 'SUCCESS', 'application/json', 'utf-8', created_at, created_at, '{}',
                      'worker.execute_run' FROM orchestrator_run"""
        )
        for table in BIG_TABLES:
            cursor.execute(f"ANALYZE {table}")
    return schedule


def _pages(schedule_id: int) -> list[str]:
    return [
        "/api/runs/",
        "/api/runs/?page=3",
        "/api/runs/?status=failed",
        "/api/runs/?trigger=manual",
        "/api/runs/?job_key=sleep",
        f"/api/schedules/{schedule_id}/history/",
        "/admin/orchestrator/run/",
        "/admin/orchestrator/run/?status__exact=failed",
        "/admin/orchestrator/run/?trigger__exact=manual",
        "/admin/schedules/scheduledrun/",
        "/admin/schedules/scheduledrun/?status__exact=succeeded",
        f"/admin/schedules/scheduledrun/?schedule__id__exact={schedule_id}",
        "/admin/django_celery_results/taskresult/",
        "/admin/django_celery_results/taskresult/?status__exact=SUCCESS",
        "/admin/schedules/schedule/",
        f"/admin/schedules/schedule/{schedule_id}/change/",
        "/dashboard/",
        f"/dashboard/schedules/{schedule_id}/",
    ]


def _distinct_over_big_tables(queries: list[dict]) -> list[str]:
    return [q["sql"] for q in queries if "DISTINCT" in q["sql"] and any(t in q["sql"] for t in BIG_TABLES)]


def _counts_over_big_tables(queries: list[dict]) -> list[str]:
    return [
        q["sql"]
        for q in queries
        if re.search(r"\bCOUNT\(", q["sql"], re.IGNORECASE) and any(t in q["sql"] for t in BIG_TABLES)
    ]


# Committed (and truncated afterwards), so the next tests' estimates see small tables again.
@pytest.mark.django_db(transaction=True)
def test_list_pages__never_count_a_big_table(history, staff):
    for url in _pages(history.pk):
        with CaptureQueriesContext(connection) as captured:
            response = staff.get(url)
        assert response.status_code == 200, url
        counts = _counts_over_big_tables(captured.captured_queries)
        # Only a bounded count, of a filter PostgreSQL estimates below the limit (failed runs, 1 in 7).
        assert all(f"LIMIT {EXACT_COUNT_LIMIT + 1}" in sql for sql in counts), f"{url} counted: {counts}"
        # A filter sidebar listing distinct values (a date hierarchy's years, a status) reads every row.
        assert _distinct_over_big_tables(captured.captured_queries) == [], url
        if "?" not in url or "page=" in url:
            assert counts == [], f"{url} counted: {counts}"


@pytest.mark.django_db(transaction=True)
def test_api_count__estimated_above_the_limit_exact_below(history, api):
    listing = api.get("/api/runs/").json()
    # PostgreSQL's estimate from ANALYZE: close, not exact.
    assert EXACT_COUNT_LIMIT < listing["count"] <= ROWS * 1.2
    assert listing["next"].endswith("page=2")
    assert len(listing["results"]) == 50
    manual = api.get("/api/runs/?trigger=manual").json()
    assert manual["count"] == ROWS // 50  # below the limit: exact


def test_small_lists__count_exactly_with_a_bounded_count(staff):
    Run.objects.bulk_create(Run(job=Job.objects.get(key="sleep")) for _ in range(3))
    with CaptureQueriesContext(connection) as captured:
        assert staff.get("/admin/orchestrator/run/").status_code == 200
    counts = _counts_over_big_tables(captured.captured_queries)
    assert counts
    assert all("LIMIT 10001" in sql for sql in counts), counts
    assert EstimatedCountPaginator(Run.objects.all(), 50).count == 3


@pytest.mark.parametrize(
    ("queryset", "index"),
    [
        (lambda: Run.objects.order_by("-created_at", "-id")[:50], "run_list_idx"),
        (
            lambda: Run.objects.filter(trigger="manual").order_by("-created_at", "-id")[:50],
            "run_trigger_list_idx",
        ),
        (lambda: ScheduledRun.objects.order_by("-scheduled_for", "-id")[:50], "scheduledrun_list_idx"),
        (
            lambda: ScheduledRun.objects.filter(trigger="manual").order_by("-scheduled_for", "-id")[:50],
            "scheduledrun_trigger_list_idx",
        ),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_list_queries__walk_an_index_in_the_lists_order(history, queryset, index):
    plan = queryset().explain()
    assert f"Index Scan using {index}" in plan, plan
    assert "Sort" not in plan, plan
    assert "Seq Scan" not in plan, plan
