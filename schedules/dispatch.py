"""Creating scheduled runs: dispatching a due slot (the scheduler) and run-now (the API and admin)."""

from __future__ import annotations

import uuid

from django.db import transaction
from django.utils import timezone

from orchestrator.models import Job, Run, Trigger
from orchestrator.services import OrchestratorService
from schedules.models import Schedule, ScheduledRun, ScheduledRunStatus
from schedules.publishing import RunMessage, publish_on_commit


def message_for(job: Job, run: Run, scheduled_run: ScheduledRun | None) -> RunMessage:
    return RunMessage(
        task_id=run.task_id,
        run_id=run.pk,
        scheduled_run_id=scheduled_run.pk if scheduled_run is not None else None,
        job_key=job.key,
        queue=job.queue or f"jobs.{job.key}",
    )


def launch_run(
    *,
    job: Job,
    directive=None,
    custom_directive_text: str = "",
    trigger: str = Trigger.MANUAL,
    task3_scope: str,
) -> Run:
    """Create a `Run` with its Celery task id through the orchestrator (the one launch path)."""
    return OrchestratorService.launch(
        job=job,
        directive=directive,
        custom_directive_text=custom_directive_text,
        trigger=trigger,
        task3_scope=task3_scope,
        task_id=str(uuid.uuid4()),
    )


@transaction.atomic
def run_now(schedule: Schedule) -> ScheduledRun:
    """Launch the schedule's job now, outside its slots. Works on a disabled schedule; caps still apply."""
    run = launch_run(
        job=schedule.job,
        directive=schedule.directive,
        custom_directive_text=schedule.custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=schedule.task3_scope,
    )
    scheduled_run = ScheduledRun.objects.create(
        schedule=schedule,
        run=run,
        trigger=Trigger.MANUAL,
        scheduled_for=timezone.now(),
        status=ScheduledRunStatus.QUEUED,
        task_id=run.task_id,
    )
    publish_on_commit([message_for(schedule.job, run, scheduled_run)])
    return scheduled_run


@transaction.atomic
def launch_manual_run(*, job: Job, directive=None, custom_directive_text: str = "", task3_scope: str) -> Run:
    """POST /api/runs/: a manual launch with no schedule."""
    run = launch_run(
        job=job,
        directive=directive,
        custom_directive_text=custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=task3_scope,
    )
    publish_on_commit([message_for(job, run, None)])
    return run
