"""Real Celery worker processes (and a private Redis) for the worker's acceptance and chaos tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from django.db import connection

from orchestrator.taskprocs import TaskGroup, live_task_groups
from tests.scheduler_support import PrivateRedis, free_port  # noqa: F401 - re-exported for tests
from tests.support import process_env, wait_for

BASE_DIR = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))

# Short leases and a fast reaper so "within one lease TTL" is seconds, not minutes.
FAST = {
    "WORKER_LEASE_SECONDS": "3",
    "WORKER_REAPER_INTERVAL_SECONDS": "1",
    "WORKER_THROTTLE_BASE_SECONDS": "0.2",
    "WORKER_THROTTLE_MAX_SECONDS": "3",
    "WORKER_HARD_LIMIT_GRACE_SECONDS": "5",
    "LOG_LEVEL": "INFO",
}


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path
    name: str
    _closed: bool = field(default=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group: the parent and every pool child."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_ready(self) -> WorkerProcess:
        """Return once the worker is ready (its maintenance loop started); fail if it exited first."""
        try:
            wait_for(
                lambda: "worker maintenance started" in self.log() or self.proc.poll() is not None,
                timeout=60,
                what=f"worker {self.name} ready",
            )
        except BaseException:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        return self

    def stop(self) -> None:
        if self._closed:
            return
        self.kill(signal.SIGKILL)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self._closed = True


def start_worker(
    queues: list[str],
    *,
    tmp_path: Path,
    name: str = "w1",
    concurrency: int = 2,
    env: dict[str, str] | None = None,
    include: str = "",
    ready: bool = True,
) -> WorkerProcess:
    """A plain Celery worker; with `ready=False` it returns at once, and the caller calls `wait_ready()`
    before relying on it (to start several at the same time)."""
    log_path = tmp_path / f"worker-{name}.log"
    cmd = [
        CELERY,
        "-A",
        "project",
        "worker",
        "-Q",
        ",".join(queues),
        "-c",
        str(concurrency),
        "-P",
        "prefork",
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "INFO",
    ]
    if include:
        cmd += ["--include", include]
    worker = _spawn(cmd, log_path, name, {**FAST, **(env or {})})
    return worker.wait_ready() if ready else worker


def _spawn_ready(cmd: list[str], log_path: Path, name: str, env: dict[str, str]) -> WorkerProcess:
    """Start a worker in its own process group, logging to `log_path`; return once it is ready."""
    return _spawn(cmd, log_path, name, env).wait_ready()


def _spawn(cmd: list[str], log_path: Path, name: str, env: dict[str, str]) -> WorkerProcess:
    """Start a worker in its own process group, logging to `log_path`."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=BASE_DIR,
            env=process_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(proc=proc, log_path=log_path, name=name)


def start_run_worker(
    *,
    tmp_path: Path,
    name: str = "rw",
    jobs: str = "sleep",
    concurrency: int = 2,
    env: dict[str, str] | None = None,
    ready: bool = True,
) -> WorkerProcess:
    """A worker started the way operators start it: `manage.py run_worker` (supervising Celery). With
    `ready=False` it returns at once, as `start_worker` does."""
    log_path = tmp_path / f"run_worker-{name}.log"
    cmd = [
        sys.executable,
        "manage.py",
        "run_worker",
        "--jobs",
        jobs,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@%h",
    ]
    worker = _spawn(cmd, log_path, name, {**FAST, **(env or {})})
    return worker.wait_ready() if ready else worker


def started_together(workers: list[WorkerProcess]) -> list[WorkerProcess]:
    """Wait until each of `workers` (started with `ready=False`) is ready; stop them all if one fails."""
    try:
        for worker in workers:
            worker.wait_ready()
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers


@contextmanager
def running_worker(queues: list[str], **kwargs) -> Iterator[WorkerProcess]:
    worker = start_worker(queues, **kwargs)
    try:
        yield worker
    finally:
        worker.stop()


class RunningSampler:
    """Samples running runs from the database every 50 ms in a thread; keeps the maxima."""

    def __init__(self, sql: str, interval: float = 0.05) -> None:
        self.sql = sql
        self.interval = interval
        self.samples = 0
        self.maxima: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                with connection.cursor() as cursor:
                    cursor.execute(self.sql)
                    for label, count in cursor.fetchall():
                        self.maxima[label] = max(self.maxima.get(label, 0), int(count))
                self.samples += 1
                time.sleep(self.interval)
        except BaseException as exc:
            self.error = exc
        finally:
            connection.close()


# Set in a test's workers' environment to a fresh value: the task processes inherit it, which tells this
# test's runs from other tests' runs on a shared host (run ids repeat across test databases).
TAG_ENV = "CB_TEST_TAG"


class ProcSampler:
    """Every `interval`, the runs with a live task process group started by our workers, read from the
    operating system (orchestrator/taskprocs.py), never from the rows the code under test writes.

    Ours are the groups whose processes carry `TAG_ENV=tag` in their environment (start the workers with
    `env={TAG_ENV: tag}`): other engineers' tests may run tasks on this host meanwhile.
    """

    def __init__(self, tag: str, interval: float = 0.05) -> None:
        self.marker = f"{TAG_ENV}={tag}".encode()
        self.interval = interval
        self.samples: list[tuple[float, frozenset[int]]] = []
        self.job_of: dict[int, str] = {}  # run id -> job key, of every run seen
        self.groups_of: dict[int, set[tuple[str, int]]] = {}  # run id -> (task, pgid) of every group seen
        self.error: BaseException | None = None
        self._ours: dict[int, bool] = {}  # pgid -> tagged (a group id is not reused within a test)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)

    def __enter__(self) -> ProcSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _tagged(self, group: TaskGroup) -> bool:
        if group.pgid not in self._ours:
            for pid in group.pids:
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                self._ours[group.pgid] = self.marker in environ.split(b"\0")
                break
            else:
                return False  # gone before we could look: not counted, and looked at again next time
        return self._ours[group.pgid]

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                at = time.monotonic()
                groups = [g for g in live_task_groups().values() if self._tagged(g)]
                for group in groups:
                    self.job_of[group.run_id] = group.job_key
                    self.groups_of.setdefault(group.run_id, set()).add((group.task, group.pgid))
                self.samples.append((at, frozenset(g.run_id for g in groups)))
                self._stop.wait(self.interval)
        except BaseException as exc:
            self.error = exc

    def now(self) -> frozenset[int]:
        return self.samples[-1][1] if self.samples else frozenset()

    @property
    def max_live(self) -> int:
        return max((len(live) for _, live in self.samples), default=0)

    def max_live_of(self, job_key: str) -> int:
        """The most runs of one job seen executing at once."""
        return max((sum(self.job_of[r] == job_key for r in live) for _, live in self.samples), default=0)

    def executions(self, run_id: int, task: str) -> int:
        """How many times the run's `task` was seen executing (distinct process groups): 1 for a run that
        executed once, 2 for one executed twice."""
        return sum(1 for name, _ in self.groups_of.get(run_id, ()) if name == task)

    def seen_between(self, start: float, end: float) -> set[int]:
        return {run_id for at, live in self.samples if start <= at <= end for run_id in live}

    def last_seen(self, run_id: int) -> float | None:
        return max((at for at, live in self.samples if run_id in live), default=None)

    def first_seen(self, run_id: int) -> float | None:
        return min((at for at, live in self.samples if run_id in live), default=None)

    def over_cap(self, cap: int, origin: float = 0.0) -> list[tuple[float, list[int]]]:
        """(seconds after `origin`, run ids) of the samples with more than `cap` runs executing."""
        return [(round(at - origin, 2), sorted(live)) for at, live in self.samples if len(live) > cap]


def publish_runs(broker_url: str, scheduled) -> None:
    """Publish `sleep` run messages to a private broker (the test process's own app points at the
    shared test Redis), as schedules/publishing.py does."""
    from celery import Celery

    from schedules.publishing import RUN_TASK_NAME

    publisher = Celery("publisher", broker=broker_url)
    try:
        for item in scheduled:
            publisher.send_task(
                RUN_TASK_NAME,
                kwargs={"run_id": item.run_id, "scheduled_run_id": item.pk, "job_key": "sleep"},
                task_id=item.task_id,
                queue="jobs.sleep",
                routing_key="jobs.sleep",
            )
    finally:
        publisher.close()
