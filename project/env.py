"""Reading settings from the environment: small, strict helpers.

Kept apart from settings.py so they can be unit-tested without importing Django's settings.
"""

from __future__ import annotations

import os

import dj_database_url

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """An environment variable holds a value the settings cannot use."""


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def database_from_url(url: str) -> dict:
    """A Django DATABASES entry for `postgres://user:pass@host:port/name?opt=v` (dj-database-url; the
    query string becomes OPTIONS). Only PostgreSQL: the claims and leases are its SQL."""
    try:
        db = dj_database_url.parse(url)
    except ValueError as exc:  # an unknown scheme
        raise ConfigError(f"DATABASE_URL must be a postgres:// URL: {exc}") from exc
    if db["ENGINE"] != "django.db.backends.postgresql":
        scheme = url.partition(":")[0]
        raise ConfigError(f"DATABASE_URL must be a postgres:// URL, got scheme {scheme!r}")
    db["NAME"] = db["NAME"] or "postgres"
    db.setdefault("OPTIONS", {})
    return db


def database_from_parts() -> dict:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": env_str("POSTGRES_DB", "cyber_brain"),
        "USER": env_str("POSTGRES_USER", "postgres"),
        "PASSWORD": env_str("POSTGRES_PASSWORD", ""),
        "HOST": env_str("POSTGRES_HOST", "127.0.0.1"),
        "PORT": env_str("POSTGRES_PORT", "5432"),
        "OPTIONS": {},
    }
