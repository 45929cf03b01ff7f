"""Flower names the work (issue 17.4): each run message carries the job and schedule as Celery's
`shadow` name and the run as `argsrepr` (what Flower's task list shows); the admin's and dashboard's
run pages link to the task in Flower. And a real Flower counts a failed run as a failed task (issue 30).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django_celery_results.models import TaskResult

from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService
from schedules import services
from schedules.dispatch import message_for, run_now
from schedules.models import ScheduledRun
from schedules.publishing import publish_messages
from tests.scheduler_support import db_now, free_port, make_schedule, sleep_job
from tests.support import process_env, wait_for
from tests.workerproc import BASE_DIR, CELERY, running_worker

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


# --- a real Flower: a failed run is a FAILURE ------------------------------------------------------------


class Flower:
    def __init__(self, port: int, auth: str) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.auth = "Basic " + base64.b64encode(auth.encode()).decode()

    def get(self, path: str):
        request = urllib.request.Request(self.url + path, headers={"Authorization": self.auth})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def answers(self) -> bool:
        try:
            self.get("/api/workers?status=true")
            return True
        except (OSError, urllib.error.HTTPError):
            return False


@pytest.fixture
def flower(tmp_path) -> Iterator[Flower]:
    """Flower as operators start it (`celery -A project flower`, basic auth), on this test's broker."""
    port, auth = free_port(), f"ops:{secrets.token_urlsafe(12)}"
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen(
            [
                CELERY,
                "-A",
                "project",
                "flower",
                "--address=127.0.0.1",
                f"--port={port}",
                f"--basic-auth={auth}",
            ],
            cwd=BASE_DIR,
            env=process_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = Flower(port, auth)
    try:
        wait_for(lambda: proc.poll() is not None or handle.answers(), timeout=60, what="flower listening")
        assert proc.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
        yield handle
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


def _publish(job: Job, text: str) -> Run:
    run = OrchestratorService.launch(job=job, custom_directive_text=text, task3_scope="allowlist")
    publish_messages([message_for(job, run, None)])
    return run


def _ended(run: Run) -> Run | None:
    run.refresh_from_db()
    return run if run.status in ("succeeded", "failed") else None


@pytest.mark.slow
def test_flower_shows_a_failed_run_as_failure_and_a_succeeded_one_as_success(flower, redis_client, tmp_path):
    failing, _ = Job.objects.get_or_create(
        key="failing", defaults={"name": "failing", "queue": "jobs.failing"}
    )
    queues = ["jobs.sleep", "jobs.failing"]
    with running_worker(queues, tmp_path=tmp_path, name="flw", include="tests.worker_jobs"):
        # Flower follows the workers' events from now on: its events show this worker alive.
        wait_for(lambda: any(flower.get("/api/workers?status=true").values()), timeout=60, what="worker seen")
        ok, failed = _publish(sleep_job(), "0.1"), _publish(failing, "0")
        ok = wait_for(lambda: _ended(ok), timeout=90, what="the succeeding run ended")
        failed = wait_for(lambda: _ended(failed), timeout=90, what="the failing run ended")

        def states() -> dict[str, str] | None:
            tasks = flower.get("/api/tasks")
            found = {
                task_id: tasks[task_id]["state"]
                for task_id in (ok.task_id, failed.task_id)
                if task_id in tasks
            }
            return found if "STARTED" not in found.values() and len(found) == 2 else None

        seen = wait_for(states, timeout=30, interval=0.5, what="both tasks ended in Flower")
        # A failed task is acknowledged like any other (acks_late): its message is not delivered again.
        wait_for(lambda: redis_client.hlen("unacked") == 0, timeout=30, what="both messages acknowledged")
        assert redis_client.llen("jobs.failing") == 0
    assert (ok.status, failed.status) == ("succeeded", "failed"), failed.error_summary
    assert seen == {ok.task_id: "SUCCESS", failed.task_id: "FAILURE"}
    # And its workers page counts one failure and one success for the worker.
    (counted,) = [
        w for w in flower.get("/workers?json=1")["data"] if w.get("hostname", "").startswith("flw@")
    ]
    assert (counted.get("task-failed"), counted.get("task-succeeded")) == (1, 1)
    # What Flower and the result say of the failure is the run's short summary, never the job's message.
    task = flower.get(f"/api/task/info/{failed.task_id}")
    assert failed.error_summary in task["exception"]
    assert failed.error_summary == "task fail failed: ValueError"
    assert "hunter2" not in json.dumps(task)
    result = TaskResult.objects.get(task_id=failed.task_id)
    assert result.status == "FAILURE"
    assert "hunter2" not in result.result + (result.traceback or "")
    assert TaskResult.objects.get(task_id=ok.task_id).status == "SUCCESS"
    assert Run.objects.get(pk=failed.pk).attempt == 1
