"""The job registry: every kind of work the system can run, declared in code.

A job is one module that builds a `JobSpec` (its key and its three tasks); adding a job is that module
plus one line in `_BUILTIN_MODULES`. `Job` rows mirror the registry: a post-migrate step creates the
missing ones and leaves the operator's edits (enabled, caps, timeout, allowlist) alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# One line per job module. Each module defines `JOB: JobSpec`.
_BUILTIN_MODULES = (
    "orchestrator.jobs.log_triage",
    "orchestrator.jobs.sleep",
)


@dataclass(frozen=True)
class TaskContext:
    """What a task sees: the run, its instructions, and what the earlier tasks of the run returned."""

    run_id: int
    job_key: str
    directive_text: str
    task3_scope: str
    previous: dict[str, dict[str, Any]] = field(default_factory=dict)


TaskFunc = Callable[[TaskContext], dict[str, Any]]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    func: TaskFunc


@dataclass(frozen=True)
class JobSpec:
    key: str
    name: str
    description: str
    tasks: tuple[TaskSpec, TaskSpec, TaskSpec]
    timeout_seconds: int = 600
    max_concurrency: int | None = None


class UnknownJob(LookupError):
    pass


_registry: dict[str, JobSpec] = {}


def register(spec: JobSpec) -> JobSpec:
    if len(spec.tasks) != 3:
        raise ValueError(f"job {spec.key!r} must declare exactly three tasks")
    _registry[spec.key] = spec
    return spec


def _load_builtins() -> None:
    if _registry:
        return
    for module_name in _BUILTIN_MODULES:
        register(importlib.import_module(module_name).JOB)


def all_job_specs() -> list[JobSpec]:
    _load_builtins()
    return list(_registry.values())


def get_job_spec(key: str) -> JobSpec:
    _load_builtins()
    try:
        return _registry[key]
    except KeyError:
        raise UnknownJob(key) from None


def sync_jobs(job_model: Any, using: str = "default") -> int:
    """Create a `Job` row for every registered job that lacks one; return how many were created."""
    created = 0
    for spec in all_job_specs():
        _, was_created = job_model.objects.using(using).get_or_create(
            key=spec.key,
            defaults={
                "name": spec.name,
                "description": spec.description,
                "queue": f"jobs.{spec.key}",
                "timeout_seconds": spec.timeout_seconds,
                "max_concurrency": spec.max_concurrency,
            },
        )
        created += int(was_created)
    return created


def sync_jobs_after_migrate(sender: Any, apps: Any, using: str = "default", **kwargs: Any) -> None:
    """post_migrate receiver: uses the migration state's model, so it works mid-history too."""
    try:
        job_model = apps.get_model("orchestrator", "Job")
    except LookupError:
        return
    sync_jobs(job_model, using)
