"""The Django admin: every model registered, schedule timing readable, saves and actions via the services."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib import admin
from django.test import Client
from django.utils import timezone

from orchestrator.models import Directive, Job, Run
from schedules import services
from schedules.models import Schedule, ScheduledRun
from schedules.timing import ScheduleSpec, describe
from tests.support import admin_schedule_form, wait_for

pytestmark = pytest.mark.django_db

CHANGELISTS = [
    "/admin/orchestrator/job/",
    "/admin/orchestrator/directive/",
    "/admin/orchestrator/run/",
    "/admin/schedules/schedule/",
    "/admin/schedules/scheduledrun/",
]


def _schedule(name="every-10", **fields) -> Schedule:
    base = {"job": Job.objects.get(key="log_triage"), "schedule_type": "interval", "interval_minutes": 10}
    return services.create_schedule(name=name, **{**base, **fields})


def test_every_model_is_registered():
    from schedules.models import Schedule, ScheduledRun

    for model in (Job, Directive, Run, Schedule, ScheduledRun):
        assert admin.site.is_registered(model), model


@pytest.mark.parametrize("url", CHANGELISTS)
def test_changelists_load_for_staff(staff, url):
    schedule = _schedule()
    ScheduledRun.objects.create(schedule=schedule, trigger="manual", scheduled_for=timezone.now())
    Directive.objects.create(key="d", name="D", text="t", job=schedule.job)
    response = staff.get(url)
    assert response.status_code == 200


@pytest.mark.parametrize("url", [*CHANGELISTS, "/admin/schedules/schedule/add/"])
def test_non_staff_is_redirected_to_login(django_user_model, url):
    client = Client()
    client.force_login(django_user_model.objects.create_user(username="pleb", password="pw-pleb-123"))
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert Client().get(url).status_code == 302


def test_schedule_changelist_shows_readable_timing(staff):
    _schedule()
    _schedule(
        name="nightly",
        schedule_type="cron",
        interval_minutes=None,
        cron_expr="0 2 * * *",
        timezone="Europe/London",
    )
    content = staff.get("/admin/schedules/schedule/").content.decode()
    assert "every 10 minutes" in content
    assert "At 02:00 AM, Europe/London" in content


def test_schedule_change_page_shows_upcoming_and_recent_runs(staff):
    schedule = _schedule()
    ScheduledRun.objects.create(
        schedule=schedule, scheduled_for=timezone.now(), status="skipped", error_summary="overlap"
    )
    response = staff.get(f"/admin/schedules/schedule/{schedule.pk}/change/")
    assert response.status_code == 200
    content = response.content.decode()
    assert "All history (1)" in content
    assert "overlap" in content
    assert "next 5 runs" in content.lower()


# --- Saves go through the service: validation and next_run_at ----------------------------------------


def test_admin_add__computes_next_run_at(staff):
    response = staff.post("/admin/schedules/schedule/add/", admin_schedule_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    schedule = Schedule.objects.get(name="admin-made")
    assert timedelta(minutes=14) < schedule.next_run_at - timezone.now() <= timedelta(minutes=15)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"schedule_type": "cron", "interval_minutes": ""}, "Required for a cron schedule"),
        (
            {"schedule_type": "cron", "interval_minutes": "", "cron_expr": "61 * * * *"},
            "invalid cron expression",
        ),
        ({"cron_expr": "0 2 * * *"}, "Must be empty for an interval schedule"),
        ({"interval_minutes": ""}, "Required for an interval schedule"),
        ({"interval_minutes": "0"}, "Must be at least 1"),
        ({"timezone": "Mars/Base"}, "Unknown timezone"),
        ({"max_global": "0"}, "positive integer"),
        ({"job": "__disabled__"}, "is disabled"),
        ({"directive": "__directive__", "custom_directive_text": "both"}, "not both"),
    ],
)
def test_admin_add__invalid_is_shown_on_the_form_and_nothing_saved(staff, overrides, message):
    if overrides.get("job") == "__disabled__":
        Job.objects.filter(key="sleep").update(enabled=False)
        overrides = {**overrides, "job": Job.objects.get(key="sleep").pk}
    if overrides.get("directive") == "__directive__":
        overrides = {**overrides, "directive": Directive.objects.create(key="d", name="D", text="t").pk}
    response = staff.post("/admin/schedules/schedule/add/", admin_schedule_form(**overrides))
    assert response.status_code == 200
    assert message in response.content.decode()
    assert not Schedule.objects.exists()


def test_admin_add__duplicate_name_is_refused(staff):
    _schedule(name="admin-made")
    response = staff.post("/admin/schedules/schedule/add/", admin_schedule_form())
    assert response.status_code == 200
    assert Schedule.objects.count() == 1


def test_admin_change__timing_change_recomputes_next_run_other_changes_do_not(staff):
    schedule = _schedule()
    url = f"/admin/schedules/schedule/{schedule.pk}/change/"
    data = admin_schedule_form(name=schedule.name, interval_minutes="10", max_global="4")
    assert staff.post(url, data).status_code == 302
    schedule_after = Schedule.objects.get(pk=schedule.pk)
    assert (schedule_after.max_global, schedule_after.next_run_at) == (4, schedule.next_run_at)

    assert staff.post(url, {**data, "interval_minutes": "120"}).status_code == 302
    schedule_after = Schedule.objects.get(pk=schedule.pk)
    assert timedelta(minutes=119) < schedule_after.next_run_at - timezone.now() <= timedelta(minutes=120)


def test_admin_change__keeps_the_schedulers_fields(staff):
    schedule = _schedule()
    last = timezone.now().replace(microsecond=0) - timedelta(minutes=3)
    Schedule.objects.filter(pk=schedule.pk).update(last_run_at=last, claimed_by="beat-9")
    staff.post(
        f"/admin/schedules/schedule/{schedule.pk}/change/",
        admin_schedule_form(name=schedule.name, max_per_job="2"),
    )
    schedule_after = Schedule.objects.get(pk=schedule.pk)
    assert (schedule_after.max_per_job, schedule_after.last_run_at, schedule_after.claimed_by) == (
        2,
        last,
        "beat-9",
    )


# --- Actions ------------------------------------------------------------------------------------------


def _action(client: Client, action: str, *schedules: Schedule):
    return client.post(
        "/admin/schedules/schedule/",
        {"action": action, "_selected_action": [s.pk for s in schedules]},
        follow=True,
    )


def test_action_disable_then_enable(staff):
    first, second = _schedule(name="a"), _schedule(name="b")
    response = _action(staff, "disable", first, second)
    assert response.status_code == 200
    assert not Schedule.objects.filter(enabled=True).exists()

    Schedule.objects.update(next_run_at=timezone.now() - timedelta(hours=3))
    _action(staff, "enable", first)
    first.refresh_from_db()
    assert first.enabled
    assert first.next_run_at > timezone.now()
    assert not Schedule.objects.get(pk=second.pk).enabled


@pytest.mark.django_db(transaction=True)
def test_action_run_now__queues_a_manual_run(staff, redis_client):
    schedule = _schedule(enabled=False)
    response = _action(staff, "run_now", schedule)
    assert response.status_code == 200
    scheduled_run = ScheduledRun.objects.get(schedule=schedule)
    assert (scheduled_run.trigger, scheduled_run.status) == ("manual", "queued")
    wait_for(lambda: redis_client.llen("jobs.log_triage") == 1, timeout=10, what="message on queue")


# --- Jobs and runs ------------------------------------------------------------------------------------


def _job_form(job: Job, **fields: str) -> dict[str, str]:
    """The job change form as the admin posts it, with `fields` set."""
    return {
        "name": job.name,
        "description": job.description,
        "enabled": "on",
        "timeout_seconds": "60",
        "task3_allowlist": "[]",
        "_save": "Save",
        **fields,
    }


def test_job_admin__refuses_a_zero_cap_and_cannot_add(staff):
    job = Job.objects.get(key="sleep")
    url = f"/admin/orchestrator/job/{job.pk}/change/"
    data = _job_form(job, max_concurrency="0")
    response = staff.post(url, data)
    assert response.status_code == 200
    assert Job.objects.get(pk=job.pk).max_concurrency is None

    assert staff.post(url, {**data, "max_concurrency": "3"}).status_code == 302
    assert Job.objects.get(pk=job.pk).max_concurrency == 3
    assert staff.get("/admin/orchestrator/job/add/").status_code == 403


def test_job_admin__rate_limit_is_validated_and_stored_canonical(staff):
    job = Job.objects.get(key="sleep")
    url = f"/admin/orchestrator/job/{job.pk}/change/"
    data = _job_form(job, rate_limit="5 a second")
    response = staff.post(url, data)
    assert response.status_code == 200
    assert "N/s, N/m or N/h" in response.content.decode()
    assert Job.objects.get(pk=job.pk).rate_limit is None

    assert staff.post(url, {**data, "rate_limit": " 5 / s"}).status_code == 302
    assert Job.objects.get(pk=job.pk).rate_limit == "5/s"
    assert staff.post(url, {**data, "rate_limit": ""}).status_code == 302
    assert Job.objects.get(pk=job.pk).rate_limit is None


def test_run_admin__is_view_only(staff):
    run = Run.objects.create(job=Job.objects.get(key="sleep"))
    url = f"/admin/orchestrator/run/{run.pk}/change/"
    assert staff.get(url).status_code == 200
    assert staff.post(url, {"status": "succeeded"}).status_code == 403
    assert Run.objects.get(pk=run.pk).status == "queued"


# --- describe -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (ScheduleSpec("interval", 10), "every 10 minutes"),
        (ScheduleSpec("interval", 60), "every hour"),
        (ScheduleSpec("interval", 90), "every 90 minutes"),
        (ScheduleSpec("interval", 2880), "every 2 days"),
        (ScheduleSpec("cron", None, "0 2 * * *", "Europe/London"), "At 02:00 AM, Europe/London"),
        (ScheduleSpec("cron", None, "30 14 * * 1-5", "UTC"), "At 02:30 PM, Monday through Friday, UTC"),
        (ScheduleSpec("cron", None, "*/15 * * * *", "UTC"), "Every 15 minutes, UTC"),
        (
            ScheduleSpec("cron", None, "0 0 1 1 *", "UTC"),
            "At 12:00 AM, on day 1 of the month, only in January, UTC",
        ),
        (ScheduleSpec("cron", None, "0 0 1 * 1", "UTC"), "cron 0 0 1 * 1 (UTC)"),
        (
            ScheduleSpec("cron", None, "5,35 1-3 * * *", "UTC"),
            "At 5 and 35 minutes past the hour, between 01:00 AM and 03:59 AM, UTC",
        ),
    ],
)
def test_describe__phrases_common_timings(spec, text):
    assert describe(spec) == text
