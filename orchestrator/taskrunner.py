"""The process that runs one task of a run, then exits.

`OrchestratorService.execute` starts one of these per task (DESIGN 7: per-task workers stay ephemeral):
forked from the pool process's task template (orchestrator/template.py, which imported Django and the
job modules once) and entering `serve_spare`. `python -m orchestrator.taskrunner` runs the same code in
an exec'd process (`main`, the payload on stdin), for debugging a task by hand.
Protocol: the outcome is written as JSON to the payload's `result_path`:
`{"ok": true, "result": {...}}` or `{"ok": false, "error": "<exception type>", "summary": "<short>"}`.
Exit code 0 with ok, 1 with a task error; anything else (a signal, no result file) is a crash.

The process started per task is the *guardian*: it leads the task's process group (its own session),
forks the *runner* that executes the task, and waits. Whatever the task starts stays in that group. The
guardian's parent-death signal (on the template, or on the pool process when exec'd) is SIGTERM, which
it answers by SIGKILLing the whole group, itself included: so when the pool process dies (SIGKILL, OOM)
and its template with it, nothing of the task survives, not even a grandchild (a parent-death signal
alone reaches only the direct child). The runner has a SIGKILL parent-death signal on the guardian, in
case the guardian itself is killed.

The title (`python -m orchestrator.taskrunner --run-id N --job KEY --task NAME`, set with setproctitle in
a forked guardian, the argv when exec'd) only labels the processes for `ps` and /proc readers
(orchestrator/taskprocs.py); the runner inherits it.

The limits are set in the runner, first thing: an address-space limit (a runaway allocation raises
MemoryError instead of pushing the worker host into the OOM killer), a CPU-time backstop, no core files.
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


def _set_parent_death_signal(sig: int) -> None:
    # Linux only. The signal fires when the thread that forked us ends; the worker runs tasks on its
    # main thread.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill_own_group(signum: int = 0, frame: object = None) -> None:
    os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(70)  # not reached: the group includes this process


def _guard(parent_pid: int) -> int:
    """Fork the runner and wait for it; if the worker dies first, take the whole group down with it.

    Returns the runner's pid in the runner, 0 in the guardian (which then only waits).
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGTERM, _kill_own_group)
    _set_parent_death_signal(signal.SIGTERM)
    # The parent may have died before prctl ran: then the signal never comes.
    if os.getppid() != parent_pid:
        _kill_own_group()
    guardian = os.getpid()
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != guardian:
            os._exit(70)
        return 0
    return pid


def _wait_runner(pid: int) -> int:
    """The guardian's life: wait for the runner, then exit as it did (a signal as 128 + number)."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            return 70
    if os.WIFSIGNALED(status):
        # Die of the same signal, so the worker sees how the task ended.
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


def _set_limits(memory_limit_mb: int, cpu_seconds: int) -> None:
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_soft = max(1, cpu_seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_soft + 5))


def _setup_django(db_name: str, overrides: dict[str, Any]) -> None:
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
        raise RuntimeError("a task process inherited an open database connection")
    default.settings_dict["NAME"] = db_name
    for name, value in overrides.items():
        setattr(settings, name, value)


def _import_task(ref: str):
    import importlib

    module_name, _, qualname = ref.partition(":")
    return getattr(importlib.import_module(module_name), qualname)


def _write(path: str, outcome: dict[str, Any]) -> None:
    outcome["pid"] = os.getpid()  # the runner's: the task ran here, not in the guardian
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(outcome, fh)
    os.replace(tmp, path)


def main() -> int:
    """Exec'd: the payload on stdin, the guardian's parent the pool process."""
    payload = json.loads(sys.stdin.read())
    runner = _guard(payload["parent_pid"])
    if runner:
        return _wait_runner(runner)
    return _run_task(payload)


def serve_spare(request_fd: int, *, template_pid: int) -> int:
    """A spare forked by the task template ahead of need, just after its setsid(): become the guardian,
    fork the runner, and let both wait for one task, which the template writes to `request_fd` as JSON
    (`{"title", "argv", "payload"}`). The fork is then paid while the previous task runs, not by the next.

    Returns the exit code for `os._exit` (the caller never returns into the template's loop). EOF
    without a request (the template is gone) ends both without running anything.
    """
    to_runner_r, to_runner_w = os.pipe()
    runner = _guard(template_pid)
    if runner == 0:
        os.close(to_runner_w)
        os.close(request_fd)
        request = _read_request(to_runner_r)
        if request is None:
            return 70
        _label(request)
        return _run_task(request["payload"])
    os.close(to_runner_r)
    raw = _read_all(request_fd)
    request = json.loads(raw) if raw else None
    if request is None:
        os.close(to_runner_w)
        _kill_own_group()
    _label(request)
    view = memoryview(raw)
    while view:
        view = view[os.write(to_runner_w, view) :]
    os.close(to_runner_w)
    return _wait_runner(runner)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _read_request(fd: int) -> dict[str, Any] | None:
    raw = _read_all(fd)
    return json.loads(raw) if raw else None


def _label(request: dict[str, Any]) -> None:
    import setproctitle

    setproctitle.setproctitle(request["title"])  # what /proc readers (orchestrator/taskprocs.py) match
    sys.argv = request["argv"]  # as if exec'd: what reads its own argv (statement counters) sees a task


def _run_task(payload: dict[str, Any]) -> int:
    """The runner: limits first, then the task; the outcome goes to the result file."""
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
