"""The process that runs one task of a run, then exits.

`OrchestratorService.execute` starts one of these per task (DESIGN 7: per-task workers stay ephemeral):
forked from the pool process's task template (orchestrator/template.py, which imported Django and the
job modules once) and entering `serve_spare`. `python -m orchestrator.taskrunner` runs the same code in
an exec'd process (`main`, the payload on stdin), for debugging a task by hand.
Protocol: the outcome is written as JSON to the payload's `result_path`:
`{"ok": true, "result": {...}}` or `{"ok": false, "error": "<exception type>", "summary": "<short>"}`.
Exit code 0 with ok, 1 with a task error; anything else (a signal, no result file) is a crash.

One process per task: the task process leads the task's process group (its own session, from the
template's setsid()) and runs the task itself, so its exit status is the task's (a signal is the one
that killed the task, SIGXCPU its CPU limit) and `pid` in the result is where the task ran. Whatever the
task starts stays in that group. Its parent-death signal (on the template, or on the pool process when
exec'd) is SIGTERM, answered by SIGKILLing the whole group, itself included: a parent-death signal alone
reaches only the direct child, not a grandchild. Only the task process answers so: a child it forks
(inheriting the handler, as multiprocessing's fork does) dies of an ordinary SIGTERM instead.

Who takes a task group down, by what died:
- the pool process: its template SIGKILLs every group it forked (its own parent-death signal, or EOF
  on its channel), and the pool process's `_kill_group` after every task;
- the template alone: the pool process sees the channel close and SIGKILLs the group, and the task's
  parent-death signal does too;
- pool process and template at once (both SIGKILLed): the task's parent-death signal only. Its handler
  is Python code, run between bytecodes of the main thread: a wait (time.sleep, a lock, a pipe, a
  socket, a child) is interrupted for it, but a task stuck in C code that retries its system call
  without returning to Python (libpq's PQexec in a long query, a long computation in an extension)
  takes its group down only when that call returns. (A second process per task, a guardian that only
  waits, closed this gap at a cost of a fork and an exit per task; issue 14.)

The title (`python -m orchestrator.taskrunner --run-id N --job KEY --task NAME`, set with setproctitle
once the task is known, the argv when exec'd) only labels the process for `ps` and /proc readers
(orchestrator/taskprocs.py); what it starts inherits it until it execs.

The limits are set first thing once the task is known: an address-space limit (a runaway allocation
raises MemoryError instead of pushing the worker host into the OOM killer), a CPU-time backstop, no core
files. The process ends with `os._exit` once the result file is written: no interpreter teardown.
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


try:
    # Looked up once, in the template: a forked task finds the function ready (a lookup in the fork
    # would build it there, writing to pages it shares with the template).
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _set_parent_death_signal(sig: int) -> None:
    # Linux only. The signal fires when the thread that forked us ends; the worker runs tasks on its
    # main thread.
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


_task_pid = 0


def _kill_own_group(signum: int = 0, frame: object = None) -> None:
    if signum and os.getpid() != _task_pid:
        # A process the task forked (the handler is inherited across a fork): an ordinary SIGTERM,
        # such as multiprocessing's terminate(), ends that process only, as it would by default.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(70)  # not reached: the group includes this process


def _lead_group(parent_pid: int) -> None:
    """First thing in the task process: if the parent dies (SIGKILL, OOM), take the whole group down."""
    global _task_pid
    _task_pid = os.getpid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGTERM, _kill_own_group)
    _set_parent_death_signal(signal.SIGTERM)
    # The parent may have died before prctl ran: then the signal never comes.
    if os.getppid() != parent_pid:
        _kill_own_group()


def _set_limits(memory_limit_mb: int, cpu_seconds: int) -> None:
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_soft = max(1, cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 5))


def configure_django(db_name: str, overrides: dict[str, Any]) -> None:
    """The pool process's database name and task settings, applied before any connection opens: in an
    exec'd task process, or in the task template once per change (template.py), whose forks inherit them.
    """
    import django
    from django.apps import apps
    from django.conf import settings

    # The parent may run against another database (the test database) or settings changed at runtime;
    # the child uses exactly the parent's values, applied before the first connection opens.
    settings.DATABASES["default"]["NAME"] = db_name
    if not apps.ready:  # exec'd; a forked task has Django set up by its template
        # A task needs the ORM for the orchestrator's own models only. Loading just that app (no admin,
        # DRF, Celery results, scheduler) halves the start-up.
        settings.INSTALLED_APPS = ["django.contrib.contenttypes", "orchestrator"]
        django.setup()
    from django.db import connections

    default = connections["default"]
    if default.connection is not None:
        # Never the template's (it holds none): a connection shared across a fork corrupts both ends.
        raise RuntimeError("a task process would inherit an open database connection")
    default.settings_dict["NAME"] = db_name
    for name, value in overrides.items():
        setattr(settings, name, value)


def _import_task(ref: str):
    module_name, _, qualname = ref.partition(":")
    # The template imported the job modules: a forked task finds its own in sys.modules.
    module = sys.modules.get(module_name)
    if module is None:
        import importlib

        module = importlib.import_module(module_name)
    return getattr(module, qualname)


def _write(path: str, outcome: dict[str, Any]) -> None:
    """The outcome, in one write. No temporary file and rename: the pool process reads it after this
    process has exited or been killed, and a write cut short leaves no complete JSON (a crash)."""
    outcome["pid"] = os.getpid()  # where the task ran
    data = json.dumps(outcome).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def main() -> int:
    """Exec'd: the payload on stdin, the parent the pool process (which started it in a new session)."""
    payload = json.loads(sys.stdin.read())
    _lead_group(payload["parent_pid"])
    return _run_task(payload)


def serve_spare(request_fd: int, *, template_pid: int) -> int:
    """A spare forked by the task template ahead of need, just after its setsid(): wait for one task,
    which the template writes to `request_fd` as JSON (`{"title", "argv", "payload"}`), and run it here.
    The fork is then paid while the previous task runs, not by the next.

    Returns the exit code for `os._exit` (the caller never returns into the template's loop). EOF
    without a request (the template is gone) ends it without running anything.
    """
    _lead_group(template_pid)
    raw = _read_all(request_fd)
    if not raw:
        return 70
    request = json.loads(raw)
    _label(request)
    return _run_task(request["payload"])


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _label(request: dict[str, Any]) -> None:
    import setproctitle

    setproctitle.setproctitle(request["title"])  # what /proc readers (orchestrator/taskprocs.py) match
    sys.argv = request["argv"]  # as if exec'd: what reads its own argv (statement counters) sees a task


def _run_task(payload: dict[str, Any]) -> int:
    """Limits first, then the task; the outcome goes to the result file."""
    _set_limits(payload["memory_limit_mb"], payload["cpu_seconds"])
    result_path = payload["result_path"]
    try:
        if "db_name" in payload:  # exec'd; a forked task has them from its template
            configure_django(payload["db_name"], payload["settings"])
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

            # Only those the task opened: a task that never touched the database creates none here.
            for conn in connections.all(initialized_only=True):
                conn.close()
        except Exception:
            pass


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (atexit hooks, finalizers of half-built state): the result is written.
    os._exit(code)
