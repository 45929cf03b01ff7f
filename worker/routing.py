"""Per-job queues: each job's run messages go to `jobs.<key>` (or the job's own `Job.queue`).

A queue per job lets operators give a slow or expensive job its own workers (`run_worker --jobs
log_triage`) without starving the others. Publishers name the queue explicitly (schedules/publishing);
the router below is the fallback for anything that sends the task by name without one (Flower, shell).
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

from orchestrator.models import default_queue
from schedules.publishing import RUN_TASK_NAME  # the task name is the publisher's contract


class UnknownJobs(ValueError):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(f"unknown or disabled jobs: {', '.join(keys)}")
        self.keys = keys


def queue_name(job_key: str) -> str:
    return default_queue(job_key)


def route_run(name: str, args: Any, kwargs: Any, options: dict, task: Any = None, **kw: Any) -> dict | None:
    """Celery router (task_routes): a run message without an explicit queue goes to its job's queue."""
    if name != RUN_TASK_NAME or not kwargs or not kwargs.get("job_key"):
        return None
    return {"queue": queue_name(kwargs["job_key"]), "routing_key": queue_name(kwargs["job_key"])}


def worker_queue_names(job_keys: list[str] | None = None) -> list[str]:
    """The queues a worker consumes: the named jobs' (each must exist and be enabled), else every
    enabled job's."""
    from orchestrator.models import Job

    enabled = {job.key: job.queue or queue_name(job.key) for job in Job.objects.filter(enabled=True)}
    if not job_keys:
        return sorted(set(enabled.values()))
    missing = [key for key in job_keys if key not in enabled]
    if missing:
        raise UnknownJobs(missing)
    return sorted({enabled[key] for key in job_keys})


def worker_queues(job_keys: list[str] | None = None) -> list[Queue]:
    # Queue name = routing key on the default direct exchange, as Celery declares missing queues.
    return [Queue(name, routing_key=name) for name in worker_queue_names(job_keys)]
