"""The process that runs one task of a run, then exits.

Forked per task from the pool process's task template (orchestrator/template.py), after its setsid():
`run` labels it, applies the pool process's database name and settings (before any connection opens),
sets its limits, runs the task and writes the outcome as JSON to the payload's `result_path`:
`{"ok": true, "result": {...}, "pid": n}` or `{"ok": false, "error": "<exception type>", "summary":
"<short>", "pid": n}`. Exit code 0 with ok, 1 with a task error; anything else (a signal, no result
file) is a crash.

The task process leads the task's process group, so its exit status is the task's (SIGXCPU: its CPU
limit) and whatever it starts stays in that group. Its parent-death signal (on the template) is SIGTERM,
answered by SIGKILLing the whole group: a parent-death signal alone reaches only the direct child. Only
the task process answers so: a child it forks (inheriting the handler) dies of an ordinary SIGTERM.
Who takes a task group down, by what died:
- the pool process: its template SIGKILLs every group it forked, and the pool process kills the group
  after every task (services._kill_group);
- the template: the pool process sees its channel close and kills the group; the task's parent-death
  signal does too;
- both at once: the task's parent-death signal only. Its handler runs between bytecodes, so a task stuck
  in C code that retries its system call (a long libpq query) goes down only when that call returns.

The title (`python -m orchestrator.taskrunner --run-id N --job KEY --task NAME`) only labels the process
for `ps` and /proc readers (orchestrator/taskprocs.py); what it starts inherits it until it execs.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
from typing import Any

# Looked up once, in the template: a forked task finds the function ready.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent(parent_pid: int, *, reap_orphans: bool = False) -> bool:
    """The one use of prctl (Linux): SIGTERM to this process when its parent dies and, with
    `reap_orphans`, adopt the orphans of its descendants (child subreaper). False if the parent is
    already gone (then the signal never comes). The signal follows the thread that forked us."""
    _prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    if reap_orphans:
        _prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    return os.getppid() == parent_pid


_task_pid = 0


def _kill_own_group(signum: int = 0, frame: object = None) -> None:
    if signum and os.getpid() != _task_pid:
        # A process the task forked (the handler is inherited): an ordinary SIGTERM ends it alone.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(70)  # not reached: the group includes this process


def _lead_group(parent_pid: int) -> None:
    """First thing in the task process: if the parent dies (SIGKILL, OOM), take the whole group down."""
    global _task_pid
    _task_pid = os.getpid()
    signal.signal(signal.SIGTERM, _kill_own_group)
    if not die_with_parent(parent_pid):
        _kill_own_group()


def _set_limits(memory_limit_mb: int, cpu_seconds: int) -> None:
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_soft = max(1, cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 5))


def _configure_django(db_name: str, overrides: dict[str, Any]) -> None:
    """The pool process's database (the test database in tests) and the settings a task may read."""
    from django.conf import settings
    from django.db import connections

    # The template opened no connection (template._preload checks): none is shared across the fork.
    settings.DATABASES["default"]["NAME"] = db_name
    connections["default"].settings_dict["NAME"] = db_name
    for name, value in overrides.items():
        setattr(settings, name, value)


def _write(path: str, outcome: dict[str, Any]) -> None:
    """The outcome, in one write: the pool process reads it after this process has ended, and a write
    cut short leaves no complete JSON (a crash)."""
    outcome["pid"] = os.getpid()  # where the task ran
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as fh:
        fh.write(json.dumps(outcome).encode())


def run(request: dict[str, Any], *, template_pid: int) -> int:
    """Run the task of `request` (`{"title", "argv", "payload"}`) here; the exit code for `os._exit`."""
    _lead_group(template_pid)
    import setproctitle

    setproctitle.setproctitle(request["title"])  # what /proc readers (orchestrator/taskprocs.py) match
    sys.argv = request["argv"]  # as if exec'd: what reads its own argv (statement counters) sees a task
    payload = request["payload"]
    _set_limits(payload["memory_limit_mb"], payload["cpu_seconds"])
    result_path = payload["result_path"]
    try:
        _configure_django(payload["db_name"], payload["settings"])
        import importlib

        from orchestrator.jobs.registry import TaskContext

        module_name, _, qualname = payload["task_ref"].partition(":")
        func = getattr(importlib.import_module(module_name), qualname)
        result = func(TaskContext(**payload["context"]))
        if not isinstance(result, dict):
            raise TypeError(f"task returned {type(result).__name__}, not a dict")
        _write(result_path, {"ok": True, "result": result})
        return 0
    except MemoryError:
        summary = f"memory limit exceeded ({payload['memory_limit_mb']} MiB)"
        _write(result_path, {"ok": False, "error": "MemoryError", "summary": summary})
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
        # Close politely (only those the task opened) so PostgreSQL logs no abrupt disconnect.
        from django.db import connections

        connections.close_all()
