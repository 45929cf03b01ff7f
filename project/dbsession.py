"""Per-process limits on how long a database statement may wait for a lock, or run (issue 15.4).

The scheduler and the workers run unattended loops: a statement that waits without bound on a lock
(a session left open in psql, a migration taking a table lock, a stuck transaction) would stall every
schedule or run behind it, silently. With `lock_timeout` and `statement_timeout` such a statement
fails instead, and the loop handles it like any transient database error: it backs off and retries.
The web/API and migrations keep PostgreSQL's defaults (no limit): a migration must be allowed to wait
for its lock and to run long, and a request already has the HTTP timeout.

The limits travel in the connection's startup options (`-c lock_timeout=...`), so they hold for every
connection the process opens afterwards, including reconnects, at no extra round trip.
"""

from __future__ import annotations

import re

from django.conf import settings
from django.db import connections

_OURS = re.compile(r"-c\s*(lock_timeout|statement_timeout)=\S+\s*")


def apply_session_timeouts(
    *, lock_timeout_ms: int, statement_timeout_ms: int, alias: str = "default"
) -> None:
    """Give every connection `alias` opens from now on these limits (milliseconds; 0 = no limit).

    Call it at process start-up, before the first query; a connection already open is closed so the
    next query reconnects with the limits.
    """
    settings_dict = connections[alias].settings_dict
    options = settings_dict.setdefault("OPTIONS", {})
    kept = _OURS.sub("", options.get("options", "")).strip()
    ours = f"-c lock_timeout={int(lock_timeout_ms)} -c statement_timeout={int(statement_timeout_ms)}"
    options["options"] = f"{kept} {ours}".strip()
    connections[alias].close()


def apply_scheduler_timeouts() -> None:
    """The limits of `run_scheduler` and of Celery beat with schedules.beat.DatabaseScheduler."""
    apply_session_timeouts(
        lock_timeout_ms=settings.SCHEDULER_LOCK_TIMEOUT_MS,
        statement_timeout_ms=settings.SCHEDULER_STATEMENT_TIMEOUT_MS,
    )


def apply_worker_timeouts() -> None:
    """The limits of the Celery worker processes (worker/ calls this at start-up)."""
    apply_session_timeouts(
        lock_timeout_ms=settings.WORKER_LOCK_TIMEOUT_MS,
        statement_timeout_ms=settings.WORKER_STATEMENT_TIMEOUT_MS,
    )
