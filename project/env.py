"""Reading settings from the environment: small, strict helpers.

Kept apart from settings.py so they can be unit-tested without importing Django's settings.

Where a value comes from, first match wins (docs/OPERATIONS.md, "Configuration"):

1. the process environment;
2. the local env file `make run` writes, `.run/local.env` (`$CB_RUN_DIR/local.env` when CB_RUN_DIR is
   set; CB_LOCAL_ENV_FILE names another file, empty for none), so `manage.py` in a second terminal talks
   to the same database and Redis with the same SECRET_KEY without any export;
3. the default in settings.py.

The file holds `NAME=value` lines, values quoted as for sh (`set -a; . .run/local.env` works too).
"""

from __future__ import annotations

import functools
import os
import shlex
from pathlib import Path

import dj_database_url

ROOT = Path(__file__).resolve().parent.parent
# Every name read through these helpers, so `make run` can write the ones it chose (scripts/dev/preflight.py).
NAMES_READ: set[str] = set()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """An environment variable holds a value the settings cannot use."""


def local_env_path() -> Path | None:
    """The local env file this process reads, or None (CB_LOCAL_ENV_FILE set to empty)."""
    explicit = os.environ.get("CB_LOCAL_ENV_FILE")
    if explicit is not None:
        return Path(explicit) if explicit.strip() else None
    return Path(os.environ.get("CB_RUN_DIR") or ROOT / ".run") / "local.env"


def parse_env_file(text: str) -> dict[str, str]:
    """`NAME=value` lines (sh quoting, `#` comments, an optional `export `) as a dict."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, raw = line.partition("=")
        if not sep or not name.isidentifier():
            raise ConfigError(f"not a NAME=value line: {line[:40]!r}")
        words = shlex.split(raw, comments=True)
        values[name] = words[0] if words else ""
    return values


def format_env_file(values: dict[str, str]) -> str:
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(values.items()))


def local_env() -> dict[str, str]:
    """The local env file's values ({} when there is none). Looked up again on every call, because the
    process may change CB_LOCAL_ENV_FILE after its first read (project.settings_test does)."""
    path = local_env_path()
    return read_env_file(path) if path is not None else {}


@functools.cache
def read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        return parse_env_file(path.read_text())
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def lookup(name: str) -> str | None:
    """The variable's value: the environment's, else the local env file's, else None."""
    NAMES_READ.add(name)
    value = os.environ.get(name)
    return value if value is not None else local_env().get(name)


def env_str(name: str, default: str = "") -> str:
    value = lookup(name)
    return default if value is None else value


def env_bool(name: str, default: bool = False) -> bool:
    raw = lookup(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_int(name: str, default: int | None) -> int | None:
    raw = lookup(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = lookup(name)
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
