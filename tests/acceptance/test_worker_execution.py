"""Runs through a real worker (started with `manage.py run_worker`): at most once, time limits, results."""

from __future__ import annotations

import json

import pytest
from django.db import transaction
from django.utils import timezone
from django_celery_results.models import TaskResult

from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService
from project.celery import app as celery_app
from schedules import services
from schedules.dispatch import message_for
from schedules.models import Schedule, ScheduledRun
from schedules.publishing import publish_messages
from tests.support import wait_for
from tests.workerproc import start_run_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def worker(redis_client, tmp_path):
    """One worker started the way operators start it: `manage.py run_worker --jobs sleep`."""
    handle = start_run_worker(tmp_path=tmp_path)
    try:
        assert "worker on queues: jobs.sleep" in handle.log()
        yield handle
    finally:
        handle.stop()


def _schedule(text: str, **fields) -> Schedule:
    return Schedule.objects.create(
        name=f"exec-{Schedule.objects.count()}",
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=text,
        overlap_policy="allow",
        **fields,
    )


def _unpublished_scheduled_run(schedule: Schedule) -> ScheduledRun:
    """A scheduled run whose message the test publishes itself (to deliver it more than once)."""
    with transaction.atomic():
        run = OrchestratorService.launch(
            job=schedule.job,
            custom_directive_text=schedule.custom_directive_text,
            trigger="schedule",
            task3_scope=schedule.task3_scope,
        )
        return ScheduledRun.objects.create(
            schedule=schedule, run=run, trigger="schedule", scheduled_for=timezone.now(), task_id=run.task_id
        )


def _finished(run_id: int) -> Run | None:
    run = Run.objects.get(pk=run_id)
    return run if run.status in {"succeeded", "failed"} else None


def test_same_message_delivered_twice__executes_once(worker):
    scheduled = _unpublished_scheduled_run(_schedule("1"))
    message = message_for(scheduled.schedule.job, scheduled.run, scheduled)
    publish_messages([message, message])  # two deliveries at once, one per pool process

    run = wait_for(lambda: _finished(scheduled.run_id), timeout=90, what="run finished")
    assert run.status == "succeeded"
    assert run.attempt == 1
    finished_at = run.finished_at

    publish_messages([message])  # and a late third delivery
    wait_for(lambda: worker.log().count("message dropped") >= 2, timeout=60, what="duplicates dropped")
    run.refresh_from_db()
    assert (run.status, run.attempt, run.finished_at) == ("succeeded", 1, finished_at)
    assert worker.log().count(f"run started attempt=1 job=sleep run_id={run.pk} ") == 1
    scheduled.refresh_from_db()
    assert scheduled.status == "succeeded"
    assert scheduled.worker == run.worker
    assert run.worker.startswith("rw@")
    # The duplicates stored nothing: the TaskResult is the real run's.
    result = TaskResult.objects.get(task_id=run.task_id)
    assert result.status == "SUCCESS"
    assert result.task_name == "worker.execute_run"
    assert '"status": "succeeded"' in result.result


def test_manual_run__succeeds_and_mirrors_a_small_result(worker):
    run = services.launch_run_manually(
        job=Job.objects.get(key="sleep"), custom_directive_text="0.1", task3_scope="allowlist"
    )
    run = wait_for(lambda: _finished(run.pk), timeout=90, what="manual run finished")
    assert run.status == "succeeded", run.error_summary
    assert run.started_at <= run.finished_at
    assert run.worker.startswith("rw@")
    assert run.heartbeat_at is not None
    # Celery stored the task's result through django-celery-results once the task returned.
    result = wait_for(
        lambda: TaskResult.objects.filter(task_id=run.task_id).first(), timeout=30, what="task result stored"
    )
    assert result.status == "SUCCESS"
    assert len(result.result) < 2000
    assert (result.task_name, result.content_type, result.content_encoding) == (
        "worker.execute_run",
        "application/json",
        "utf-8",
    )
    assert result.worker.startswith("rw@")
    assert f"'run_id': {run.pk}" in json.loads(result.task_kwargs)
    meta = celery_app.backend.get_task_meta(run.task_id)
    assert meta["status"] == "SUCCESS"
    assert meta["result"]["run_id"] == run.pk
    assert meta["result"]["status"] == "succeeded"
    assert meta["result"]["counts"]["tasks"]["report"]["ok"] == 1
    assert meta["children"] == []


def test_run_over_its_timeout__ends_failed_saying_so(worker):
    Job.objects.filter(key="sleep").update(timeout_seconds=2)
    scheduled = _unpublished_scheduled_run(_schedule("60"))
    publish_messages([message_for(scheduled.schedule.job, scheduled.run, scheduled)])

    run = wait_for(lambda: _finished(scheduled.run_id), timeout=60, what="timed-out run finished")
    assert run.status == "failed"
    assert "timed out" in run.error_summary or "time limit" in run.error_summary, run.error_summary
    assert (run.finished_at - run.started_at).total_seconds() < 30
    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("failed", run.error_summary)
    # The task failed too (what Flower counts), acknowledged: its message was not delivered again.
    result = wait_for(
        lambda: TaskResult.objects.filter(task_id=run.task_id).first(), timeout=30, what="task result stored"
    )
    assert result.status == "FAILURE"
    assert json.loads(result.result)["exc_message"] == [run.error_summary]
    assert Run.objects.get(pk=run.pk).attempt == 1
