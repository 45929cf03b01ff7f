"""What the admin's lists and schedule page show (issue 31.7): the last status and the time zone, `enabled`
near the left, a run-now button that queues a manual run, change history as values, and the run list's
schedule and duration."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from orchestrator.models import Job, Run
from schedules import services
from schedules.models import ChangeSource, Schedule, ScheduledRun
from tests.support import wait_for

pytestmark = pytest.mark.django_db


def _schedule(name="every-10", **fields) -> Schedule:
    base = {"job": Job.objects.get(key="log_triage"), "schedule_type": "interval", "interval_minutes": 10}
    return services.create_schedule(name=name, **{**base, **fields})


def _columns(content: str) -> list[str]:
    return re.findall(r'<th scope="col" class="[^"]*column-([a-z_]+)', content)


def test_schedule_list__shows_last_status_and_timezone_with_enabled_second(staff):
    schedule = _schedule(timezone="Europe/Paris")
    now = timezone.now()
    ScheduledRun.objects.create(schedule=schedule, scheduled_for=now - timedelta(hours=1), status="succeeded")
    ScheduledRun.objects.create(schedule=schedule, scheduled_for=now, status="failed")
    _schedule(name="never-ran")

    content = staff.get("/admin/schedules/schedule/").content.decode()

    columns = _columns(content)
    assert columns[:3] == ["name", "enabled", "last_status"], columns
    assert "timezone" in columns
    assert '<td class="field-last_status">failed</td>' in content  # the newest run's, not the older one's
    assert '<td class="field-last_status">-</td>' in content  # the schedule that never ran
    assert '<td class="field-timezone">Europe/Paris</td>' in content


@pytest.mark.django_db(transaction=True)
def test_schedule_page__run_now_button_queues_a_manual_run(staff, redis_client):
    schedule = _schedule(enabled=False)
    url = f"/admin/schedules/schedule/{schedule.pk}/run-now/"
    page = staff.get(f"/admin/schedules/schedule/{schedule.pk}/change/").content.decode()
    assert f'action="{url}"' in page
    assert staff.get(url).status_code == 405  # a button, not a link

    response = staff.post(url)

    assert response.status_code == 302
    assert response["Location"] == f"/admin/schedules/schedule/{schedule.pk}/change/"
    scheduled_run = ScheduledRun.objects.get(schedule=schedule)
    assert (scheduled_run.trigger, scheduled_run.status) == ("manual", "queued")
    assert Run.objects.get(pk=scheduled_run.run_id).trigger == "manual"
    wait_for(lambda: redis_client.llen("jobs.log_triage") == 1, timeout=10, what="message on queue")
    assert "Queued a manual run" in staff.get(response["Location"]).content.decode()


def test_schedule_page__run_now_needs_change_permission(django_user_model):
    schedule = _schedule()
    user = django_user_model.objects.create_user(username="looker", password="pw-looker-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_schedule"))
    client = Client()
    client.force_login(user)
    page = client.get(f"/admin/schedules/schedule/{schedule.pk}/change/")
    assert page.status_code == 200
    assert "run-now" not in page.content.decode()
    assert client.post(f"/admin/schedules/schedule/{schedule.pk}/run-now/").status_code == 403
    assert not ScheduledRun.objects.filter(schedule=schedule).exists()


def test_schedule_page__change_history_reads_as_values(staff):
    schedule = _schedule()
    services.update_schedule(
        schedule.pk,
        {"interval_minutes": 15, "timezone": "Europe/Paris", "max_runs": 5},
        source=ChangeSource.API,
        actor="alice",
    )
    services.disable_schedule(Schedule.objects.get(pk=schedule.pk), source=ChangeSource.API, actor="alice")

    content = staff.get(f"/admin/schedules/schedule/{schedule.pk}/change/").content.decode()

    assert "interval_minutes: 10 → 15" in content
    assert "timezone: UTC → Europe/Paris" in content
    assert "max_runs: none → 5" in content
    assert "enabled: yes → no" in content
    assert "&#x27;UTC&#x27;" not in content
    assert "None" not in content


def test_run_list__shows_schedule_and_duration(staff):
    schedule = _schedule(name="nightly-triage")
    started = timezone.now() - timedelta(minutes=5)
    run = Run.objects.create(
        job=schedule.job,
        trigger="schedule",
        status="succeeded",
        started_at=started,
        finished_at=started + timedelta(seconds=12.3),
    )
    ScheduledRun.objects.create(schedule=schedule, run=run, scheduled_for=started, status="succeeded")
    Run.objects.create(
        job=schedule.job, status="failed", started_at=started, finished_at=started + timedelta(seconds=245)
    )
    Run.objects.create(job=schedule.job, status="running", started_at=started)  # manual, unfinished

    content = staff.get("/admin/orchestrator/run/").content.decode()

    columns = _columns(content)
    assert "schedule" in columns
    assert "duration" in columns
    link = f'<a href="/admin/schedules/schedule/{schedule.pk}/change/">nightly-triage</a>'
    assert f'<td class="field-schedule">{link}</td>' in content
    assert '<td class="field-duration">12.3 s</td>' in content
    assert '<td class="field-duration">4 min 05 s</td>' in content
    assert '<td class="field-duration">-</td>' in content
