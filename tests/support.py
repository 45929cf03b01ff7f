"""Helpers for tests that wait on real processes: polling with a deadline, never fixed sleeps."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from django.conf import settings
from django.db import connection

T = TypeVar("T")


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition!r}")
        time.sleep(interval)


def process_env(**extra: str) -> dict[str, str]:
    """Environment for a process a test starts: the test database and the test Redis database."""
    db = connection.settings_dict
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "project.settings_test",
            "POSTGRES_DB": db["NAME"],
            "POSTGRES_USER": db["USER"] or "postgres",
            "POSTGRES_PASSWORD": db["PASSWORD"] or "",
            "POSTGRES_HOST": db["HOST"] or "127.0.0.1",
            "POSTGRES_PORT": str(db["PORT"] or "5432"),
            "REDIS_URL": settings.REDIS_URL,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def dump_all_tables(exclude: Iterable[tuple[str, str]] = ()) -> str:
    """Every row of every table of the test database as JSON text, one line a table.

    `exclude` names (table, column) pairs left out of the dump, for the few places a value is stored
    by design (the caller says why).
    """
    skip: dict[str, set[str]] = {}
    for table, column in exclude:
        skip.setdefault(table, set()).add(column)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        tables = [row[0] for row in cur.fetchall()]
        dump = []
        for table in tables:
            cur.execute(f"SELECT coalesce(json_agg(row_to_json(t))::text, '') FROM \"{table}\" t")
            rows = cur.fetchone()[0]
            if table in skip and rows:
                rows = json.dumps(
                    [{k: v for k, v in row.items() if k not in skip[table]} for row in json.loads(rows)]
                )
            dump.append(f"{table}: {rows}")
    assert "orchestrator_finding" in tables
    assert "orchestrator_run" in tables
    assert set(skip) <= set(tables), f"excluded tables missing: {sorted(set(skip) - set(tables))}"
    return "\n".join(dump)


def rendered_logs(records: Iterable[logging.LogRecord]) -> str:
    """Captured log records as the project's handler prints them, `extra` fields included.

    caplog.text uses pytest's own format, which leaves out the structured fields a record carries.
    """
    from project.logging import StructuredFormatter

    formatter = StructuredFormatter()
    lines = []
    for record in records:
        lines.append(formatter.format(record))
        lines.append(repr(record.args))
    return "\n".join(lines)


def admin_schedule_form(**overrides) -> dict:
    """The admin's schedule add/change form as a browser posts it: a 15-minute log_triage schedule named
    "admin-made"; an override of None leaves that field out."""
    from orchestrator.models import Job

    data = {
        "name": "admin-made",
        "job": Job.objects.get(key="log_triage").pk,
        "directive": "",
        "custom_directive_text": "",
        "enabled": "on",
        "schedule_type": "interval",
        "interval_minutes": "15",
        "cron_expr": "",
        "timezone": "UTC",
        "task3_scope": "allowlist",
        "max_global": "",
        "max_per_job": "",
        "misfire_policy": "run_once",
        "overlap_policy": "buffer_one",
        "alert_webhook_url": "",
        "_save": "Save",
        **overrides,
    }
    return {k: v for k, v in data.items() if v is not None}
