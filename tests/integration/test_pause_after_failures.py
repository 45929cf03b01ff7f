"""pause_after_failures (issue 32.4) against PostgreSQL: what counts toward the streak, the pause and its
change record, enable counting afresh, exactly one pause under racing evaluations and no pause undoing
an enable that raced it; the field through the API, the admin, sync_schedules, the dashboard and
/metrics. The real scheduler and worker: tests/acceptance/test_pause_after_failures.py."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction

from monitoring import alerts, metrics
from schedules import services
from schedules.models import Alert, Schedule, ScheduleChange, ScheduledRun
from tests.scheduler_support import db_now, make_schedule, sql
from tests.support import wait_for

NOTE = "paused after 3 consecutive failures"


def settled(schedule: Schedule, *statuses: str) -> None:
    """Scheduled slots one minute apart after the schedule's latest, in the order given."""
    latest = ScheduledRun.objects.filter(schedule=schedule).first()
    at = latest.scheduled_for if latest else db_now() - timedelta(hours=1)
    for status in statuses:
        at += timedelta(minutes=1)
        ScheduledRun.objects.create(
            schedule=schedule, scheduled_for=at, status=status, started_at=at, finished_at=at
        )


def evaluate() -> alerts.Evaluation:
    return alerts.evaluate(grace=3600)


def system_changes(schedule: Schedule):
    return ScheduleChange.objects.filter(schedule_id=schedule.pk, source="system")


@pytest.fixture
def quiet(settings):
    settings.ALERT_WEBHOOK_URLS = []  # the claims happen; nobody is called
    yield
    # The claims go to this process's sender thread, which writes to the database: let it finish before
    # the test database is flushed (a TRUNCATE racing its statements deadlocks).
    assert alerts.sender().drain(timeout=30)


@pytest.mark.django_db(transaction=True)
def test_n_consecutive_failed_slots_pause_once_with_the_note_an_alert_and_one_change(quiet):
    s = make_schedule("pausing", pause_after_failures=3, alert_after_failures=0)
    # A success breaks the streak; skipped and cancelled slots neither count nor break it.
    settled(s, "failed", "failed", "succeeded", "failed", "skipped", "failed", "cancelled")
    assert evaluate().paused == 0
    s.refresh_from_db()
    assert s.enabled
    assert not Alert.objects.filter(schedule=s).exists()

    settled(s, "failed")
    assert evaluate().paused == 1
    s.refresh_from_db()
    assert (s.enabled, s.paused_note, s.paused_by) == (False, NOTE, "scheduler")
    assert s.paused_at is not None
    alert = Alert.objects.get(schedule=s)
    assert (alert.kind, alert.resolved_at, alert.details["threshold"]) == ("failing", None, 3)

    (change,) = system_changes(s)
    assert (change.action, change.actor) == ("disable", "scheduler")
    assert change.changes["enabled"] == {"old": True, "new": False}
    assert change.changes["paused_note"] == {"old": "", "new": NOTE}
    assert change.changes["paused_by"] == {"old": "", "new": "scheduler"}

    assert evaluate().paused == 0  # already paused: nothing more
    assert system_changes(s).count() == 1


@pytest.mark.django_db(transaction=True)
def test_enable_clears_the_note_and_only_failures_after_it_count(quiet, api):
    s = make_schedule("re-enabled", pause_after_failures=3)
    settled(s, "failed", "failed", "failed")
    evaluate()
    s.refresh_from_db()
    assert not s.enabled

    body = api.post(f"/api/schedules/{s.pk}/enable").json()
    assert (body["enabled"], body["paused_note"], body["paused_by"], body["paused_at"]) == (
        True,
        "",
        "",
        None,
    )
    assert evaluate().paused == 0, "the failures before the enable do not count again"
    assert Schedule.objects.get(pk=s.pk).enabled

    settled(s, "failed", "failed")
    assert evaluate().paused == 0
    settled(s, "failed")
    assert evaluate().paused == 1
    assert Schedule.objects.get(pk=s.pk).paused_note == NOTE
    assert system_changes(s).count() == 2
    assert Alert.objects.filter(schedule=s, resolved_at__isnull=True).count() == 1  # the same alert


@pytest.mark.django_db(transaction=True)
def test_racing_evaluations_pause_each_schedule_once(quiet):
    """The database's guarantee, without the Redis turn: four evaluations at once on four connections."""
    schedules = [make_schedule(f"race-{i}", pause_after_failures=2) for i in range(20)]
    for s in schedules:
        settled(s, "failed", "failed")
    results: list[alerts.Evaluation] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            results.append(evaluate())
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert sum(r.paused for r in results) == len(schedules)
    assert not Schedule.objects.filter(enabled=True).exists()
    assert ScheduleChange.objects.filter(source="system").count() == len(schedules)


@pytest.mark.django_db(transaction=True)
def test_a_pause_evaluated_before_an_enable_committed_does_not_undo_it(quiet):
    """The evaluation reads the streak, then waits on the row lock of an enable in progress; once the
    enable commits, its UPDATE finds the count restarted and leaves the schedule enabled."""
    s = make_schedule("enable-race", pause_after_failures=2)
    settled(s, "failed", "failed")
    enable_holds = threading.Event()
    release = threading.Event()
    results: list[alerts.Evaluation] = []

    def user() -> None:
        try:
            with transaction.atomic():
                services.disable_schedule(s.pk, note="looking", actor="alice")
                services.enable_schedule(s.pk, actor="alice")
                enable_holds.set()
                release.wait(30)
        finally:
            connection.close()

    def scheduler() -> None:
        try:
            results.append(evaluate())
        finally:
            connection.close()

    user_thread = threading.Thread(target=user)
    user_thread.start()
    assert enable_holds.wait(30)
    scheduler_thread = threading.Thread(target=scheduler)
    scheduler_thread.start()
    wait_for(
        lambda: sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%%consecutive failures%%'"
        )[0][0],
        timeout=30,
        what="the pause waiting on the enable's row lock",
    )
    release.set()
    user_thread.join(30)
    scheduler_thread.join(30)
    assert results
    assert results[0].paused == 0
    s.refresh_from_db()
    assert (s.enabled, s.paused_note) == (True, "")
    assert not system_changes(s).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("value", [0, -1, "three", 1.5, True])
def test_api_refuses_a_bad_pause_after_failures_naming_the_field(api, value):
    body = {"name": "bad", "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 10}
    response = api.post("/api/schedules/", {**body, "pause_after_failures": value}, format="json")
    assert response.status_code == 400, response.content
    assert "pause_after_failures" in response.json()
    created = api.post("/api/schedules/", {**body, "pause_after_failures": 3}, format="json").json()
    assert created["pause_after_failures"] == 3
    url = f"/api/schedules/{created['id']}"
    response = api.patch(url, {"pause_after_failures": value}, format="json")
    assert response.status_code == 400
    assert "pause_after_failures" in response.json()
    assert (
        api.patch(url, {"pause_after_failures": None}, format="json").json()["pause_after_failures"] is None
    )
    change = ScheduleChange.objects.filter(schedule_id=created["id"], action="update").get()
    assert change.changes == {"pause_after_failures": {"old": 3, "new": None}}


@pytest.mark.django_db(transaction=True)
def test_the_constraint_holds_what_the_services_check():
    from django.db import IntegrityError

    s = make_schedule("constrained")
    with pytest.raises(IntegrityError, match="schedule_pause_after_failures_positive"):
        Schedule.objects.filter(pk=s.pk).update(pause_after_failures=0)


@pytest.mark.django_db(transaction=True)
def test_sync_declares_it_and_refuses_a_bad_value(tmp_path):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    text = (
        '[[schedules]]\nname = "synced"\njob_key = "log_triage"\nschedule_type = "interval"\n'
        "interval_minutes = 10\npause_after_failures = {}\n"
    )
    path = tmp_path / "schedules.toml"
    path.write_text(text.format(4))
    call_command("sync_schedules", str(path))
    assert Schedule.objects.get(name="synced").pause_after_failures == 4
    path.write_text(text.format(0))
    with pytest.raises(CommandError, match="pause_after_failures"):
        call_command("sync_schedules", str(path))
    assert Schedule.objects.get(name="synced").pause_after_failures == 4

    pytest.importorskip("yaml", reason="YAML schedules files need PyYAML")
    path = tmp_path / "schedules.yaml"
    path.write_text(
        "schedules:\n  - name: synced\n    job_key: log_triage\n    schedule_type: interval\n"
        "    interval_minutes: 10\n    pause_after_failures: 2\n"
    )
    call_command("sync_schedules", str(path))
    assert Schedule.objects.get(name="synced").pause_after_failures == 2


@pytest.mark.django_db(transaction=True)
def test_admin_form_takes_it_and_the_dashboard_shows_the_pause(quiet, django_user_model):
    from django.test import Client

    staff = Client()
    staff.force_login(django_user_model.objects.create_superuser("root", "r@x.test", "pw-root-123"))
    s = make_schedule("shown")
    url = f"/admin/schedules/schedule/{s.pk}/change/"
    form = staff.get(url).context["adminform"].form
    assert "pause_after_failures" in form.fields
    data = {k: v for k, v in form.initial.items() if v is not None and k in form.fields}
    data.update({"job": s.job_id, "alert_webhook_url": "", "_save": "Save"})
    for bad in ("0", "-2", "x"):
        page = staff.post(url, {**data, "pause_after_failures": bad})
        assert page.status_code == 200
        assert "pause_after_failures" in page.context["adminform"].form.errors
    response = staff.post(url, {**data, "pause_after_failures": "2"})
    assert response.status_code == 302, response.content[-3000:]
    assert Schedule.objects.get(pk=s.pk).pause_after_failures == 2

    settled(s, "failed", "failed")
    evaluate()
    page = staff.get(f"/dashboard/schedules/{s.pk}/").content.decode()
    assert "paused after 2 consecutive failures" in page
    assert "by scheduler" in page
    assert "pauses after 2 consecutive failures" in page
    changes = staff.get(url).content.decode()
    assert "paused after 2 consecutive failures" in changes
    assert "system" in changes


@pytest.mark.django_db(transaction=True)
def test_metrics_count_the_pauses(quiet, redis_client):
    s = make_schedule("counted", pause_after_failures=1)
    settled(s, "failed")
    evaluate()
    assert int(redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "paused")) == 1
    assert b"cb_schedules_paused_after_failures_total 1.0" in metrics.render()
