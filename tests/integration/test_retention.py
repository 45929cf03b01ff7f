"""Retention (issue 15.7): old finished history is pruned in batches; each schedule keeps its newest
`history_keep`; unfinished rows, recent rows and the runs kept history refers to stay.

Rows are aged with SQL (created_at, date_done) instead of patching a clock.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import psycopg2
import pytest
from django.core.management import call_command
from django.db import connection
from django_celery_results.models import TaskResult

from orchestrator.models import Finding, Run, RunAttempt
from schedules import retention
from schedules.models import ScheduledRun
from tests.scheduler_support import db_now, make_schedule, sleep_job, sql

pytestmark = pytest.mark.django_db

OLD = "40 days"


def _run(status: str, *, old: bool, trigger: str = "schedule") -> Run:
    run = Run.objects.create(
        job=sleep_job(), trigger=trigger, status=status, task_id=str(uuid.uuid4()), custom_directive_text="0"
    )
    Finding.objects.create(run=run, rule="r", severity="low", subject="s", count=1, source_file="f")
    RunAttempt.objects.create(run=run, attempt=1, outcome="failed")  # as if it was retried
    TaskResult.objects.create(task_id=run.task_id, task_name="worker.execute_run", status="SUCCESS")
    if old:
        sql(f"UPDATE orchestrator_run SET created_at = now() - interval '{OLD}' WHERE id = %s", [run.pk])
        sql(
            f"UPDATE django_celery_results_taskresult SET date_done = now() - interval '{OLD}'"
            " WHERE task_id = %s",
            [run.task_id],
        )
    return run


def _slot(schedule, minutes_ago: int, status: str, *, old: bool) -> ScheduledRun:
    run_status = {"skipped": None, "throttled": "queued"}.get(status, status)
    run = _run(run_status, old=old) if run_status else None
    sr = ScheduledRun.objects.create(
        schedule=schedule,
        run=run,
        trigger="schedule",
        scheduled_for=db_now() - timedelta(minutes=minutes_ago),
        status=status,
        task_id=run.task_id if run else "",
    )
    if old:
        sql(f"UPDATE schedules_scheduledrun SET created_at = now() - interval '{OLD}' WHERE id = %s", [sr.pk])
    return sr


def _history():
    """A schedule keeping 5: 10 old finished slots, 2 old unfinished ones, 2 recent finished ones."""
    schedule = make_schedule("kept", history_keep=5, enabled=False)
    old_done = [
        _slot(schedule, 1000 - i, ("succeeded", "failed", "skipped", "cancelled")[i % 4], old=True)
        for i in range(10)
    ]
    unfinished = [_slot(schedule, 60, "running", old=True), _slot(schedule, 59, "throttled", old=True)]
    recent = [_slot(schedule, 2, "succeeded", old=False), _slot(schedule, 1, "failed", old=False)]
    manual_old = _run("succeeded", old=True, trigger="manual")
    manual_queued = _run("queued", old=True, trigger="manual")
    manual_recent = _run("succeeded", old=False, trigger="manual")
    other_old = TaskResult.objects.create(task_id="other-old", task_name="celery.backend_cleanup")
    other_recent = TaskResult.objects.create(task_id="other-recent", task_name="celery.backend_cleanup")
    sql(
        f"UPDATE django_celery_results_taskresult SET date_done = now() - interval '{OLD}' WHERE id = %s",
        [other_old.pk],
    )
    return {
        "old_done": old_done,
        "unfinished": unfinished,
        "recent": recent,
        "manual": (manual_old, manual_queued, manual_recent),
        "other": (other_old, other_recent),
    }


def test_prune__keeps_history_keep_unfinished_recent_and_their_runs():
    h = _history()
    counted = retention.count_prunable()

    result = retention.prune_history(batch_size=3)

    # The schedule's newest 5 by slot: 2 recent, 2 unfinished, the newest old finished one.
    kept_old = h["old_done"][-1]
    kept = {sr.pk for sr in (*h["recent"], *h["unfinished"], kept_old)}
    assert set(ScheduledRun.objects.values_list("pk", flat=True)) == kept
    _, manual_queued, manual_recent = h["manual"]
    kept_runs = {sr.run_id for sr in ScheduledRun.objects.filter(run__isnull=False)}
    kept_runs |= {manual_queued.pk, manual_recent.pk}
    assert set(Run.objects.values_list("pk", flat=True)) == kept_runs
    assert set(Finding.objects.values_list("run_id", flat=True)) == kept_runs
    assert set(RunAttempt.objects.values_list("run_id", flat=True)) == kept_runs
    run_tasks = set(Run.objects.values_list("task_id", flat=True))
    assert set(TaskResult.objects.values_list("task_id", flat=True)) == run_tasks | {"other-recent"}

    # 9 old finished slots (7 with a run: skipped ones have none), their 7 runs plus the old manual one.
    assert (result.scheduled_runs, result.runs, result.findings, result.task_results) == (9, 8, 8, 9)
    assert result.done
    # The dry run counted exactly that.
    assert (counted.scheduled_runs, counted.runs, counted.findings, counted.task_results) == (9, 8, 8, 9)
    # Nothing more to do.
    assert retention.prune_history().total == 0


def test_prune_history_command__dry_run_deletes_nothing(capsys):
    _history()
    before = (ScheduledRun.objects.count(), Run.objects.count(), TaskResult.objects.count())
    call_command("prune_history", "--dry-run")
    assert "Would delete (keeping 30 days): 9 scheduled runs, 8 runs, 8 findings, 9 task results" in (
        capsys.readouterr().out
    )
    assert (ScheduledRun.objects.count(), Run.objects.count(), TaskResult.objects.count()) == before
    call_command("prune_history")
    assert "Deleted (keeping 30 days): 9 scheduled runs, 8 runs, 8 findings, 9 task results" in (
        capsys.readouterr().out
    )
    call_command("prune_history", "--keep-days", "0")
    assert "Retention is off" in capsys.readouterr().out


def test_prune__a_time_budget_stops_between_batches_and_the_cursor_goes_on():
    _history()
    first = retention.prune_history(budget_seconds=0)
    assert not first.done
    assert first.total == 0
    total, cursor, slices = 0, {}, 0
    while True:
        part = retention.prune_history(budget_seconds=0.001, cursor=cursor, batch_size=2)
        total += part.total
        slices += 1
        if part.done:
            break
        cursor = part.cursor
    assert total == 9 + 8 + 8 + 9
    assert slices > 1


@pytest.mark.django_db(transaction=True)
def test_prune__skips_rows_another_session_holds_and_never_waits_for_them():
    h = _history()
    held = h["old_done"][0]
    db = connection.settings_dict
    side = psycopg2.connect(
        dbname=db["NAME"],
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or "",
        host=db["HOST"],
        port=db["PORT"],
    )
    try:
        with side.cursor() as cursor:
            cursor.execute("SELECT 1 FROM schedules_scheduledrun WHERE id = %s FOR UPDATE", [held.pk])
        # A wait on that lock would fail here instead of hanging the test.
        sql("SET lock_timeout = '2s'")
        result = retention.prune_history()
    finally:
        side.rollback()
        side.close()
        sql("SET lock_timeout = 0")
    assert result.scheduled_runs == 8
    assert ScheduledRun.objects.filter(pk=held.pk).exists()
    assert retention.prune_history().scheduled_runs == 1  # taken on the next pass


def test_history_keep_days_zero__keeps_everything(settings):
    _history()
    settings.HISTORY_KEEP_DAYS = 0
    assert retention.prune_history().total == 0
    assert retention.count_prunable().total == 0


@pytest.mark.django_db(transaction=True)
def test_prune_history_if_due__a_failure_is_logged_not_raised_and_it_is_rate_limited(caplog, monkeypatch):
    _history()
    monkeypatch.setattr(retention, "_next_prune", 0.0)
    db = connection.settings_dict
    side = psycopg2.connect(
        dbname=db["NAME"],
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or "",
        host=db["HOST"],
        port=db["PORT"],
    )
    try:
        with side.cursor() as cursor:
            cursor.execute("LOCK TABLE django_celery_results_taskresult IN ACCESS EXCLUSIVE MODE")
        sql("SET lock_timeout = '300ms'")
        assert retention.prune_history_if_due() is None
    finally:
        side.rollback()
        side.close()
        sql("SET lock_timeout = 0")
    assert "history pruning failed" in caplog.text
    assert sql("SELECT 1") == [(1,)]  # the connection is fine for the dispatch that follows
    # Not due again for PRUNE_EVERY_SECONDS.
    assert retention.prune_history_if_due() is None
    runs_left = Run.objects.count()
    monkeypatch.setattr(retention, "_next_prune", 0.0)
    assert retention.prune_history_if_due().done
    assert Run.objects.count() < runs_left  # the runs the failed pass left are pruned now


def test_history_keep__is_a_schedule_field_of_the_api(api):
    sleep_job()
    created = api.post(
        "/api/schedules/",
        {
            "name": "keep-7",
            "job_key": "sleep",
            "schedule_type": "interval",
            "interval_minutes": 5,
            "history_keep": 7,
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert created.json()["history_keep"] == 7
    assert api.get("/api/schedules/", format="json").json()["results"][0]["history_keep"] == 7
    bad = api.patch(f"/api/schedules/{created.json()['id']}/", {"history_keep": -1}, format="json")
    assert bad.status_code == 400
    assert "history_keep" in bad.json()
    default = api.post(
        "/api/schedules/",
        {"name": "keep-default", "job_key": "sleep", "schedule_type": "interval", "interval_minutes": 5},
        format="json",
    )
    assert default.json()["history_keep"] == 100
