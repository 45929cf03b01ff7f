"""The worker's side of the run log context (project/logging.py): Celery's task signals bind the run a
pool process executes, from the message's kwargs and task id, and clear it when the task ends, so the
lines of the next task never inherit it. `schedule_id` is added by the worker once it has read the
scheduled run (worker/lifecycle.py)."""

from __future__ import annotations

from typing import Any

from project.logging import bind_run, clear_run

RUN_TASK_NAME = "worker.execute_run"


def _task_prerun(task_id: str | None = None, task: Any = None, kwargs: dict | None = None, **_: Any) -> None:
    if getattr(task, "name", "") != RUN_TASK_NAME:
        return
    kwargs = kwargs or {}
    clear_run()
    bind_run(
        run_id=kwargs.get("run_id"),
        scheduled_run_id=kwargs.get("scheduled_run_id"),
        job=kwargs.get("job_key"),
        task_id=task_id,
    )


def _task_postrun(task: Any = None, **_: Any) -> None:
    if getattr(task, "name", "") == RUN_TASK_NAME:
        clear_run()


def connect_task_signals() -> None:
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(_task_prerun, weak=False, dispatch_uid="cb-run-log-context-pre")
    task_postrun.connect(_task_postrun, weak=False, dispatch_uid="cb-run-log-context-post")
