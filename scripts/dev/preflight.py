"""Preflight for `make run`: everything that must hold before the processes start.

1. PostgreSQL and Redis answer at the configured addresses; if not, say which and how to start it, exit 2.
2. The ports the processes will bind (web, Flower) are free; if not, say which, exit 3.
3. The database exists (created through the `postgres` maintenance database if missing).
4. Migrations are applied (this also syncs the job registry into `orchestrator.Job`), static files collected.
5. An admin user with a DRF API token exists; the token goes to `.run/api_token` and is printed.
6. The settings this run uses go to `.run/local.env` (0600): every variable settings.py read that is set
   (database, Redis, SECRET_KEY, paths...), so `manage.py` in another terminal needs no export
   (project/env.py reads the file after the environment).

Run with the project's virtualenv: `.venv/bin/python scripts/dev/preflight.py`. SECRET_KEY and
FLOWER_BASIC_AUTH are prepared by scripts/run_local.sh before this runs.
"""

from __future__ import annotations

import argparse
import io
import os
import secrets
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
# Local state (tokens, secrets); tests point it elsewhere so they never touch a developer's .run/.
RUN_DIR = Path(os.environ.get("CB_RUN_DIR") or ROOT / ".run")
sys.path.insert(0, str(ROOT))

# project.env has no Django import, so the database address is read exactly as settings.py reads it.
from project.env import (  # noqa: E402
    NAMES_READ,
    database_from_parts,
    database_from_url,
    env_str,
    format_env_file,
    lookup,
)

PG_START_HINT = """\
  PostgreSQL is not reachable at {where}: {error}
    On this kind of machine (Debian, PostgreSQL installed, no systemd):
      pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start
    Elsewhere: `sudo systemctl start postgresql`, `brew services start postgresql@15`, or
      docker run -d --name cb-postgres -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15
    Or point DATABASE_URL (or POSTGRES_HOST/PORT/USER/PASSWORD) at a running server."""

REDIS_START_HINT = """\
  Redis is not reachable at {where}: {error}
    On this kind of machine (Debian, redis-server installed, no systemd):
      redis-server --daemonize yes --bind 127.0.0.1 --port {port} --save "" --appendonly no
    Elsewhere: `sudo systemctl start redis-server`, `brew services start redis`, or
      docker run -d --name cb-redis -p 127.0.0.1:6379:6379 redis:7
    Or point REDIS_URL (and CELERY_BROKER_URL if set) at a running server."""


def say(message: str) -> None:
    print(f"[run] {message}", flush=True)


def database_settings() -> dict:
    url = env_str("DATABASE_URL", "")
    return database_from_url(url) if url else database_from_parts()


def pg_where(db: dict) -> str:
    return f"{db['HOST'] or 'local socket'}:{db['PORT'] or 5432} as {db['USER'] or '(default user)'}"


def pg_connect(db: dict, dbname: str):
    import psycopg2

    return psycopg2.connect(
        dbname=dbname,
        user=db["USER"] or None,
        password=db["PASSWORD"] or None,
        host=db["HOST"] or None,
        port=db["PORT"] or None,
        connect_timeout=5,
    )


def check_postgres(db: dict) -> str | None:
    """None when the server answers; otherwise the problem, with how to fix it."""
    import psycopg2

    try:
        pg_connect(db, "postgres").close()
    except psycopg2.OperationalError as exc:
        error = " ".join(str(exc).split())
        if "authentication failed" in error or "does not exist" in error or "no password" in error:
            # The server is up; the credentials are wrong. Starting it again would not help.
            return (
                f"  PostgreSQL at {pg_where(db)} refused the login: {error}\n"
                "    Check POSTGRES_USER/POSTGRES_PASSWORD (or DATABASE_URL)."
            )
        return PG_START_HINT.format(where=pg_where(db), error=error)
    return None


def check_redis(url: str, name: str, *, sentinels: str = "", master: str = "") -> str | None:
    """Ping `url`'s Redis, or the master `sentinels` name (REDIS_SENTINELS, REDIS_SENTINEL_MASTER)."""
    import redis

    from project.redisconn import connect

    try:
        client = connect(url, sentinels=sentinels, master=master, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as exc:
        parsed = urlparse(url)
        where = f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379} ({name})"
        return REDIS_START_HINT.format(
            where=where, port=parsed.port or 6379, error=" ".join(str(exc).split())
        )
    return None


def check_broker(url: str) -> str | None:
    """A Redis broker is pinged like REDIS_URL; any other (RabbitMQ: amqp://) must accept a connection."""
    parsed = urlparse(url)
    if parsed.scheme in {"redis", "rediss", "unix"}:
        return check_redis(url, "CELERY_BROKER_URL")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 5672
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return (
            f"  The Celery broker is not reachable at {host}:{port} (CELERY_BROKER_URL): {exc}\n"
            "    RabbitMQ on this kind of machine: `rabbitmq-server -detached`; elsewhere\n"
            "    `sudo systemctl start rabbitmq-server`. Or point CELERY_BROKER_URL at a running broker."
        )
    return None


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def ensure_database(db: dict) -> bool:
    """Create the configured database if missing; True when it was created."""
    from psycopg2 import sql

    conn = pg_connect(db, "postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction block.
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
            if cur.fetchone():
                return False
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            return True
    finally:
        conn.close()


def shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def command_has_option(name: str, option: str) -> bool:
    from django.core.management import get_commands, load_command_class

    app = get_commands().get(name)
    if app is None:
        return False
    parser = load_command_class(app, name).create_parser("manage.py", name)
    return any(option in action.option_strings for action in parser._actions)


def ensure_admin_token(username: str) -> tuple[str, str | None]:
    """The admin's API token, creating the staff user and the token if needed.

    Returns (token, password) where password is set only when this call created the user.
    """
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    user_model = get_user_model()
    created = not user_model.objects.filter(username=username).exists()
    if command_has_option("create_api_token", "--staff"):
        # The project's own command (docs/ARCHITECTURE.md, "API conventions") when it can make a staff user;
        # its output is not parsed.
        call_command("create_api_token", username, staff=True, stdout=io.StringIO())
        user = user_model.objects.get(username=username)
    else:
        user, _ = user_model.objects.get_or_create(username=username)
    if not (user.is_staff and user.is_superuser):
        user.is_staff = True
        user.is_superuser = True
        user.save(update_fields=["is_staff", "is_superuser"])
    password = None
    if created:
        # A fresh admin gets a random password for the Django admin, kept only in .run/ (mode 0600).
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        user.save(update_fields=["password"])
        write_private(RUN_DIR / "admin_password", password + "\n")
    token, _ = Token.objects.get_or_create(user=user)
    return token.key, password


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default=os.environ.get("CB_ADMIN_USER", "admin"))
    parser.add_argument("--web-port", type=int, default=int(os.environ.get("WEB_PORT", "9595")))
    parser.add_argument("--flower-port", type=int, default=int(os.environ.get("FLOWER_PORT", "5555")))
    parser.add_argument("--check-only", action="store_true", help="only check PostgreSQL and Redis")
    args = parser.parse_args()

    db = database_settings()
    redis_url = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
    broker_url = env_str("CELERY_BROKER_URL") or redis_url
    sentinels = env_str("REDIS_SENTINELS", "")
    master = env_str("REDIS_SENTINEL_MASTER", "mymaster")
    redis_problem = check_redis(redis_url, "REDIS_URL", sentinels=sentinels, master=master)
    problems = [p for p in (check_postgres(db), redis_problem) if p]
    # A sentinel:// broker is the master REDIS_URL's check just reached.
    if broker_url != redis_url and not broker_url.startswith("sentinel://"):
        problems += [p for p in (check_broker(broker_url),) if p]
    if problems:
        print("[run] cannot start: a service this system needs is not reachable.", file=sys.stderr)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    say(f"PostgreSQL ok ({pg_where(db)}), Redis ok ({urlparse(redis_url).netloc})")
    if args.check_only:
        return 0

    busy = [port for port in (args.web_port, args.flower_port) if port_in_use("127.0.0.1", port)]
    if busy:
        print(
            f"[run] cannot start: port(s) {', '.join(map(str, busy))} already in use on 127.0.0.1 "
            "(another `make run`? find it with `ss -ltnp`).",
            file=sys.stderr,
        )
        return 3

    if ensure_database(db):
        say(f"created database {db['NAME']!r}")

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django
    from django.core.management import call_command

    django.setup()
    say("applying migrations")
    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)

    from orchestrator.models import Job

    queues = sorted(set(Job.objects.filter(enabled=True).values_list("queue", flat=True)))

    token, password = ensure_admin_token(args.admin)
    write_private(RUN_DIR / "api_token", token + "\n")
    chosen = {name: value for name in NAMES_READ if (value := lookup(name)) is not None}
    write_private(RUN_DIR / "local.env", format_env_file(chosen))
    say(f"job queues (the worker consumes them all): {', '.join(queues)}")
    say(f"API token for user {args.admin!r}: {token}   (also in .run/api_token)")
    if password:
        say(f"Django admin login: {args.admin} / {password}   (also in .run/admin_password)")
    say(f"settings of this run in {shown(RUN_DIR / 'local.env')}: manage.py reads them, no export needed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
