"""Helpers for tests that wait on real processes: polling with a deadline, never fixed sleeps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
