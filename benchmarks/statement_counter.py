"""Counts the SQL statements a benchmarked process sends, and writes the total when it exits.

Installed by the benchmark settings modules (ours and django-celery-beat's alike), so both schedulers
are counted the same way: every statement that goes through Django's database connection.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys

_count = 0


def _wrapper(execute, sql, params, many, context):
    global _count
    _count += 1
    return execute(sql, params, many, context)


def _on_connection(sender, connection, **kwargs):
    if _wrapper not in connection.execute_wrappers:
        connection.execute_wrappers.append(_wrapper)


def _dump() -> None:
    path = os.environ.get("BENCH_STATEMENTS_FILE")
    if path:
        with open(path, "w") as handle:
            json.dump({"pid": os.getpid(), "statements": _count}, handle)


def install() -> None:
    from django.db.backends.signals import connection_created

    connection_created.connect(_on_connection, weak=False)
    atexit.register(_dump)
    # SIGUSR1 dumps without exiting, so a harness can read the count of a still-running process.
    if hasattr(signal, "SIGUSR1") and "pytest" not in sys.modules:
        signal.signal(signal.SIGUSR1, lambda *_: _dump())
