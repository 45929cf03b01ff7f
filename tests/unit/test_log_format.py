"""project/logging.py: the run context on every line (also from threads the run starts) and
LOG_FORMAT=json's one object per line. Pure logging, no database."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from project.logging import JsonFormatter, RunContextFilter, StructuredFormatter, bind_run, clear_run


@pytest.fixture
def capture():
    """A logger whose handler has the filter and JSON formatter of settings.LOGGING."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RunContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.log_format")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)
    clear_run()


RUN = {"run_id": 7, "scheduled_run_id": 9, "schedule_id": 3, "job": "sleep", "task_id": "t-7"}


def test_bound_fields_reach_every_line_and_explicit_extra_wins(capture):
    logger, lines = capture
    bind_run(run_id=7, scheduled_run_id=9, job="sleep", task_id="t-7")
    bind_run(schedule_id=3)
    logger.info("run started")
    logger.info("explicit", extra={"job": "other"})
    clear_run()
    logger.info("after the run")
    first, second, third = lines()
    assert {k: first[k] for k in RUN} == RUN
    assert second["job"] == "other"
    assert "run_id" not in third


def test_a_line_naming_a_run_without_context_has_every_field_as_null(capture):
    logger, lines = capture
    logger.warning("run reaped", extra={"run_id": 5})
    (line,) = lines()
    assert line["run_id"] == 5
    assert all(line[k] is None for k in RUN if k != "run_id")


def test_a_thread_the_run_starts_logs_with_the_run_while_one_run_is_bound(capture):
    logger, lines = capture
    bind_run(**RUN)
    thread = threading.Thread(target=lambda: logger.warning("lease renewal failed"))
    thread.start()
    thread.join()
    # A second run bound in another thread (a thread pool): a context-less thread is not guessed.
    other = threading.Event()
    done = threading.Event()

    def second_run() -> None:
        bind_run(run_id=8)
        other.set()
        done.wait(5)
        clear_run()

    runner = threading.Thread(target=second_run)
    runner.start()
    other.wait(5)
    orphan = threading.Thread(target=lambda: logger.warning("who am I"))
    orphan.start()
    orphan.join()
    done.set()
    runner.join()
    heartbeat, unguessed = lines()
    assert {k: heartbeat[k] for k in RUN} == RUN
    assert "run_id" not in unguessed


def test_json_lines_hold_exceptions_and_odd_values_on_one_line(capture):
    logger, lines = capture
    try:
        raise ValueError("multi\nline")
    except ValueError:
        logger.exception("failed", extra={"when": object(), "count": 2})
    (line,) = lines()
    assert line["level"] == "ERROR"
    assert line["count"] == 2
    assert "ValueError: multi\nline" in line["exception"]
    assert line["logger"] == "test.log_format"


def test_the_text_format_prints_fields_as_key_value_and_skips_nulls():
    record = logging.makeLogRecord({"msg": "slot dispatched", "levelname": "INFO", "name": "beat"})
    record.run_id, record.task_id = 4, None
    assert StructuredFormatter().format(record).endswith("slot dispatched run_id=4")
