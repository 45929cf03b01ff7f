"""Issue 32.6, run inputs, end to end: a real `run_scheduler`, a real Celery worker executing a job whose
tasks record the `TaskContext` they received (tests/worker_jobs.py, `context_recorder`), driven through
the API.

Rows are aged with SQL (never a clock): the schedule's next run is set three minutes back, so the
scheduler dispatches three past slots at once (`run_all`).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils.dateparse import parse_datetime

from orchestrator.jobs.registry import sync_jobs
from orchestrator.models import Job, Run
from schedules.models import ScheduledRun
from tests import worker_jobs
from tests.scheduler_support import Processes, sql
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

JOB = worker_jobs.CONTEXT_RECORDER.key


@pytest.fixture
def procs(tmp_path, redis_client):
    sync_jobs(Job)  # the test job's row, with its params_schema, as a migrate would write it
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _ended(schedule_id: int, n: int) -> list[ScheduledRun] | None:
    rows = list(ScheduledRun.objects.filter(schedule_id=schedule_id).select_related("run"))
    done = [r for r in rows if r.status in ("succeeded", "failed")]
    return rows if len(rows) >= n and len(done) == len(rows) else None


def _seen(path) -> dict[int, list[dict]]:
    """What each run's tasks recorded, by run id."""
    by_run: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_run.setdefault(record["run_id"], []).append(record)
    return by_run


def _time(value: str | None):
    return None if value is None else parse_datetime(value)


def test_tasks_of_a_real_worker_see_params_slot_previous_slot_and_attempt(api, procs, tmp_path):
    """What this proves: each of the three tasks of each run, in its own process on a real worker, gets
    the run's params, its slot (`scheduled_for`), the schedule's previous slot that launched a run
    (`previous_scheduled_for`: none for the first) and its attempt (1); a run-now's params override
    replaces the schedule's keys for that run only, and history and the run show what the run got."""
    out = tmp_path / "contexts.jsonl"
    created = api.post(
        "/api/schedules/",
        {
            "name": "inputs",
            "job_key": JOB,
            "schedule_type": "interval",
            "interval_minutes": 1,
            "misfire_policy": "run_all",
            "overlap_policy": "allow",
            "catchup_window_seconds": 600,
            "params": {"out": str(out), "label": "scheduled"},
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    sid = created.json()["id"]
    assert created.json()["params"] == {"out": str(out), "label": "scheduled"}
    anchor = parse_datetime(created.json()["next_run_at"])
    sql("UPDATE schedules_schedule SET next_run_at = %s WHERE id = %s", [anchor - timedelta(minutes=3), sid])

    with running_worker([f"jobs.{JOB}"], tmp_path=tmp_path, include="tests.worker_jobs", concurrency=2):
        procs.start("--interval", "5")
        slots = wait_for(lambda: _ended(sid, 3), timeout=120, what="three scheduled runs ended")
        now = api.post(f"/api/schedules/{sid}/run-now", {"params": {"label": "manual"}}, format="json")
        assert now.status_code == 202, now.content
        rows = wait_for(lambda: _ended(sid, 4), timeout=120, what="the manual run ended")

    slots = sorted((r for r in rows if r.trigger == "schedule"), key=lambda r: r.scheduled_for)
    manual = next(r for r in rows if r.trigger == "manual")
    assert len(slots) == 3, [(r.trigger, r.scheduled_for) for r in rows]
    assert [r.status for r in rows] == ["succeeded"] * 4, [r.error_summary for r in rows]
    seen = _seen(out)
    expected_previous = [None, slots[0].scheduled_for, slots[1].scheduled_for]
    for row, previous in zip(slots, expected_previous, strict=True):
        records = seen[row.run_id]
        assert len({r["pid"] for r in records}) == 3  # three tasks, three processes, the same inputs
        for record in records:
            assert record["params"] == {"out": str(out), "label": "scheduled"}
            assert _time(record["scheduled_for"]) == row.scheduled_for
            assert _time(record["previous_scheduled_for"]) == previous
            assert record["attempt"] == 1
    for record in seen[manual.run_id]:
        assert record["params"] == {"out": str(out), "label": "manual"}
        assert _time(record["scheduled_for"]) == manual.scheduled_for  # when it was asked for
        assert _time(record["previous_scheduled_for"]) == slots[2].scheduled_for
        assert record["attempt"] == 1
    assert len(seen[manual.run_id]) == 3

    # Shown where the runs are: history (each row's run params) and the run itself.
    history = {r["run"]: r for r in api.get(f"/api/schedules/{sid}/history").json()["results"]}
    assert history[manual.run_id]["params"] == {"out": str(out), "label": "manual"}
    assert history[slots[0].run_id]["params"] == {"out": str(out), "label": "scheduled"}
    run = api.get(f"/api/runs/{manual.run_id}/").json()
    assert run["params"] == {"out": str(out), "label": "manual"}
    assert parse_datetime(run["scheduled_for"]) == manual.scheduled_for
    assert parse_datetime(run["previous_scheduled_for"]) == slots[2].scheduled_for
    # The schedule keeps its own params: the override was for that run only.
    assert api.get(f"/api/schedules/{sid}").json()["params"] == {"out": str(out), "label": "scheduled"}


def test_params_that_no_longer_fit_a_changed_schema__fail_the_run_at_start_naming_the_path(
    api, procs, tmp_path
):
    """What this proves: a run launched with valid params, whose job's schema then changed (a deploy of
    new job code), fails when it starts, with an error naming the failing path, and no task runs."""
    out = tmp_path / "contexts.jsonl"
    launched = api.post("/api/runs/", {"job_key": JOB, "params": {"out": str(out)}}, format="json")
    assert launched.status_code == 202, launched.content
    run_id = launched.json()["id"]
    assert launched.json()["params"] == {"out": str(out)}
    assert launched.json()["scheduled_for"] is None  # no schedule, no slot
    schema = {**worker_jobs.CONTEXT_RECORDER.params_schema, "required": ["out", "label"]}
    Job.objects.filter(key=JOB).update(params_schema=schema)

    with running_worker([f"jobs.{JOB}"], tmp_path=tmp_path, include="tests.worker_jobs", concurrency=1):
        run = wait_for(
            lambda: (r := Run.objects.get(pk=run_id)).status in ("succeeded", "failed") and r,
            timeout=90,
            what="the run ended",
        )

    assert run.status == "failed"
    assert run.error_summary == "params do not fit the job's params_schema: $: 'label' is a required property"
    assert not out.exists()  # no task ran
