"""Deleting a schedule cancels its runs that have not started (issue 15.5); the start gate refuses them.

The races with a real scheduler and worker are in tests/acceptance/test_schedule_delete.py; these pin
the pieces against PostgreSQL: run_cancel, run_start on a cancelled run, run-now racing a delete.
"""

from __future__ import annotations

import threading

import psycopg2
import pytest
from django.db import connection
from django.http import Http404

from orchestrator.models import Run, RunStatus
from schedules import runstate, services
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import make_schedule, sql
from tests.support import wait_for


def _side_connection():
    db = connection.settings_dict
    return psycopg2.connect(
        dbname=db["NAME"],
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or "",
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
    )


@pytest.mark.django_db
def test_delete__cancels_queued_and_throttled_runs_leaves_running_ones(redis_client):
    schedule = make_schedule("cancel-me", enabled=False)
    queued, throttled, running = (run_now(schedule) for _ in range(3))
    runstate.run_mark_throttled(throttled.run_id, throttled.pk, "waiting: per-job cap 1 reached")
    assert runstate.run_start(running.run_id, running.pk, worker="w@h:1", lease_seq=None) == 1

    services.delete_schedule(schedule)

    assert not Schedule.objects.filter(pk=schedule.pk).exists()
    assert not ScheduledRun.objects.filter(schedule_id=schedule.pk).exists()
    runs = {r.pk: r for r in Run.objects.all()}
    for sr in (queued, throttled):
        run = runs[sr.run_id]
        assert run.status == RunStatus.CANCELLED
        assert run.finished_at is not None
        assert run.error_summary == "cancelled: schedule 'cancel-me' was deleted"
    assert runs[running.run_id].status == RunStatus.RUNNING
    # The running one still finishes on its Run (its scheduled run is gone with the schedule).
    assert runstate.run_finish(running.run_id, running.pk, status="succeeded", attempt=1)
    assert Run.objects.get(pk=running.run_id).status == RunStatus.SUCCEEDED


@pytest.mark.django_db
def test_run_start__refuses_a_cancelled_run(redis_client):
    schedule = make_schedule("gate", enabled=False)
    sr = run_now(schedule)
    assert runstate.run_cancel([sr.run_id], "cancelled: test") == [sr.run_id]
    sr.refresh_from_db()
    assert sr.status == "cancelled"
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) is None
    assert runstate.run_start(sr.run_id, None, worker="w@h:1", lease_seq=None, attempt=0) is None
    run = Run.objects.get(pk=sr.run_id)
    assert (run.status, run.attempt, run.started_at) == (RunStatus.CANCELLED, 0, None)
    # Cancelling again, or a run that already ended, changes nothing.
    assert runstate.run_cancel([sr.run_id], "again") == []


@pytest.mark.django_db(transaction=True)
def test_run_now__racing_a_delete_answers_404_not_an_integrity_error(redis_client):
    schedule = make_schedule("run-now-race", enabled=False)
    side = _side_connection()
    outcome: dict = {}

    def launch() -> None:
        try:
            run_now(schedule)
            outcome["result"] = "launched"
        except Http404:
            outcome["result"] = "404"
        except Exception as exc:
            outcome["result"] = repr(exc)
        finally:
            connection.close()

    try:
        with side.cursor() as cursor:
            cursor.execute("DELETE FROM schedules_schedule WHERE id = %s", [schedule.pk])
        thread = threading.Thread(target=launch)
        thread.start()
        wait_for(
            lambda: (
                sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )[0][0]
                or not thread.is_alive()
            ),
            timeout=30,
            what="run-now waiting on the delete",
        )
        side.commit()
    finally:
        side.close()
    thread.join(timeout=30)
    assert outcome == {"result": "404"}
    assert not Run.objects.exists()
