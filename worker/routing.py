"""Per-job queues: each job's run messages go to `jobs.<key>` (or the job's own `Job.queue`).

A queue per job lets operators give a slow or expensive job its own workers (`run_worker --jobs
log_triage`) without starving the others. Publishers name the queue explicitly (schedules/publishing);
the router below is the fallback for anything that sends the task by name without one (Flower, shell).
"""

from __future__ import annotations

from typing import Any

from orchestrator.models import Job, default_queue
from schedules.publishing import RUN_TASK_NAME  # the task name is the publisher's contract


class UnknownJobs(ValueError):
    """Jobs named to a worker that do not exist or are disabled."""


def route_run(name: str, args: Any, kwargs: Any, options: dict, task: Any = None, **kw: Any) -> dict | None:
    """Celery router (task_routes): a run message without an explicit queue goes to its job's queue."""
    if name != RUN_TASK_NAME or not kwargs or not kwargs.get("job_key"):
        return None
    queue = default_queue(kwargs["job_key"])
    return {"queue": queue, "routing_key": queue}


def worker_queue_names(job_keys: list[str] | None = None) -> list[str]:
    """The queues a worker consumes: the named jobs' (each must exist and be enabled), else every
    enabled job's."""
    enabled = {job.key: job.queue or default_queue(job.key) for job in Job.objects.filter(enabled=True)}
    if not job_keys:
        return sorted(set(enabled.values()))
    missing = [key for key in job_keys if key not in enabled]
    if missing:
        raise UnknownJobs(f"unknown or disabled jobs: {', '.join(missing)}")
    return sorted({enabled[key] for key in job_keys})
