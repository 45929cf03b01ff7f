"""OrchestratorService: the one path that creates runs (manual and scheduled) and executes them."""

from __future__ import annotations

import logging
from typing import Any

from django.utils import timezone

from orchestrator.jobs.registry import TaskContext, get_job_spec
from orchestrator.models import Directive, Job, Run, RunStatus, Task3Scope, Trigger

logger = logging.getLogger(__name__)


class OrchestratorError(Exception):
    """Base for the orchestrator's domain errors."""


class JobDisabled(OrchestratorError):
    pass


class TaskFailed(OrchestratorError):
    def __init__(self, task: str, summary: str) -> None:
        super().__init__(f"task {task} failed: {summary}")
        self.task = task
        self.summary = summary


class OrchestratorService:
    @staticmethod
    def launch(
        *,
        job: Job,
        directive: Directive | None = None,
        custom_directive_text: str = "",
        trigger: str = Trigger.MANUAL,
        task3_scope: str = Task3Scope.ALLOWLIST,
        task_id: str = "",
    ) -> Run:
        """Create a queued `Run`. The caller publishes its message after commit.

        Directive and custom text are exclusive; the database constraint holds it too.
        """
        if directive is not None and custom_directive_text:
            raise ValueError("a run takes a directive or custom directive text, not both")
        return Run.objects.create(
            job=job,
            directive=directive,
            custom_directive_text=custom_directive_text,
            trigger=trigger,
            task3_scope=task3_scope,
            status=RunStatus.QUEUED,
            task_id=task_id,
        )

    @staticmethod
    def execute(run: Run) -> dict[str, Any]:
        """Run the job's three tasks in order; return `stats`. Raises `TaskFailed` on a failed task.

        The caller (the worker) owns the run's status transitions; this only does the work.
        """
        spec = get_job_spec(run.job.key)
        previous: dict[str, dict[str, Any]] = {}
        stats: dict[str, Any] = {"tasks": {}}
        for task in spec.tasks:
            ctx = TaskContext(
                run_id=run.pk,
                job_key=spec.key,
                directive_text=run.directive_text,
                task3_scope=run.task3_scope,
                previous=dict(previous),
            )
            started = timezone.now()
            try:
                result = task.func(ctx)
            except Exception as exc:
                stats["tasks"][task.name] = {"outcome": "failed", "error": type(exc).__name__}
                raise TaskFailed(task.name, type(exc).__name__) from exc
            previous[task.name] = result
            stats["tasks"][task.name] = {
                "outcome": "succeeded",
                "seconds": round((timezone.now() - started).total_seconds(), 3),
                **{k: v for k, v in result.items() if isinstance(v, int | float)},
            }
        return stats
