"""Issue 31 (6, 7): `make run` as a user starts it, in a terminal, and what a second terminal then sees.

One real `make run` (the Makefile target, scripts/run_local.sh, honcho, the Procfile's four processes)
runs under a pseudo-terminal, with its own database, Redis database, ports and run directory (never the
developer's .run/). The install steps are skipped (`make -o`): the virtualenv is already there.

- The settings it chose go to <run dir>/local.env, and `manage.py create_api_token` in a clean
  environment (no export but the run directory's location) works against that custom database; the
  real environment still wins over the file.
- Flower's password is not on any command line of the run (/proc/<pid>/cmdline, what `ps` shows), and
  Flower still refuses requests without it.
- A first start logs no warnings or errors (the worker's superuser warning aside when the tests run as
  root: that one is real).
- Ctrl-C in the terminal stops everything and `make run` exits 0, leaving no process behind.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import termios
import threading
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import pytest
import redis as redis_lib
from django.conf import settings
from django.db import connection
from psycopg2 import sql

from tests.support import wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
PYTHON = str(VENV / "bin" / "python")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def admin_connection():
    db = connection.settings_dict
    conn = psycopg2.connect(
        dbname="postgres",
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
    )
    conn.autocommit = True
    return conn


def drop_database(name: str) -> None:
    conn = admin_connection()
    with conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.close()


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def processes_of(run_dir: Path) -> dict[int, str]:
    """pid -> command line of every live process started by this run (CB_RUN_DIR in its environment)."""
    marker = f"CB_RUN_DIR={run_dir}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            found[int(proc.name)] = (
                (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
    return found


class Terminal:
    """`make run` on a pseudo-terminal it has as controlling terminal, as in a shell window."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        master, slave = os.openpty()
        self.master = master
        self.output = bytearray()

        def become_terminal_session():
            # After start_new_session's setsid(): take the pty as controlling terminal; SIGINT as a shell
            # would leave it (a test runner may have inherited it ignored).
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=become_terminal_session,
        )
        os.close(slave)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    @property
    def text(self) -> str:
        return bytes(self.output).decode(errors="replace").replace("\r\n", "\n")

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("make-run")
    run_dir = base / "run"
    database = f"{connection.settings_dict['NAME']}_makerun"
    drop_database(database)
    # A first start: nothing in the test's Redis database either (broker, leases, markers).
    with contextlib.closing(redis_lib.Redis.from_url(settings.REDIS_URL)) as client:
        client.flushdb()
    web_port, flower_port = free_port(), free_port()
    db = connection.settings_dict
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(base)),
        "LANG": "C.UTF-8",
        "TERM": "xterm",
        "POSTGRES_DB": database,
        "POSTGRES_USER": db["USER"] or "postgres",
        "POSTGRES_HOST": db["HOST"] or "127.0.0.1",
        "POSTGRES_PORT": str(db["PORT"] or 5432),
        "REDIS_URL": settings.REDIS_URL,
        "WEB_PORT": str(web_port),
        "FLOWER_PORT": str(flower_port),
        "CYBER_BRAIN_LOGS": str(base / "logs"),
        "UPLOADS_DIR": str(base / "uploads"),
        "CB_RUN_DIR": str(run_dir),
        "CB_EMBED": "0",
        "VENV": ".venv",  # as the Makefile's default: the -o below names its install stamps
    }
    if db["PASSWORD"]:
        env["POSTGRES_PASSWORD"] = db["PASSWORD"]
    # The install steps are up to date by assumption (-o): the tests share one virtualenv.
    argv = [
        "make",
        "--no-print-directory",
        "-o",
        ".venv/bin/.installed",
        "-o",
        ".venv/bin/.installed-local",
        "run",
    ]
    terminal = Terminal(argv, env)
    terminal.run_dir = run_dir
    terminal.database = database
    terminal.web = f"http://127.0.0.1:{web_port}"
    terminal.flower = f"http://127.0.0.1:{flower_port}"

    def up() -> bool:
        assert terminal.proc.poll() is None, f"make run exited:\n{terminal.text[-4000:]}"
        return http_status(terminal.web + "/api/health/") == 200

    try:
        wait_for(up, timeout=240, interval=0.5, what="make run's API")
        yield terminal
    finally:
        if terminal.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(terminal.proc.pid, signal.SIGTERM)
            try:
                terminal.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(terminal.proc.pid, signal.SIGKILL)
                terminal.proc.wait(timeout=10)
        for pid in processes_of(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.close(terminal.master)
        drop_database(database)


def clean_manage(stack, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """manage.py as in a second terminal: nothing exported (CB_RUN_DIR only says where this run's files are,
    the default being the repository's .run/)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/"),
        "CB_RUN_DIR": str(stack.run_dir),
        **extra,
    }
    return subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_run__writes_its_settings_and_manage_py_uses_them_without_exports(stack):
    local_env = stack.run_dir / "local.env"
    assert local_env.stat().st_mode & 0o077 == 0
    text = local_env.read_text()
    assert f"POSTGRES_DB={stack.database}\n" in text
    assert re.search(r"^SECRET_KEY=\S{40,}$", text, flags=re.MULTILINE)
    assert f"REDIS_URL={settings.REDIS_URL}\n" in text

    created = clean_manage(stack, "create_api_token", "second-terminal")
    assert created.returncode == 0, created.stdout + created.stderr
    token = created.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", token), created.stdout
    db = connection.settings_dict
    with (
        contextlib.closing(
            psycopg2.connect(
                dbname=stack.database,
                user=db["USER"] or None,
                password=db["PASSWORD"] or None,
                host=db["HOST"] or None,
            )
        ) as made,
        made.cursor() as cur,
    ):
        cur.execute(
            "SELECT t.key FROM authtoken_token t JOIN auth_user u ON u.id = t.user_id WHERE u.username = %s",
            ["second-terminal"],
        )
        assert cur.fetchone() == (token,)

    # The token works against the running API.
    request = urllib.request.Request(
        stack.web + "/api/schedules/", headers={"Authorization": f"Token {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200

    # The real environment wins over the file.
    show = "from django.conf import settings; print(settings.DATABASES['default']['NAME'])"
    assert clean_manage(stack, "shell", "-c", show).stdout.split()[-1] == stack.database
    assert clean_manage(stack, "shell", "-c", show, POSTGRES_DB="from_env").stdout.split()[-1] == "from_env"


def test_make_run__flower_password_is_not_on_any_command_line(stack):
    auth = (stack.run_dir / "flower_basic_auth").read_text().strip()
    password = auth.split(":", 1)[1]
    wait_for(lambda: http_status(stack.flower + "/", auth) == 200, timeout=120, interval=0.5, what="Flower")
    assert http_status(stack.flower + "/") == 401
    lines = processes_of(stack.run_dir)
    assert any("flower" in line for line in lines.values()), lines
    assert not [line for line in lines.values() if password in line]


def test_make_run__first_start_logs_no_warnings(stack):
    auth = (stack.run_dir / "flower_basic_auth").read_text().strip()

    def started() -> bool:
        text = stack.text
        return "scheduler started" in text and " ready." in text and "Visit me at" in text

    wait_for(started, timeout=120, interval=0.5, what="scheduler, worker and Flower started")
    # Flower has asked the worker about itself (where its start warned when no worker was up yet).
    wait_for(
        lambda: (
            http_status(stack.flower + "/api/workers", auth) == 200
            and "celery@" in flower_workers(stack, auth)
        ),
        timeout=60,
        interval=0.5,
        what="Flower knows the worker",
    )
    alarming = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Warning:|warning:", re.IGNORECASE)
    root_only = "SecurityWarning: You're running the worker with superuser privileges"
    found = [
        line
        for line in stack.text.splitlines()
        if alarming.search(line) and not (os.geteuid() == 0 and root_only in line)
    ]
    assert not found, "\n".join(found)


def flower_workers(stack, auth: str) -> str:
    request = urllib.request.Request(
        stack.flower + "/api/workers",
        headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def test_make_run__ctrl_c_stops_everything_and_exits_0(stack):
    assert processes_of(stack.run_dir)
    stack.ctrl_c()
    assert stack.proc.wait(timeout=90) == 0, stack.text[-3000:]
    assert "Interrupt" not in stack.text
    wait_for(lambda: not processes_of(stack.run_dir), timeout=15, interval=0.2, what="no process left")
