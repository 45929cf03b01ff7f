"""Flower names the work (issue 17.4): each run message carries the job and schedule as Celery's
`shadow` name and the run as `argsrepr` (what Flower's task list shows); the admin's and dashboard's
run pages link to the task in Flower."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse

from schedules import services
from schedules.dispatch import run_now
from schedules.models import ScheduledRun
from tests.scheduler_support import db_now, make_schedule, sleep_job

pytestmark = pytest.mark.django_db(transaction=True)  # publishing follows the commit


def headers_by_task(redis_client) -> dict[str, dict]:
    messages = [json.loads(raw) for raw in redis_client.lrange("jobs.sleep", 0, -1)]
    return {m["headers"]["id"]: m["headers"] for m in messages}


def test_a_run_message_is_named_after_its_job_schedule_and_run(redis_client):
    schedule = make_schedule("nightly-triage", next_run_at=db_now() + timedelta(hours=1))
    scheduled = run_now(schedule)
    manual = services.launch_run_manually(
        job=sleep_job(), custom_directive_text="0.1", task3_scope="allowlist"
    )

    headers = headers_by_task(redis_client)
    named = headers[scheduled.task_id]
    assert named["task"] == "worker.execute_run", "the worker still runs the one task"
    assert named["shadow"] == "sleep: nightly-triage"
    assert named["argsrepr"] == f"run={scheduled.run_id} scheduled_run={scheduled.pk} 'nightly-triage'"
    assert headers[manual.task_id]["shadow"] == "sleep: manual run"


def test_the_admin_and_the_dashboard_link_a_run_to_its_task_in_flower(django_user_model, settings):
    settings.FLOWER_URL = "http://flower.example:5555"
    staff = django_user_model.objects.create_superuser("root", password="pw-root-12345")
    client = Client()
    client.force_login(staff)
    scheduled = run_now(make_schedule("linked", next_run_at=db_now() + timedelta(hours=1)))
    link = f'href="http://flower.example:5555/task/{scheduled.task_id}"'
    for path in (
        reverse("admin:orchestrator_run_change", args=[scheduled.run_id]),
        reverse("admin:orchestrator_run_changelist"),
        reverse("dashboard:run", args=[scheduled.run_id]),
        reverse("dashboard:schedule", args=[scheduled.schedule_id]),
    ):
        response = client.get(path)
        assert response.status_code == 200, path
        assert link in response.content.decode(), path
    assert ScheduledRun.objects.count() == 1
