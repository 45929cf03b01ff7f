"""Log formatting: a readable line (default) or one JSON object per line (LOG_FORMAT=json), and the
run context that puts `run_id`, `scheduled_run_id`, `schedule_id`, `job` and `task_id` on every line
about a run, so one run can be followed across web, scheduler and worker logs.

The context is a contextvar: bound where a run is handled (the worker's task, via Celery's task
signals, monitoring/logcontext.py; `bind_run` calls in dispatch and the worker), it reaches every log
call below, including libraries', without each call site repeating the fields.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

RUN_FIELDS = ("run_id", "scheduled_run_id", "schedule_id", "job", "task_id")

_run_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "cb_run_context", default=None
)


# The runs bound in this process, by the thread that bound them. A thread a run starts (the worker's
# heartbeat threads) does not inherit contextvars; while exactly one run is bound in the process (a
# prefork pool process executes one run at a time) such a thread's lines are about that run too. With
# several (a thread pool) nothing is guessed.
_bound_by_thread: dict[int, dict[str, Any]] = {}
_bound_lock = threading.Lock()


def bind_run(**fields: Any) -> None:
    """Add run fields to the current context (None values are ignored; a new run_id starts afresh)."""
    fields = {key: value for key, value in fields.items() if key in RUN_FIELDS and value not in (None, "")}
    current = _run_context.get() or {}
    if "run_id" in fields and current.get("run_id") not in (None, fields["run_id"]):
        current = {}
    bound = {**current, **fields}
    _run_context.set(bound)
    with _bound_lock:
        _bound_by_thread[threading.get_ident()] = bound


def clear_run() -> None:
    _run_context.set(None)
    with _bound_lock:
        _bound_by_thread.pop(threading.get_ident(), None)


def _process_run() -> dict[str, Any] | None:
    """The one run bound in this process, if exactly one is."""
    with _bound_lock:
        if len(_bound_by_thread) == 1:
            return next(iter(_bound_by_thread.values()))
    return None


@contextlib.contextmanager
def run_context(**fields: Any) -> Iterator[None]:
    """The fields on every log line inside the block; the previous context comes back after it."""
    token = _run_context.set(None)
    try:
        bind_run(**fields)
        yield
    finally:
        _run_context.reset(token)
        previous = _run_context.get()
        with _bound_lock:
            if previous:
                _bound_by_thread[threading.get_ident()] = previous
            else:
                _bound_by_thread.pop(threading.get_ident(), None)


def current_run() -> dict[str, Any]:
    return dict(_run_context.get() or {})


class RunContextFilter(logging.Filter):
    """Put the bound run's fields on the record (an explicit `extra` wins); a line that names a run in
    its `extra` but has no context gets the other run fields as null, so every line about a run has all
    five keys."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _run_context.get() or _process_run()
        if context:
            for key, value in context.items():
                if not hasattr(record, key):
                    setattr(record, key, value)
        if any(hasattr(record, key) for key in ("run_id", "scheduled_run_id")):
            for key in RUN_FIELDS:
                if not hasattr(record, key):
                    setattr(record, key, None)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class StructuredFormatter(logging.Formatter):
    """`2026-11-28T04:21:14 INFO schedules.beat slot dispatched schedule_id=3 slot=...`."""

    def __init__(self) -> None:
        super().__init__(fmt="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {key: value for key, value in _fields(record).items() if value is not None}
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in sorted(fields.items()))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, every `extra` field, and the
    exception's traceback as one string. Values JSON cannot hold are written as their str()."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for key, value in _fields(record).items():
            body.setdefault(key, value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return json.dumps(body, default=str, ensure_ascii=False)
