"""The task template: a process that imported Django and the job modules once and forks one fresh
process per task (docs/ARCHITECTURE.md, "Guardrails": per-task workers stay ephemeral; fork, don't exec).

Each pool process starts its template at its first task, with `python -m orchestrator.template` (a clean
exec: it inherits no database or Redis socket of the pool process), and talks to it over a socketpair
carrying `multiprocessing.connection` messages (dicts):
- pool process -> template, per task: `{"title", "argv", "payload"}` (the payload carries the pool
  process's database name and the settings a task may read; the task applies them before any connection
  opens);
- template -> pool process: `{"ready": pid}` once; per request `{"forked": pid}` (once the task process has
  done its setsid(), so the group exists to be killed) or `{"error": "..."}`; per task process that ended
  `{"exited": pid, "code": n}` (`n` as `Popen.returncode`: negative for a signal).
The task's outcome travels in the payload's `result_path` file (orchestrator/taskrunner.py).

Lifetimes, so that nothing outlives the pool process:
- the template dies with the pool process (parent-death signal SIGTERM, or EOF on its channel) and then
  SIGKILLs every task group it forked;
- each task process dies with the template and takes its group along (taskrunner.lead_group), so a
  template killed with SIGKILL still takes every task group down;
- the template is a child subreaper: orphans of a task group are reaped here, not left as zombies.
A dead template is replaced before the next task (`task_template`). The template holds no database
connection: the task process opens its own.

A template started from a thread other than the pool process's main thread dies when that thread ends
(the parent-death signal follows the forking thread): the worker runs tasks on its main thread.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from orchestrator import taskrunner  # stdlib only at import: what every task runs first, loaded here

TEMPLATE_MODULE = "orchestrator.template"
# Room in the template's argv for its children's titles: with SPT_NOENV setproctitle rewrites the argv
# area only, so /proc/<pid>/environ stays readable (the soak and the chaos tests read it).
_TITLE_ROOM = 1024


class TemplateUnavailable(RuntimeError):
    """The template process could not be started, or died: the task it was running is lost."""


# --- pool process side -----------------------------------------------------------------------------------


class TaskTemplate:
    """The pool process's handle on its template: start it, have it fork a task, collect exit codes."""

    def __init__(self, proc: subprocess.Popen, channel: Connection) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.owner_pid = os.getpid()
        self._channel = channel
        self._lock = threading.Lock()
        self._waiting: set[int] = set()
        self._exited: dict[int, int] = {}
        self._closed = False

    @classmethod
    def start(cls, *, deadline: float) -> TaskTemplate:
        from django.conf import settings

        ours, theirs = socket.socketpair()
        env = dict(os.environ, SPT_NOENV="1")
        # Under override_settings SETTINGS_MODULE reads None; the environment names the module then.
        env["DJANGO_SETTINGS_MODULE"] = env.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    TEMPLATE_MODULE,
                    str(os.getpid()),
                    str(theirs.fileno()),
                    " " * _TITLE_ROOM,
                ],
                stdin=subprocess.DEVNULL,
                cwd=str(settings.BASE_DIR),
                env=env,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a Ctrl-C meant for the worker's terminal must not reach it
            )
        finally:
            theirs.close()
        template = cls(proc, Connection(ours.detach()))
        try:
            if "ready" not in template._read(deadline):
                raise TemplateUnavailable("unexpected first message from the task template")
        except BaseException:
            template.close()
            raise
        return template

    def alive(self) -> bool:
        return not self._closed and self.owner_pid == os.getpid() and self.proc.poll() is None

    def fork_task(self, request: dict[str, Any], deadline: float) -> int:
        """Fork a task's process; its pid, which is also its process group's id."""
        with self._lock:
            try:
                self._channel.send(request)
                while True:
                    message = self._read(deadline)
                    if "forked" in message:
                        self._waiting.add(message["forked"])
                        return message["forked"]
                    if "error" in message:
                        raise TemplateUnavailable(f"the task template could not fork: {message['error']}")
                    self._file(message)
            except BaseException:
                # Interrupted (a deadline, a soft time limit, EOF): the stream is at an unknown point, and
                # a late task would run unsupervised. The template goes, with every group it forked.
                self.close()
                raise

    def wait_exit(self, pid: int, deadline: float) -> int | None:
        """The task process's exit code (negative: the signal that killed it), or None at the deadline."""
        with self._lock:
            try:
                while pid not in self._exited:
                    self._file(self._read(deadline))
            except TimeoutError:
                return None
            except BaseException:
                self.close()
                raise
            self._waiting.discard(pid)
            return self._exited.pop(pid)

    def forget(self, pid: int) -> None:
        """Stop waiting for this task process: its exit report, when it comes, is dropped."""
        with self._lock:
            self._waiting.discard(pid)
            self._exited.pop(pid, None)

    def _file(self, message: dict[str, Any]) -> None:
        if message.get("exited") in self._waiting:
            self._exited[message["exited"]] = message["code"]

    def _read(self, deadline: float) -> dict[str, Any]:
        """The next message; TimeoutError at the deadline; TemplateUnavailable once the template is gone."""
        if not self._channel.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("the task template did not answer in time")
        try:
            return self._channel.recv()
        except EOFError:
            self.close()
            raise TemplateUnavailable("the task template process exited") from None

    def close(self) -> None:
        """Close the channel and end the template (it kills any task group it still has)."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        if self.owner_pid != os.getpid():
            return  # a forked copy of the handle: the template belongs to the process that started it
        try:
            self.proc.wait(timeout=5)  # it exits by itself once the channel is closed
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_template: TaskTemplate | None = None
_template_lock = threading.Lock()


def task_template(*, deadline: float) -> TaskTemplate:
    """This process's live template, started (or replaced, if it died) on demand."""
    global _template
    with _template_lock:
        if _template is not None and not _template.alive():
            _template.close()
            _template = None
        if _template is None:
            _template = TaskTemplate.start(deadline=deadline)
        return _template


def stop_task_template() -> None:
    """End this process's template, if it has one; the next task starts a new one.

    A template keeps the stdout and stderr it was started with (its tasks write there): a caller that
    redirects its own, as a test capturing a task's output does, stops the template first.
    """
    global _template
    with _template_lock:
        if _template is not None:
            _template.close()
            _template = None


def running_template_pid() -> int | None:
    """The pid of this process's template, if it has a live one (tests tell it from task processes)."""
    template = _template
    return template.pid if template is not None and template.alive() else None


# --- template side ---------------------------------------------------------------------------------------


def _preload() -> None:
    """Import once what every task would import: Django, the ORM, the job modules. Open nothing."""
    import gc
    import logging

    import django
    from django.conf import settings

    # A task needs the ORM for the orchestrator's own models only.
    settings.INSTALLED_APPS = ["django.contrib.contenttypes", "orchestrator"]
    django.setup()
    from django.db import connections

    from orchestrator.jobs.registry import import_job_modules

    try:
        import_job_modules()  # with the modules of their tasks
    except Exception as exc:  # the task that needs the broken module fails in its own process
        logging.getLogger("orchestrator.template").warning(
            "job modules could not be loaded in the task template", extra={"error": type(exc).__name__}
        )
    if any(conn.connection is not None for conn in connections.all(initialized_only=True)):
        raise RuntimeError("the task template holds a database connection")  # the forks would share it
    # Keep the collector off what was imported: a task touching those objects' GC headers would copy (on
    # write) most of the template's pages into every fork.
    gc.freeze()


class _Template:
    def __init__(self, channel: Connection) -> None:
        self.channel = channel
        self.pid = os.getpid()
        self.tasks: set[int] = set()
        # SIGCHLD writes a byte here (signal.set_wakeup_fd), which wakes `serve` to reap.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def kill_all_and_exit(self, signum: int = 0, frame: object = None) -> None:
        for pid in self.tasks:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.channel.send(message)
        except OSError:
            self.kill_all_and_exit()

    def reap(self) -> None:
        """Reap every child that ended (tasks, and the orphans a subreaper inherits); report the tasks."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.tasks:
                self.tasks.discard(pid)
                self.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def fork(self, request: dict[str, Any]) -> None:
        """Fork the task's process; report it once it leads its own session and group."""
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(ready_r)
                os.setsid()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                for fd in (self.channel.fileno(), self.wake_r, self.wake_w):
                    os.close(fd)
                os.write(ready_w, b"\0")
                os.close(ready_w)
                code = taskrunner.run(request, template_pid=self.pid)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)  # no interpreter teardown: the outcome is written, the group is killed anyway
        os.close(ready_w)
        started = os.read(ready_r, 1) == b"\0"  # EOF: it died before its setsid()
        os.close(ready_r)
        if started:
            self.tasks.add(pid)
            self.send({"forked": pid})
        else:
            self.send({"error": "the task process died before it started"})

    def serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.channel, self.wake_r], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)  # wake-ups left over keep the pipe readable: we come back
            self.reap()
            if self.channel in ready:
                try:
                    request = self.channel.recv()
                except EOFError:
                    self.kill_all_and_exit()  # the pool process is gone or let us go
                self.fork(request)


def main(argv: list[str]) -> None:
    pool_pid, channel = int(argv[0]), Connection(int(argv[1]))
    template = _Template(channel)
    signal.signal(signal.SIGTERM, template.kill_all_and_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not taskrunner.die_with_parent(pool_pid, reap_orphans=True):
        os._exit(0)
    import setproctitle

    setproctitle.setproctitle(f"{sys.executable} -m {TEMPLATE_MODULE} --pool-pid {pool_pid}")
    _preload()
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(template.wake_w)
    template.send({"ready": template.pid})
    template.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
