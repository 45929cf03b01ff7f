"""The task template: a process that imported Django, the orchestrator and the job modules once, and
forks one fresh process per task (DESIGN 7: per-task workers stay ephemeral; fork, don't exec).

Exec'ing `python -m orchestrator.taskrunner` for every task re-imports Django each time (about 0.3 s of
CPU, three times a run). Instead each pool process starts one template, lazily at its first task, with
`python -m orchestrator.template` (a clean exec: it inherits no database or Redis socket of the pool
process) and asks it over a socketpair for each task's process. That process leads a new session and
process group and runs the task itself (orchestrator/taskrunner.py, `serve_spare`). The template keeps
one *spare* forked ahead of need (waiting on a pipe for its one task, unlabelled until then): a task is
handed to the spare and the next spare is forked while the task runs, so the fork (a few ms for a
process this size) is off the task's path. A spare still runs exactly one task, or none if the template
goes first. One process per task, not a guardian and a runner: each process costs a fork and an exit
(about 3 ms each here), on the path of every task (issue 14).

Lifetimes, so that nothing outlives the pool process:
- the template has a parent-death signal on the pool process (SIGTERM, answered by SIGKILLing every task
  group it forked, then exiting); it also does so when the pool process closes its end of the channel;
- each task process has a parent-death signal on the template (taskrunner._lead_group), so a template
  killed with SIGKILL still takes every task group down with it (see taskrunner for the one edge: a
  task stuck in C code when the pool process and the template die together);
- the template is a child subreaper and reaps everything below it: it reports each task process's exit
  status to the pool process, and orphans of a task group do not linger as zombies. A dead template is
  replaced before the next task (`task_template`).

The template holds no database connection (checked after the imports and after each configuration)
and no socket but the channel; the forked task closes the channel first, so its Django connections are
its own, opened after the fork to the database the pool process named.

Protocol: lines. Pool process -> template: `config <JSON {"db_name", "settings"}>` before the first task
and whenever they change (the pool process's database, the test database in tests, and the settings a
task may read, runtime overrides included): the template applies them to itself and forks a new spare,
so a task process starts with them instead of applying them itself. `fork <JSON {"title", "argv",
"payload"}>` per task, whose JSON the template hands to the spare as it came, without decoding it (its
Python work and the pages it writes are paid per task, in a process whose every written page is a
copy-on-write fault). Template ->
pool process: `{"ready": pid}` once, then `{"forked": pid}` per request (a task process that has done
its setsid(), so its pgid exists) or `{"error": "..."}`, and `{"exited": pid, "code": n}` per task
process that ended (`n` as `Popen.returncode`: negative for a signal). The task's outcome itself travels
as before: the task process writes it to the payload's `result_path`.

A template started from a thread other than the pool process's main thread dies when that thread ends
(the parent-death signal follows the forking thread): the worker runs tasks on its main thread.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

TEMPLATE_MODULE = "orchestrator.template"
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Room in the template's argv for the task titles of its children. setproctitle may only rewrite the
# argv area (SPT_NOENV): clobbering the environment area too would blank /proc/<pid>/environ, which the
# soak and the chaos tests read to tell their task groups from other tests'.
_TITLE_ROOM = 1024


_RESTORE_ENV = "CYBER_BRAIN_TEMPLATE_RESTORE_ENV"


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """The template's allocator: glibc's malloc on transparent huge pages, so that a fork is cheaper.

    A fork copies the page tables of every anonymous page the template holds (about 40 MB after the
    imports) and each task process tears them down at its exit: with CPython's own allocator (1 MiB
    arenas, 4 KiB pages) that was half a task's CPU. With `PYTHONMALLOC=malloc` the objects live in
    glibc's heap, which `glibc.malloc.hugetlb=1` (glibc 2.35+) asks to be backed by transparent huge
    pages (madvise mode suffices): fewer, larger folios to copy and free, about 40% less CPU per bare
    fork and exit here (docs/BENCHMARKS.md). Where THP is off or glibc is older the tunable does
    nothing and only the allocator changes. Set only for the template and its task processes; an
    operator's own PYTHONMALLOC or glibc.malloc.hugetlb in the environment is kept.
    """
    out = {"PYTHONMALLOC": env.get("PYTHONMALLOC") or "malloc"}
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):  # an operator's choice stands
        tunables.append("glibc.malloc.hugetlb=1")
    out["GLIBC_TUNABLES"] = ":".join(tunables)
    return out


# The requests: the rest of a `fork` line is the task's JSON, which the template does not decode; the
# rest of a `config` line is the database name and settings its task processes run with.
_FORK = b"fork "
_CONFIG = b"config "
_UNSET = object()


class TemplateUnavailable(RuntimeError):
    """The template process could not be started, or died: the task it was running is lost."""


# --- pool process side -----------------------------------------------------------------------------------


class TaskTemplate:
    """The pool process's handle on its template: start it, have it fork a task, collect exit codes."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.owner_pid = os.getpid()
        self._sock = sock
        self._buffer = b""
        self._lock = threading.Lock()
        self._waiting: set[int] = set()
        self._exited: dict[int, int] = {}
        self._closed = False
        self._config: bytes | None = None  # the last configuration sent

    @classmethod
    def start(cls, *, timeout: float, preload: list[str]) -> TaskTemplate:
        from django.conf import settings

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        # Under override_settings SETTINGS_MODULE reads None; the environment names the module then.
        env["DJANGO_SETTINGS_MODULE"] = env.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
        env["SPT_NOENV"] = "1"
        start_env = {"CYBER_BRAIN_TASK_TEMPLATE": "1", **allocator_env(env)}
        # What the template puts back once it has started, so that what a task starts inherits the
        # pool process's environment, not these.
        env[_RESTORE_ENV] = json.dumps({name: os.environ.get(name) for name in start_env})
        env.update(start_env)
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    TEMPLATE_MODULE,
                    str(os.getpid()),
                    str(theirs.fileno()),
                    ",".join(preload),
                    " " * _TITLE_ROOM,
                ],
                stdin=subprocess.DEVNULL,
                cwd=str(settings.BASE_DIR),
                env=env,
                pass_fds=(theirs.fileno(),),
                # Its own session: a Ctrl-C meant for the worker's terminal must not reach it.
                start_new_session=True,
                close_fds=True,
            )
        finally:
            theirs.close()
        template = cls(proc, ours)
        try:
            message = template._read(time.monotonic() + timeout)
        except BaseException:
            template.close()
            raise
        if message is None or "ready" not in message:
            template.close()
            if message is None:
                raise TimeoutError("the task template did not start in time")
            raise TemplateUnavailable(f"unexpected message from the task template: {message}")
        return template

    def alive(self) -> bool:
        return not self._closed and self.owner_pid == os.getpid() and self.proc.poll() is None

    def fork_task(
        self, *, title: str, argv: list[str], payload: dict[str, Any], config: bytes, deadline: float
    ) -> int:
        """Fork a task's process; its pid, which is also its process group's id.

        `config`: JSON of `{"db_name", "settings"}`, the pool process's database and the settings a task
        may read (see `configure`); sent to the template only when it changed."""
        request = _FORK + json.dumps({"title": title, "argv": argv, "payload": payload}).encode() + b"\n"
        with self._lock:
            try:
                if config != self._config:
                    request = _CONFIG + config + b"\n" + request
                self._sock.sendall(request)
                self._config = config
                while True:
                    message = self._read(deadline)
                    if message is None:
                        # Too slow to even fork: the template is unusable (a late task would run
                        # unsupervised), so it goes, and every group it forked with it.
                        self.close()
                        raise TimeoutError("the task template did not fork in time")
                    if "forked" in message:
                        pid = int(message["forked"])
                        self._waiting.add(pid)
                        return pid
                    if "error" in message:
                        raise TemplateUnavailable(f"the task template could not fork: {message['error']}")
                    self._file(message)
            except BaseException:
                # Whatever interrupted the exchange (a soft time limit, a signal, EOF), the stream is
                # at an unknown point: this template is not trusted again.
                self.close()
                raise

    def wait_exit(self, pid: int, deadline: float) -> int | None:
        """The task process's exit code (negative: the signal that killed it), or None at the deadline."""
        with self._lock:
            try:
                while pid not in self._exited:
                    message = self._read(deadline)
                    if message is None:
                        return None
                    self._file(message)
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
        if "exited" in message:
            pid = int(message["exited"])
            if pid in self._waiting:
                self._exited[pid] = int(message["code"])

    def _read(self, deadline: float) -> dict[str, Any] | None:
        """The next message; None at the deadline; TemplateUnavailable once the template is gone."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                return json.loads(line)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self._sock], [], [], remaining)
            if not ready:
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                raise TemplateUnavailable("the task template process exited")
            self._buffer += chunk

    def close(self) -> None:
        """Close the channel and end the template (it kills any task group it still has)."""
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self.owner_pid != os.getpid():
            return  # a forked copy of the handle: the template belongs to the process that started it
        if self.proc.poll() is None:
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
            from orchestrator.jobs.registry import all_job_specs

            modules = sorted({task.func.__module__ for spec in all_job_specs() for task in spec.tasks})
            _template = TaskTemplate.start(timeout=max(deadline - time.monotonic(), 0.1), preload=modules)
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


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Template:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.pid = os.getpid()
        self.tasks: set[int] = set()
        # The template's own values of the settings the current configuration overrides.
        self.pristine: dict[str, Any] = {}
        # A task process forked ahead of need (pid, the write end of its request pipe, the read end of
        # its ready pipe): see `fork`.
        self.spare: tuple[int, int, int] | None = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def kill_all_and_exit(self, signum: int = 0, frame: object = None) -> None:
        for pid in list(self.tasks):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os._exit(0)

    def send(self, message: dict[str, Any]) -> None:
        self.send_line(json.dumps(message).encode() + b"\n")

    def send_line(self, line: bytes) -> None:
        try:
            self.channel.sendall(line)
        except OSError:
            self.kill_all_and_exit()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.spare is not None and pid == self.spare[0]:
                # A spare that died unused (killed from outside): nobody waits for it.
                self.tasks.discard(pid)
                self._drop_spare()
            elif pid in self.tasks:
                self.tasks.discard(pid)
                # The two messages of every task are formatted, not encoded: each page the template
                # writes after a fork is a copy-on-write fault, paid per task.
                self.send_line(b'{"exited": %d, "code": %d}\n' % (pid, os.waitstatus_to_exitcode(status)))

    def _drop_spare(self) -> None:
        if self.spare is not None:
            os.close(self.spare[1])
            os.close(self.spare[2])
            self.spare = None

    def fork(self, data: bytes) -> None:
        """Hand the request (JSON, as the pool process sent it) to the spare (a fresh task process,
        waiting), then fork the next."""
        for _ in range(2):
            if self.spare is None:
                self.new_spare()
            if self.spare is None:
                break
            pid, request_w, ready_r = self.spare
            self.spare = None
            try:
                # Ready once it leads its group (the pool process signals the group by this pid):
                # long since, as a rule, so this read does not wait.
                if os.read(ready_r, 1) != b"\0":
                    continue  # it died before its setsid(): take a new one
                view = memoryview(data)
                while view:
                    view = view[os.write(request_w, view) :]
            except OSError:
                continue  # it died meanwhile (reaped, or about to be): take a new one
            finally:
                os.close(request_w)
                os.close(ready_r)
            self.send_line(b'{"forked": %d}\n' % pid)
            self.new_spare()
            return
        self.send({"error": "the forked task process died before it started"})

    def configure(self, data: bytes) -> None:
        """Run the next tasks against the pool process's database and with its settings (`data`: JSON of
        `{"db_name", "settings"}`), applied here once per change instead of in every task process.

        The settings a previous configuration overrode get the template's own values back first (a name
        the pool process no longer has must not linger). The spare was forked with the old values: it is
        replaced. Applying them opens nothing: the check that no database connection exists runs here,
        so no fork inherits one.
        """
        from django.conf import settings

        from orchestrator import taskrunner

        config = json.loads(data)
        for name, value in self.pristine.items():
            if value is _UNSET:
                delattr(settings, name)
            else:
                setattr(settings, name, value)
        self.pristine = {name: getattr(settings, name, _UNSET) for name in config["settings"]}
        taskrunner.configure_django(config["db_name"], config["settings"])
        if self.spare is not None:
            pid = self.spare[0]
            self.tasks.discard(pid)  # reaped without a report
            self._drop_spare()  # its request pipe closes: EOF, it exits without running anything
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.new_spare()

    def new_spare(self) -> None:
        """Fork a task process that leads its own session and group and waits for a task.

        Not waited for here: the template goes back to its loop (reaping, reporting) while the spare
        starts, and `fork` checks it is ready when it hands it a task.
        """
        ready_r, ready_w = os.pipe()
        request_r, request_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                os.close(ready_r)
                os.close(request_w)
                os.setsid()
                self._become_task_process()
                os.write(ready_w, b"\0")
                os.close(ready_w)
                from orchestrator import taskrunner

                code = taskrunner.serve_spare(request_r, template_pid=self.pid)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    # No interpreter teardown: the result is written, the group is killed anyway.
                    os._exit(code)
        self.tasks.add(pid)
        os.close(ready_w)
        os.close(request_r)
        self.spare = (pid, request_w, ready_r)

    def _become_task_process(self) -> None:
        """In the fork: drop what is the template's (its channel, its signal handling)."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.channel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        if self.spare is not None:
            # Another spare's pipes: its EOF must come from the template.
            os.close(self.spare[1])
            os.close(self.spare[2])

    def serve(self) -> None:
        buffer = b""
        while True:
            try:
                ready, _, _ = select.select([self.channel, self.wake_r], [], [])
            except InterruptedError:
                continue
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            self.reap()
            if self.channel not in ready:
                continue
            chunk = self.channel.recv(65536)
            if not chunk:
                self.kill_all_and_exit()  # the pool process is gone or let us go
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.startswith(_FORK):
                    self.fork(line[len(_FORK) :])
                elif line.startswith(_CONFIG):
                    self.configure(line[len(_CONFIG) :])


def _preload(modules: list[str]) -> None:
    """Import once what every task would import: Django, the ORM, the job modules. Open nothing."""
    import gc
    import importlib
    import logging

    import django
    from django.conf import settings

    # As in the exec'd child (taskrunner.configure_django): a task needs the orchestrator's models only.
    settings.INSTALLED_APPS = ["django.contrib.contenttypes", "orchestrator"]
    django.setup()
    from django.db import connections
    from django.db.utils import load_backend

    load_backend(settings.DATABASES["default"]["ENGINE"])
    from orchestrator.jobs import registry

    log = logging.getLogger("orchestrator.template")
    try:
        registry.all_job_specs()
    except Exception as exc:
        # The task that needs the broken module fails in its own process, as it did before preloading.
        log.warning(
            "job registry could not be loaded in the task template", extra={"error": type(exc).__name__}
        )
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            log.warning(
                "job module could not be preloaded", extra={"job_module": name, "error": type(exc).__name__}
            )
    # What every forked task runs before its own code (a fork pays for an import with a compile too).
    import setproctitle  # noqa: F401

    from orchestrator import taskrunner  # noqa: F401

    # Nothing above should connect; if anything did, the forks must not share it.
    for conn in connections.all(initialized_only=True):
        conn.close()
        if conn.connection is not None:
            raise RuntimeError("the task template holds a database connection")
    # Keep the collector off what was imported: a task process touching those objects' GC headers
    # would copy (on write) most of the template's pages into every fork.
    gc.freeze()


def _restore_environment() -> None:
    """Undo the start-up environment (read by now: the allocator at exec, project/__init__.py at the
    imports): the task processes and what they start see the pool process's."""
    for name, value in json.loads(os.environ.pop(_RESTORE_ENV, "{}")).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def main(argv: list[str]) -> None:
    pool_pid, channel_fd, modules = int(argv[0]), int(argv[1]), [m for m in argv[2].split(",") if m]
    channel = socket.socket(fileno=channel_fd)
    template = _Template(channel)
    signal.signal(signal.SIGTERM, template.kill_all_and_exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # The pool process may have died before prctl ran: then the signal never comes.
    if os.getppid() != pool_pid:
        os._exit(0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    import setproctitle

    setproctitle.setproctitle(f"{sys.executable} -m {TEMPLATE_MODULE} --pool-pid {pool_pid}")
    _preload(modules)
    _restore_environment()
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(template.wake_w)
    template.send({"ready": template.pid})
    template.new_spare()
    template.serve()


if __name__ == "__main__":
    main(sys.argv[1:])
