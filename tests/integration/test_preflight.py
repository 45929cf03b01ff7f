"""`make run`'s preflight (scripts/dev/preflight.py) as a subprocess against the real servers.

It must name the unreachable service and how to start it (exit 2), create a missing database, migrate,
and leave an admin user with a stable API token, without touching the developer's .run/.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from django.db import connection
from psycopg2 import sql

from tests.support import process_env

ROOT = Path(__file__).resolve().parents[2]
PREFLIGHT = ROOT / "scripts" / "dev" / "preflight.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_preflight(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(PREFLIGHT),
            "--web-port",
            str(free_port()),
            "--flower-port",
            str(free_port()),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture
def base_env(tmp_path) -> dict[str, str]:
    return process_env(CB_RUN_DIR=str(tmp_path / "run"))


@pytest.mark.django_db
def test_preflight__names_both_unreachable_services_and_how_to_start_them(base_env):
    env = {**base_env, "POSTGRES_PORT": str(free_port()), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    env.pop("CELERY_BROKER_URL")
    result = run_preflight(env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "PostgreSQL is not reachable" in result.stderr
    assert "pg_ctlcluster --skip-systemctl-redirect" in result.stderr
    assert "Redis is not reachable" in result.stderr
    assert "redis-server --daemonize yes" in result.stderr


@pytest.mark.django_db
def test_preflight__names_only_redis_when_only_redis_is_down(base_env):
    env = {**base_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    env.pop("CELERY_BROKER_URL")
    result = run_preflight(env)
    assert result.returncode == 2
    assert "Redis is not reachable" in result.stderr
    assert "PostgreSQL" not in result.stderr


@pytest.mark.django_db
def test_preflight__refuses_a_port_in_use(base_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(PREFLIGHT), "--web-port", str(port), "--flower-port", str(free_port())],
            env=base_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )
    assert result.returncode == 3
    assert str(port) in result.stderr


@pytest.mark.django_db
def test_preflight__creates_the_database_migrates_and_keeps_one_admin_token(base_env, tmp_path):
    name = f"{connection.settings_dict['NAME']}_preflight"
    admin = psycopg2.connect(
        dbname="postgres",
        user=connection.settings_dict["USER"] or None,
        password=connection.settings_dict["PASSWORD"] or None,
        host=connection.settings_dict["HOST"] or None,
        port=connection.settings_dict["PORT"] or None,
    )
    admin.autocommit = True
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with admin.cursor() as cur:
        cur.execute(drop)
    try:
        env = {**base_env, "POSTGRES_DB": name}
        first = run_preflight(env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"created database '{name}'" in first.stdout
        token = (tmp_path / "run" / "api_token").read_text().strip()
        assert len(token) == 40
        assert token in first.stdout
        assert (tmp_path / "run" / "api_token").stat().st_mode & 0o077 == 0
        assert "jobs.sleep" in first.stdout

        second = run_preflight(env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "created database" not in second.stdout
        assert (tmp_path / "run" / "api_token").read_text().strip() == token

        check = psycopg2.connect(
            dbname=name,
            user=connection.settings_dict["USER"] or None,
            password=connection.settings_dict["PASSWORD"] or None,
            host=connection.settings_dict["HOST"] or None,
            port=connection.settings_dict["PORT"] or None,
        )
        try:
            with check.cursor() as cur:
                cur.execute(
                    "SELECT u.is_staff, u.is_superuser FROM auth_user u "
                    "JOIN authtoken_token t ON t.user_id = u.id WHERE u.username = 'admin' AND t.key = %s",
                    [token],
                )
                assert cur.fetchone() == (True, True)
        finally:
            check.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(drop)
        admin.close()


@pytest.mark.django_db
def test_preflight__a_rabbitmq_broker_is_checked_by_its_port_not_as_redis(base_env):
    """CELERY_BROKER_URL=amqp://... (issue 15.8): named when down, never pinged as a Redis."""
    env = {**base_env, "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}
    result = run_preflight(env, "--check-only")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "The Celery broker is not reachable" in result.stderr
    assert "Redis is not reachable" not in result.stderr
