"""OrchestratorService: the one path that creates runs (manual and scheduled) and executes them."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import F

from orchestrator import taskrunner
from orchestrator.jobs.registry import TaskContext, TaskSpec, get_job_spec
from orchestrator.models import Directive, Job, Run, RunStatus, Task3Scope, Trigger
from orchestrator.params import params_errors
from orchestrator.taskprocs import runner_argv
from orchestrator.template import TemplateUnavailable, task_template

logger = logging.getLogger(__name__)


class OrchestratorError(Exception):
    """Base for the orchestrator's domain errors."""


class TaskFailed(OrchestratorError):
    """A task raised, crashed or overran. `str(exc)` is the run's `error_summary` (under 500 chars)."""

    def __init__(self, task: str, summary: str, stats: dict[str, Any] | None = None) -> None:
        super().__init__(f"task {task} failed: {summary}"[:500])
        self.task = task
        self.summary = summary
        self.stats = stats if stats is not None else {}


class ParamsInvalid(TaskFailed):
    """The run's params no longer fit its job's `params_schema` (the job's code changed since they were
    checked): the run fails before its first task, saying which paths."""

    def __init__(self, problems: list[str]) -> None:
        summary = "; ".join(problems)
        super().__init__("params", summary)
        # The run's error_summary: no task ran, so not "task params failed".
        self.args = (f"params do not fit the job's params_schema: {summary}"[:500],)


class OrchestratorService:
    @staticmethod
    def launch(
        *,
        job: Job,
        directive: Directive | None = None,
        custom_directive_text: str = "",
        trigger: str = Trigger.MANUAL,
        task3_scope: str = Task3Scope.ALLOWLIST,
        task_id: str | None = None,
        params: dict[str, Any] | None = None,
        scheduled_for: datetime | None = None,
        previous_scheduled_for: datetime | None = None,
    ) -> Run:
        """Create a queued `Run`, the one launch path of every run (the scheduler's batch: `launch_many`).
        The caller publishes its message after commit, under `task_id` (a new one unless given).

        Directive and custom text are exclusive; the database constraint holds it too. `params` are
        the caller's to check (orchestrator.params.params_errors); the run checks them again at start.
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
            task_id=task_id if task_id is not None else str(uuid.uuid4()),
            params=params if params is not None else {},
            scheduled_for=scheduled_for,
            previous_scheduled_for=previous_scheduled_for,
        )

    @staticmethod
    def launch_many(launches: list[dict[str, Any]]) -> list[Run]:
        """`launch` for many runs in one INSERT (the scheduler's batch dispatch); same rules, same order.

        Each item holds `launch`'s keyword arguments.
        """
        runs = []
        for item in launches:
            directive = item.get("directive")
            custom_text = item.get("custom_directive_text", "")
            if directive is not None and custom_text:
                raise ValueError("a run takes a directive or custom directive text, not both")
            runs.append(
                Run(
                    job=item["job"],
                    directive=directive,
                    custom_directive_text=custom_text,
                    trigger=item.get("trigger", Trigger.MANUAL),
                    task3_scope=item.get("task3_scope", Task3Scope.ALLOWLIST),
                    status=RunStatus.QUEUED,
                    task_id=item.get("task_id", ""),
                    params=item.get("params") or {},
                    scheduled_for=item.get("scheduled_for"),
                    previous_scheduled_for=item.get("previous_scheduled_for"),
                )
            )
        return Run.objects.bulk_create(runs) if runs else []

    @staticmethod
    def execute(run: Run, fence: TaskFence | None = None) -> dict[str, Any]:
        """Run the job's three tasks in order, each in a fresh child process; return `stats`.

        `fence` lets another thread stop the run for good (`fence.kill(reason)`): the task executing
        now is killed with its whole process group and no further task starts; the run then fails
        with that reason.

        Raises `TaskFailed` (with `.stats` so far) when a task raises, crashes, runs out of memory or
        overruns the run's time limit (`Job.timeout_seconds`, shared by the three tasks), and
        `ParamsInvalid` before any task when the run's params no longer fit the job's schema. The caller
        (the worker) owns the run's status transitions; this does the work and the counters: the LLM
        counters and `report_path` that tasks report are written to the run row (and the instance).
        """
        spec = get_job_spec(run.job.key)
        job = run.job
        if problems := params_errors(job.params_schema, run.params):
            raise ParamsInvalid(problems)
        memory_limit_mb = int(getattr(settings, "ORCHESTRATOR_TASK_MEMORY_MB", 0) or spec.memory_limit_mb)
        deadline = time.monotonic() + job.timeout_seconds
        previous: dict[str, dict[str, Any]] = {}
        stats: dict[str, Any] = {"tasks": {}, "notes": []}
        _sweep_stale_work_dirs()
        work_dir = tempfile.mkdtemp(prefix=f"{_WORK_DIR_PREFIX}{run.pk}-")
        try:
            for index, task in enumerate(spec.tasks):
                ctx = TaskContext(
                    run_id=run.pk,
                    job_key=spec.key,
                    directive_text=run.directive_text,
                    task3_scope=run.task3_scope,
                    previous=dict(previous),
                    work_dir=work_dir,
                    params=run.params,
                    scheduled_for=run.scheduled_for,
                    previous_scheduled_for=run.previous_scheduled_for,
                    # The worker's instance carries the attempt its start returned.
                    attempt=run.attempt,
                )
                remaining = deadline - time.monotonic()
                if fence is not None and fence.reason:
                    stats["tasks"][task.name] = {"outcome": "fenced"}
                    raise TaskFailed(task.name, fence.reason, stats)
                if remaining <= 0:
                    stats["tasks"][task.name] = {"outcome": "timed_out"}
                    raise TaskFailed(task.name, f"run time limit of {job.timeout_seconds}s reached", stats)
                started = time.monotonic()
                outcome = run_task_in_child(
                    task,
                    ctx,
                    index=index,
                    time_limit=remaining,
                    memory_limit_mb=memory_limit_mb,
                    run_timeout=job.timeout_seconds,
                    fence=fence,
                )
                seconds = round(time.monotonic() - started, 3)
                if not outcome.ok and fence is not None and fence.reason:
                    outcome = TaskOutcome(False, "fenced", fence.reason, pid=outcome.pid)
                if not outcome.ok:
                    stats["tasks"][task.name] = {
                        "outcome": outcome.kind,
                        "seconds": seconds,
                        "pid": outcome.pid,
                        "error": outcome.summary,
                    }
                    logger.warning(
                        "task failed",
                        extra={"run_id": run.pk, "task": task.name, "outcome": outcome.kind},
                    )
                    stats["llm"] = _llm_counters(run)
                    raise TaskFailed(task.name, outcome.summary, stats)
                result = outcome.result
                previous[task.name] = result
                _apply_run_fields(run, result)
                stats["notes"].extend(_notes(result))
                stats["tasks"][task.name] = {
                    # The task's own counts first: one it names `seconds` or `pid` must not hide ours.
                    **_counts(result),
                    "outcome": "succeeded",
                    "seconds": seconds,
                    "pid": outcome.pid,
                }
                logger.info("task succeeded", extra={"run_id": run.pk, "task": task.name, "seconds": seconds})
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        stats["llm"] = _llm_counters(run)
        if run.report_path:
            stats["report_path"] = run.report_path
        return stats


def _llm_counters(run: Run) -> dict[str, int]:
    return {
        "calls": run.llm_calls,
        "prompt_tokens": run.llm_prompt_tokens,
        "completion_tokens": run.llm_completion_tokens,
    }


_WORK_DIR_PREFIX = "cb-run-"
_STALE_WORK_DIR_SECONDS = 24 * 3600


# A sweep lists the whole temp directory: once per process per this many seconds, not once per run.
_SWEEP_EVERY_SECONDS = 600.0
_last_sweep: float | None = None


def _sweep_stale_work_dirs() -> None:
    """Remove run work dirs a hard-killed worker left behind (they may hold copies of log lines)."""
    global _last_sweep
    now = time.monotonic()
    if _last_sweep is not None and now - _last_sweep < _SWEEP_EVERY_SECONDS:
        return
    _last_sweep = now
    root = Path(tempfile.gettempdir())
    cutoff = time.time() - _STALE_WORK_DIR_SECONDS
    for path in root.glob(f"{_WORK_DIR_PREFIX}*"):
        try:
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


# --- child processes -----------------------------------------------------------------------------------

# Settings a task may read, handed to the child as the parent sees them (runtime overrides included).
_CHILD_SETTINGS = ("CYBER_BRAIN_LOGS", "UPLOADS_DIR", "LLM_ENDPOINT", "LLM_MODEL", "LLM_ALLOWED_HOSTS")
_CHILD_SETTINGS_PREFIXES = ("LOG_TRIAGE_", "LLM_")
_LLM_COUNTERS = ("llm_calls", "llm_prompt_tokens", "llm_completion_tokens")
_NOT_COUNTS = frozenset({*_LLM_COUNTERS, "report_path", "notes"})


@dataclass(frozen=True)
class TaskOutcome:
    ok: bool
    kind: str  # succeeded | failed | crashed | timed_out | fenced
    summary: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    pid: int = 0


def _child_settings() -> dict[str, Any]:
    names = set(_CHILD_SETTINGS)
    names.update(name for name in dir(settings) if name.startswith(_CHILD_SETTINGS_PREFIXES))
    values: dict[str, Any] = {}
    for name in sorted(names):
        if not hasattr(settings, name):
            continue
        value = getattr(settings, name)
        values[name] = str(value) if isinstance(value, Path) else value
    return values


class TaskFence:
    """Stops a run from another thread: kills its live task process group and lets no task start.

    The worker's heartbeat holds it: a run the system gave up on (reaped, its lease lost, cancelled)
    must stop executing before its concurrency slot goes to another run (docs/ARCHITECTURE.md, guarantee 5).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: set[int] = set()
        self._kill_at: float | None = None
        self.reason = ""

    def kill(self, reason: str, *, grace: float = 0.0) -> None:
        """Stop the run: no task starts any more; the live task groups get SIGTERM, then SIGKILL once
        `grace` seconds passed (at once without a grace); returns when none of them is left. Called
        while another thread stops the run, it only brings that stop's SIGKILL closer, and returns."""
        with self._lock:
            if not self.reason:
                self.reason = reason[:300]
            groups = list(self._groups)
            deadline = time.monotonic() + max(0.0, grace)
            stopping = self._kill_at is not None
            self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)
        if stopping:
            return
        if grace > 0:
            _signal_groups(groups, signal.SIGTERM)
            while groups and time.monotonic() < self._kill_at:
                time.sleep(0.05)
                groups = [pgid for pgid in groups if _group_alive(pgid)]
        for pgid in groups:
            _kill_group(pgid)

    def enter(self, pgid: int) -> bool:
        """Register a started task's group; False (and the group killed) when the run is fenced."""
        with self._lock:
            if not self.reason:
                self._groups.add(pgid)
                return True
        _kill_group(pgid)
        return False

    def leave(self, pgid: int) -> None:
        with self._lock:
            self._groups.discard(pgid)


def _signal_groups(groups: list[int], signum: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _kill_group(pgid: int, *, wait: float = 5.0) -> None:
    """SIGKILL the task's whole process group and wait until none of it is left (the task template, a
    child subreaper, reaps them all): a fenced run has stopped when this returns, not merely been
    signalled."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.005)
    logger.warning("task process group still present after SIGKILL", extra={"pgid": pgid})


def run_task_in_child(
    task: TaskSpec,
    ctx: TaskContext,
    *,
    index: int,
    time_limit: float,
    memory_limit_mb: int,
    run_timeout: int,
    fence: TaskFence | None = None,
) -> TaskOutcome:
    """Run one task in a fresh process forked from this process's task template; wait `time_limit`.

    The task process leads its own process group; whatever happens here (success, timeout, an exception
    in this process such as Celery's soft time limit), the group is killed before returning, so neither
    the task process nor anything it started outlives the task. The template's start-up, paid once per
    pool process, counts against the limit of the task that needed it.
    """
    deadline = time.monotonic() + max(time_limit, 0.1)
    result_path = os.path.join(ctx.work_dir, f"task{index}.out.json")
    payload = {
        "task_ref": task.ref,
        # Its fields as they are (JSON copies them anyway): asdict() would deep-copy the earlier results.
        "context": {f.name: getattr(ctx, f.name) for f in fields(ctx)},
        "result_path": result_path,
        "memory_limit_mb": memory_limit_mb,
        "cpu_seconds": math.ceil(time_limit) + 5,
        # The pool process's database (the test database in tests) and the settings a task may read,
        # applied in the task process before it opens any connection.
        "db_name": connection.settings_dict["NAME"],
        "settings": _child_settings(),
    }
    argv = runner_argv(run_id=ctx.run_id, job_key=ctx.job_key, task=task.name)
    try:
        template = task_template(deadline=deadline)
        request = {"title": " ".join([sys.executable, *argv]), "argv": [taskrunner.__file__, *argv[2:]]}
        pid = template.fork_task({**request, "payload": payload}, deadline)
    except TimeoutError:
        return TaskOutcome(False, "timed_out", f"time limit reached (run timeout {run_timeout}s)")
    except TemplateUnavailable as exc:
        logger.error("task template unavailable", extra={"task": task.name, "error": str(exc)})
        return TaskOutcome(False, "crashed", "task process could not be started (task template unavailable)")
    code: int | None = None
    lost = False
    if fence is not None:
        fence.enter(pid)
    try:
        code = template.wait_exit(pid, deadline)
    except TemplateUnavailable:
        lost = True  # the task took its group down on its parent's death; the kill below makes sure
    finally:
        # Always: on timeout this ends the task; after a normal exit it reaps anything it left running;
        # on an exception in this process (a soft time limit, a signal) it keeps the task from outliving us.
        _kill_group(pid)
        template.forget(pid)
        if fence is not None:
            fence.leave(pid)
    if code is None and not lost:
        return TaskOutcome(False, "timed_out", f"time limit reached (run timeout {run_timeout}s)", pid=pid)
    try:
        with open(result_path, encoding="utf-8") as fh:
            outcome = json.load(fh)
    except (OSError, ValueError):
        outcome = None
    if outcome is None:
        if code is None:
            summary = "child process lost (its task template process died)"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            summary = f"child process crashed (signal {name})"
            if -code == signal.SIGXCPU:
                summary = f"CPU time limit reached (run timeout {run_timeout}s)"
        else:
            summary = f"child process exited with code {code} without a result"
        return TaskOutcome(False, "crashed", summary, pid=pid)
    pid = outcome.get("pid") if isinstance(outcome.get("pid"), int) else pid
    if not outcome.get("ok"):
        return TaskOutcome(False, "failed", str(outcome.get("summary") or "error")[:300], pid=pid)
    return TaskOutcome(True, "succeeded", result=outcome.get("result") or {}, pid=pid)


def _counts(result: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in result.items()
        if key not in _NOT_COUNTS and isinstance(value, int | float) and not isinstance(value, bool)
    }


def _notes(result: dict[str, Any]) -> list[str]:
    # Notes are short fixed codes ("llm_unreachable"), never free text from logs or an LLM.
    notes = result.get("notes") or []
    return [str(note)[:100] for note in notes if isinstance(note, str)][:20]


def _apply_run_fields(run: Run, result: dict[str, Any]) -> None:
    """Write the LLM counters and the report path a task reported to the run row and the instance.

    Done here, in the worker's connection, not in the child: the worker may hold the run row locked.
    """
    increments = {name: int(result.get(name) or 0) for name in _LLM_COUNTERS}
    updates: dict[str, Any] = {name: F(name) + n for name, n in increments.items() if n > 0}
    report_path = result.get("report_path")
    if isinstance(report_path, str) and report_path:
        updates["report_path"] = report_path[:1024]
    if not updates:
        return
    Run.objects.filter(pk=run.pk).update(**updates)
    for name, n in increments.items():
        setattr(run, name, getattr(run, name) + n)
    if "report_path" in updates:
        run.report_path = updates["report_path"]
