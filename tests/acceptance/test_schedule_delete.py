"""Deleting a schedule with runs in flight (issue 15.5), with a real scheduler and a real worker.

A delete that races a dispatch must not answer 500 (it used to: the dispatch committed a scheduled run
for the schedule the delete had already read, and the delete's deferred foreign-key check failed at
commit). Queued runs of a deleted schedule end `cancelled` and never start; a running one finishes and
keeps its outcome on its `Run`.
"""

from __future__ import annotations

import threading

import psycopg2
import pytest
from django.db import connection

from orchestrator.models import Run, RunStatus
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import Processes, make_schedule, sql
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# The scheduler must wait on the test's table lock, not give up after its default lock timeout.
PATIENT = {"SCHEDULER_LOCK_TIMEOUT_MS": "120000", "SCHEDULER_STATEMENT_TIMEOUT_MS": "0"}


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(**PATIENT), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _side_connection():
    db = connection.settings_dict
    return psycopg2.connect(
        dbname=db["NAME"],
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or "",
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
    )


def _waiting_on_locks(pattern: str) -> int:
    return sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE %s",
        [pattern],
    )[0][0]


def _dropped_as_cancelled(log: str, run_id: int) -> bool:
    return any(
        "message dropped" in line and f"run_id={run_id} " in line and "status=cancelled" in line
        for line in log.splitlines()
    )


def _delete_in_thread(api, schedule_id: int) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def delete() -> None:
        try:
            outcome["status"] = api.delete(f"/api/schedules/{schedule_id}/").status_code
        except Exception as exc:  # the test client re-raises a view's exception: that is a 500
            outcome["status"] = 500
            outcome["error"] = repr(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=delete)
    thread.start()
    return thread, outcome


def test_delete__racing_a_dispatch_answers_204_and_the_new_runs_never_start(
    api, procs, tmp_path, redis_client
):
    """The scheduler has locked the schedule and is inserting its slot's run (held there by a table lock
    the test takes) while the API deletes the schedule. Old code: 500 (deferred FK violation)."""
    schedule = make_schedule("delete-race", custom_directive_text="0.1")
    side = _side_connection()
    try:
        with side.cursor() as cursor:
            # Holds the scheduler's INSERT INTO orchestrator_run after it locked the schedule row.
            cursor.execute("LOCK TABLE orchestrator_run IN SHARE MODE")
        procs.start("--interval", "1")
        try:
            wait_for(
                lambda: _waiting_on_locks("%INSERT INTO%orchestrator_run%"),
                timeout=120,
                what="the scheduler's dispatch waiting on the table lock",
            )
        except AssertionError:
            print(sql("SELECT state, wait_event_type, left(query, 200) FROM pg_stat_activity"))
            print(procs.logs())
            raise
        thread, outcome = _delete_in_thread(api, schedule.pk)
        wait_for(
            lambda: _waiting_on_locks("%schedules_schedule%") or not thread.is_alive(),
            timeout=30,
            what="the delete waiting on the dispatch's row lock",
        )
    finally:
        side.rollback()  # lets the dispatch commit first
        side.close()
    thread.join(timeout=60)
    assert outcome.get("status") == 204, (outcome, procs.logs())
    assert not Schedule.objects.filter(pk=schedule.pk).exists()
    assert not ScheduledRun.objects.filter(schedule_id=schedule.pk).exists()

    runs = wait_for(
        lambda: list(Run.objects.filter(trigger="schedule", custom_directive_text="0.1")),
        timeout=30,
        what="the run the dispatch made",
    )
    assert [r.status for r in runs] == [RunStatus.CANCELLED]
    assert "deleted" in runs[0].error_summary
    wait_for(lambda: redis_client.llen("jobs.sleep") == 1, timeout=30, what="its message published")

    # A worker receives the message of the cancelled run and drops it.
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="after-delete", concurrency=1) as worker:
        wait_for(
            lambda: _dropped_as_cancelled(worker.log(), runs[0].pk),
            timeout=60,
            what="message dropped",
        )
    run = Run.objects.get(pk=runs[0].pk)
    assert run.status == RunStatus.CANCELLED
    assert run.started_at is None
    assert run.attempt == 0


def test_delete__a_running_run_finishes_and_keeps_its_outcome(api, procs, tmp_path, redis_client):
    schedule = make_schedule("delete-running", custom_directive_text="3")
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="running", concurrency=1) as worker:
        procs.start("--interval", "1")
        run = wait_for(
            lambda: Run.objects.filter(status=RunStatus.RUNNING, custom_directive_text="3").first(),
            timeout=60,
            what="the run running",
        )
        assert api.delete(f"/api/schedules/{schedule.pk}/").status_code == 204
        wait_for(
            lambda: Run.objects.get(pk=run.pk).status != RunStatus.RUNNING,
            timeout=60,
            what="the run finished",
        )
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED, (run.error_summary, worker.log()[-3000:])
    assert run.finished_at is not None
    assert not ScheduledRun.objects.filter(schedule_id=schedule.pk).exists()
