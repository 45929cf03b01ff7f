"""Counts the SQL statements a benchmarked process sends, and writes the total when it exits.

Installed by the benchmark settings modules (ours and django-celery-beat's alike), so both schedulers
are counted the same way: every statement that goes through Django's database connection.

With BENCH_STATEMENTS_TALLY set (benchmarks/e2e.py), every statement also appends one line
`<pid> <role> <VERB> <table>` to that file. The append is one O_APPEND write, atomic between processes,
so the tally survives what an exit hook does not: pool processes that leave by `os._exit`, task
children, SIGKILL. The role says which process of the path sent it (scheduler, worker, worker/fork for a
pool process, task, bench for the harness itself).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import sys

_count = 0
_install_pid = os.getpid()
_tally_fd: int | None = None
_tally_prefix = b""
_tally_pid = 0
_tally_path = ""
# The verb is the first word; the table the first one named after FROM, INTO or UPDATE (a CTE's
# UPDATE ... RETURNING names its table too).
_TABLE = re.compile(r'\b(?:FROM|INTO|UPDATE)\s+"?([A-Za-z_][\w.]*)"?', re.IGNORECASE)


def _role() -> str:
    explicit = os.environ.get("BENCH_ROLE")
    argv = " ".join(sys.argv)
    if explicit:
        role = explicit
    elif "run_scheduler" in argv:
        role = "scheduler"
    elif "run_worker" in argv:
        role = "supervisor"
    elif "taskrunner" in argv:
        role = "task"
    elif " beat" in argv:
        role = "beat"
    elif " worker" in argv:
        role = "worker"
    else:
        role = "other"
    if os.getpid() != _install_pid and role in {"worker", "scheduler"}:
        role += "/fork"
    return role


def _tally(sql: str) -> None:
    global _tally_fd, _tally_prefix, _tally_pid, _tally_path
    path = os.environ.get("BENCH_STATEMENTS_TALLY")
    if not path:
        return
    pid = os.getpid()
    if _tally_fd is None or pid != _tally_pid or path != _tally_path:
        if _tally_fd is not None and pid == _tally_pid:
            os.close(_tally_fd)
        _tally_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _tally_pid, _tally_path = pid, path
        _tally_prefix = f"{pid} {_role()} ".encode()
    head = sql.lstrip()
    verb = head.split(None, 1)[0].upper() if head else "?"
    match = _TABLE.search(head)
    # No table named: the statement's first words say what it is (`SELECT pg_advisory_lock(...)`).
    table = match.group(1) if match else "_".join(head.split()[1:3])[:60] or "-"
    os.write(_tally_fd, _tally_prefix + f"{verb} {table}\n".encode())


def _wrapper(execute, sql, params, many, context):
    global _count
    _count += 1
    try:
        _tally(sql)
    except OSError:
        pass
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
