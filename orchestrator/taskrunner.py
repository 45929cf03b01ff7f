"""The child process that runs one task of a run, then exits: `python -m orchestrator.taskrunner`.

`OrchestratorService.execute` starts one of these per task (DESIGN 7: per-task workers stay ephemeral).
Protocol: a JSON payload on stdin; the outcome is written as JSON to the payload's `result_path`:
`{"ok": true, "result": {...}}` or `{"ok": false, "error": "<exception type>", "summary": "<short>"}`.
Exit code 0 with ok, 1 with a task error; anything else (a signal, no result file) is a crash.

The limits are set here, first thing, in the child only: an address-space limit (a runaway allocation
raises MemoryError instead of pushing the worker host into the OOM killer), a CPU-time backstop, no core
files, and a parent-death signal so a hard-killed worker never leaves its task running.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    # Linux only. The signal fires when the thread that forked us ends; the worker runs tasks on its
    # main thread. The getppid check closes the race where the parent died before prctl ran.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(70)


def _set_limits(memory_limit_mb: int, cpu_seconds: int) -> None:
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_soft = max(1, cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 5))


def _setup_django(db_name: str, overrides: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    # The parent may run against another database (the test database) or settings changed at runtime;
    # the child uses exactly the parent's values, applied before the first connection opens.
    settings.DATABASES["default"]["NAME"] = db_name
    # A task needs the ORM for the orchestrator's own models only. Loading just that app (no admin, DRF,
    # Celery results, scheduler) halves the child's start-up, which every task of every run pays.
    settings.INSTALLED_APPS = ["django.contrib.contenttypes", "orchestrator"]
    django.setup()
    for name, value in overrides.items():
        setattr(settings, name, value)


def _import_task(ref: str):
    import importlib

    module_name, _, qualname = ref.partition(":")
    return getattr(importlib.import_module(module_name), qualname)


def _write(path: str, outcome: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(outcome, fh)
    os.replace(tmp, path)


def main() -> int:
    payload = json.loads(sys.stdin.read())
    _die_with_parent(payload["parent_pid"])
    _set_limits(payload["memory_limit_mb"], payload["cpu_seconds"])
    result_path = payload["result_path"]
    try:
        _setup_django(payload["db_name"], payload["settings"])
        from orchestrator.jobs.registry import TaskContext, TaskError

        func = _import_task(payload["task_ref"])
        result = func(TaskContext(**payload["context"]))
        if not isinstance(result, dict):
            raise TypeError(f"task returned {type(result).__name__}, not a dict")
        _write(result_path, {"ok": True, "result": result})
        return 0
    except MemoryError:
        _write(
            result_path,
            {
                "ok": False,
                "error": "MemoryError",
                "summary": f"memory limit exceeded ({payload['memory_limit_mb']} MiB)",
            },
        )
        return 1
    except Exception as exc:
        import logging
        import traceback

        from orchestrator.jobs.registry import TaskError

        logging.getLogger("orchestrator.taskrunner").error(
            "task raised", extra={"task": payload["task_ref"], "error": type(exc).__name__}
        )
        # A TaskError carries an operator-facing message; any other exception is summarized by its type
        # only (its message may quote input), with the traceback in the worker's log.
        if isinstance(exc, TaskError):
            summary = str(exc)[:300]
        else:
            summary = type(exc).__name__
            traceback.print_exc(file=sys.stderr)
        _write(result_path, {"ok": False, "error": type(exc).__name__, "summary": summary})
        return 1
    finally:
        _close_connections()


def _close_connections() -> None:
    # Close politely so PostgreSQL does not log an abrupt disconnect for every task.
    if "django.db" in sys.modules:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (atexit hooks, finalizers of half-built state): the result is written.
    os._exit(code)
