"""The job registry: every kind of work the system can run, declared in code.

A job is one module that builds a `JobSpec` (its key and its three tasks); adding a job is that module
plus one line in `_BUILTIN_MODULES` (README, "Adding a job"). Each task runs in a fresh child process
(`orchestrator.taskrunner`), which imports the task function by its module path: task functions are
plain module-level functions taking a `TaskContext` and returning a small JSON-able dict.

`Job` rows mirror the registry: a post-migrate step creates the missing ones
and leaves the operator's edits (enabled, caps, timeout, allowlist) alone. `params_schema` is the code's
alone: the sync writes it to every row whenever the code's differs (the row is what the API, the admin
and the worker check `params` against).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import ModuleType
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
    # A scratch directory private to the run, removed when the run ends: tasks hand bulky data (such as
    # collected log lines) to the next task here, never through results or `Run.stats`.
    work_dir: str = ""
    # The run's inputs (docs/SCHEDULES.md, "Run inputs"): its params (checked against the job's
    # params_schema), the slot it is for (a run-now: when it was asked for; None for a run launched
    # through /api/runs/), the schedule's previous slot that launched a run (None for the first), and
    # which start of the run this is (1, then 2, ... when the run is started again).
    params: dict[str, Any] = field(default_factory=dict)
    scheduled_for: datetime | None = None
    previous_scheduled_for: datetime | None = None
    attempt: int = 0


TaskFunc = Callable[[TaskContext], dict[str, Any]]


class TaskError(Exception):
    """Raised by a task to fail its run with this message as `error_summary`: write it for the operator.

    Any other exception fails the run with just its type name (its message may quote log input).
    """


@dataclass(frozen=True)
class TaskSpec:
    name: str
    func: TaskFunc

    @property
    def ref(self) -> str:
        """`module:function`, how the child process finds the function."""
        return f"{self.func.__module__}:{self.func.__qualname__}"


@dataclass(frozen=True)
class JobSpec:
    key: str
    name: str
    description: str
    tasks: tuple[TaskSpec, TaskSpec, TaskSpec]
    timeout_seconds: int = 600
    max_concurrency: int | None = None
    # Address-space limit of each task's child process (RLIMIT_AS), in MiB.
    memory_limit_mb: int = 1024
    # What `TaskContext.params` may hold (JSON Schema; empty: any object). Schedules and launches are
    # checked against it; the tasks read their inputs from `ctx.params`.
    params_schema: dict[str, Any] = field(default_factory=dict)


class UnknownJob(LookupError):
    pass


_registry: dict[str, JobSpec] = {}
_builtins_loaded = False


def register(spec: JobSpec) -> JobSpec:
    if len(spec.tasks) != 3:
        raise ValueError(f"job {spec.key!r} must declare exactly three tasks")
    for task in spec.tasks:
        # The child process imports the function by name: closures and lambdas cannot be found there.
        if "<" in task.func.__qualname__ or "." in task.func.__qualname__:
            raise ValueError(f"task {task.name!r} of job {spec.key!r} must be a module-level function")
    from orchestrator.params import check_schema

    check_schema(spec.params_schema)
    _registry[spec.key] = spec
    return spec


def import_job_modules() -> list[ModuleType]:
    """Import the job modules, registering nothing: what the task template preloads (registering
    checks each job's params_schema, which imports jsonschema, about 10 MB that no task needs)."""
    return [importlib.import_module(name) for name in _BUILTIN_MODULES]


def _load_builtins() -> None:
    # A flag, not "registry empty": a job registered before the first lookup must not hide the builtins.
    global _builtins_loaded
    if _builtins_loaded:
        return
    for module in import_job_modules():
        spec = module.JOB
        if spec.key not in _registry:
            register(spec)
    _builtins_loaded = True


def all_job_specs() -> list[JobSpec]:
    _load_builtins()
    return list(_registry.values())


def unregister(key: str) -> None:
    """Remove a job from the registry (tests that register throwaway jobs)."""
    _registry.pop(key, None)


def get_job_spec(key: str) -> JobSpec:
    _load_builtins()
    try:
        return _registry[key]
    except KeyError:
        raise UnknownJob(key) from None


def sync_jobs(job_model: Any, using: str = "default") -> int:
    """Create a `Job` row for every registered job that lacks one, and bring every row's `params_schema`
    to the code's; return how many were created."""
    from orchestrator.models import default_queue

    has_schema = any(f.name == "params_schema" for f in job_model._meta.get_fields())
    created = 0
    for spec in all_job_specs():
        defaults = {
            "name": spec.name,
            "description": spec.description,
            "queue": default_queue(spec.key),
            "timeout_seconds": spec.timeout_seconds,
            "max_concurrency": spec.max_concurrency,
        }
        if has_schema:  # a migration state before the field (post_migrate runs mid-history too)
            defaults["params_schema"] = spec.params_schema
        job, was_created = job_model.objects.using(using).get_or_create(key=spec.key, defaults=defaults)
        created += int(was_created)
        if has_schema and not was_created and job.params_schema != spec.params_schema:
            job_model.objects.using(using).filter(pk=job.pk).update(params_schema=spec.params_schema)
    return created


def sync_jobs_after_migrate(sender: Any, apps: Any = None, using: str = "default", **kwargs: Any) -> None:
    """post_migrate receiver: uses the migration state's model, so it works mid-history too.

    `flush` (and so every transactional test's teardown) sends the signal without `apps`: use the
    project's models then.
    """
    if apps is None:
        from django.apps import apps
    try:
        job_model = apps.get_model("orchestrator", "Job")
    except LookupError:
        return
    sync_jobs(job_model, using)
