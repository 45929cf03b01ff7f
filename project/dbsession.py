"""Per-process limits on how long a database statement may wait for a lock, or run (issue 15.4).

The scheduler and the workers run unattended loops: a statement that waits without bound on a lock
(a session left open in psql, a migration taking a table lock, a stuck transaction) would stall every
schedule or run behind it, silently. With `lock_timeout` and `statement_timeout` such a statement
fails instead, and the loop handles it like any transient database error: it backs off and retries.
The web/API and migrations keep PostgreSQL's defaults (no limit): a migration must be allowed to wait
for its lock and to run long, and a request already has the HTTP timeout.

The limits travel in the connection's startup options (`-c lock_timeout=...`), so they hold for every
connection the process opens afterwards, including reconnects, at no extra round trip.

Behind PgBouncer in transaction pool mode (`DB_TRANSACTION_POOLING`), neither works: PgBouncer refuses
the `options` startup parameter, and a session-level `SET` lands on whichever server connection the
transaction borrowed, which then hands it to other clients (the web would inherit the scheduler's
limits) while this process's next transaction runs elsewhere without them. There every statement the
process sends is prefixed, in the same query string, with `SET LOCAL lock_timeout = ...; SET LOCAL
statement_timeout = ...`: PostgreSQL runs a multi-statement query as one transaction, so the limits
hold for exactly that statement (or, inside `atomic`, the rest of the transaction) on whatever server
connection runs it, and end with it. Same round trip; Django's documented `execute_wrapper` hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connections
from django.db.backends.signals import connection_created

_OURS = re.compile(r"-c\s*(lock_timeout|statement_timeout|idle_in_transaction_session_timeout)=\S+\s*")


def apply_session_timeouts(
    *,
    lock_timeout_ms: int,
    statement_timeout_ms: int,
    idle_in_transaction_ms: int = 0,
    alias: str = "default",
) -> None:
    """Give every connection `alias` opens from now on these limits (milliseconds; 0 = no limit).

    `idle_in_transaction_ms`: PostgreSQL ends the session of a transaction left idle this long, and its
    row locks go with it (a process frozen or cut off mid-transaction holds them until then).

    Call it at process start-up, before the first query; a connection already open is closed so the
    next query reconnects with the limits.
    """
    if settings.DB_TRANSACTION_POOLING:
        _SET_LOCAL[alias] = (int(lock_timeout_ms), int(statement_timeout_ms), int(idle_in_transaction_ms))
        connection_created.connect(_install_set_local, dispatch_uid="dbsession.set_local")
        connections[alias].close()
        return
    settings_dict = connections[alias].settings_dict
    options = settings_dict.setdefault("OPTIONS", {})
    kept = _OURS.sub("", options.get("options", "")).strip()
    ours = f"-c lock_timeout={int(lock_timeout_ms)} -c statement_timeout={int(statement_timeout_ms)}"
    if idle_in_transaction_ms:
        ours += f" -c idle_in_transaction_session_timeout={int(idle_in_transaction_ms)}"
    options["options"] = f"{kept} {ours}".strip()
    connections[alias].close()


def apply_scheduler_timeouts() -> None:
    """The limits of `run_scheduler` and of Celery beat with schedules.beat.DatabaseScheduler."""
    apply_session_timeouts(
        lock_timeout_ms=settings.SCHEDULER_LOCK_TIMEOUT_MS,
        statement_timeout_ms=settings.SCHEDULER_STATEMENT_TIMEOUT_MS,
        # A scheduler frozen or cut off mid-dispatch would keep its schedules' rows locked until TCP
        # gives up (or forever, if only the process is stuck); the claim TTL must be what bounds them.
        idle_in_transaction_ms=settings.SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    )


def apply_worker_timeouts() -> None:
    """The limits of the Celery worker processes (worker/ calls this at start-up)."""
    apply_session_timeouts(
        lock_timeout_ms=settings.WORKER_LOCK_TIMEOUT_MS,
        statement_timeout_ms=settings.WORKER_STATEMENT_TIMEOUT_MS,
    )


def set_connection_lock_timeout(connection: Any, lock_timeout_ms: int) -> None:
    """Give this one connection (this thread's) its own lock timeout, for as long as it lives.

    A session `SET` on a direct connection; behind a transaction pool, the connection's `SET LOCAL`
    prefix instead (a session SET there would leak to other clients through the shared server).
    """
    if settings.DB_TRANSACTION_POOLING:
        connection.ensure_connection()
        for wrapper in connection.execute_wrappers:
            if isinstance(wrapper, SetLocalTimeouts):
                wrapper.lock_timeout_ms = int(lock_timeout_ms)
                return
        connection.execute_wrappers.append(SetLocalTimeouts(int(lock_timeout_ms), None))
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT set_config('lock_timeout', %s, false)", [f"{int(lock_timeout_ms)}ms"])


# alias -> (lock_timeout_ms, statement_timeout_ms, idle_in_transaction_ms) behind a transaction pool.
_SET_LOCAL: dict[str, tuple[int, int, int]] = {}


class SetLocalTimeouts:
    """A Django execute wrapper: each statement carries its own `SET LOCAL` limits (see the module)."""

    def __init__(
        self, lock_timeout_ms: int | None, statement_timeout_ms: int | None, idle_in_transaction_ms: int = 0
    ) -> None:
        self.lock_timeout_ms = lock_timeout_ms
        self.statement_timeout_ms = statement_timeout_ms
        self.idle_in_transaction_ms = idle_in_transaction_ms

    def prefix(self) -> str:
        parts = []
        if self.lock_timeout_ms is not None:
            parts.append(f"SET LOCAL lock_timeout = {int(self.lock_timeout_ms)}; ")
        if self.statement_timeout_ms is not None:
            parts.append(f"SET LOCAL statement_timeout = {int(self.statement_timeout_ms)}; ")
        if self.idle_in_transaction_ms:
            # Local to the transaction, which is what it limits: the server connection goes back to the
            # pool without it.
            parts.append(
                f"SET LOCAL idle_in_transaction_session_timeout = {int(self.idle_in_transaction_ms)}; "
            )
        return "".join(parts)

    def __call__(self, execute: Callable, sql: str, params: Any, many: bool, context: dict) -> Any:
        return execute(self.prefix() + sql, params, many, context)


def _install_set_local(sender: Any, connection: Any, **kwargs: Any) -> None:
    """On every new connection of a limited alias (each thread has its own), once."""
    limits = _SET_LOCAL.get(connection.alias)
    if limits is None:
        return
    for wrapper in connection.execute_wrappers:
        if isinstance(wrapper, SetLocalTimeouts):
            wrapper.lock_timeout_ms, wrapper.statement_timeout_ms, wrapper.idle_in_transaction_ms = limits
            return
    connection.execute_wrappers.append(SetLocalTimeouts(*limits))
