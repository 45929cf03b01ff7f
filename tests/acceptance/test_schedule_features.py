"""Issue 16 end to end: a real `run_scheduler` process and a real Celery worker, driven through the API.

The smallest interval is a minute, so three real slots would take three minutes of waiting; these tests
age rows with SQL instead, never a clock: what the scheduler decides still comes from
PostgreSQL's now().
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils.dateparse import parse_datetime

from schedules import timing
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import Processes, db_now, sql
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Seconds after the third slot's dispatch time within which the scheduler must have dispatched it
# (its LISTEN wake-up is immediate; this is a generous bound for a loaded machine, not a target).
LAG = 20


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _finished(schedule_id: int, n: int) -> list[ScheduledRun] | None:
    rows = list(ScheduledRun.objects.filter(schedule_id=schedule_id).order_by("scheduled_for"))
    done = [r for r in rows if r.status in ("succeeded", "failed")]
    return rows if len(rows) >= n and len(done) == len(rows) else None


def test_jitter_end_at_and_max_runs__fires_exactly_three_times_at_the_previewed_times_then_disables(
    api, procs, tmp_path
):
    """What this proves: the scheduler dispatches exactly the slots `preview` showed for a schedule with
    jitter, end_at and max_runs = 3 (no fourth, although the scheduler keeps running), each keyed on its
    slot; the slot whose jittered time is still ahead is not dispatched before that time and is
    dispatched within LAG seconds after it; the runs succeed on a real worker; the schedule then
    disables itself with the note "completed 3 runs".

    The shortcut: the schedule starts 105 s in the past, on a 1-minute grid anchored at start_at, so its
    first two slots are already due (its row is aged, as if it had been saved before start_at) and only
    the third is waited for, ~15 s ahead. The catch-up window lets the two past slots run (run_all).
    """
    now = db_now().replace(microsecond=0)
    start = now - timedelta(seconds=105)
    timing_fields = {
        "name": "three-and-done",
        "schedule_type": "interval",
        "interval_minutes": 1,
        "jitter_seconds": 20,
        "start_at": start.isoformat(),
        "end_at": (start + timedelta(seconds=150)).isoformat(),  # a fourth slot would be at +180 s
        "max_runs": 3,
    }
    preview = api.post(
        "/api/schedules/preview",
        {**timing_fields, "after": (start - timedelta(seconds=1)).isoformat()},
        format="json",
    )
    assert preview.status_code == 200, preview.content
    previewed = [parse_datetime(t) for t in preview.json()["times"]]
    assert len(previewed) == 3  # end_at and max_runs both stop it at three

    created = api.post(
        "/api/schedules/",
        {
            **timing_fields,
            "job_key": "sleep",
            "custom_directive_text": "0.1",
            "misfire_policy": "run_all",
            "overlap_policy": "allow",
            "catchup_window_seconds": 600,
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    sid = created.json()["id"]
    assert parse_datetime(created.json()["next_run_at"]) == previewed[2]  # saved now: only the third is ahead
    sql("UPDATE schedules_schedule SET next_run_at = %s WHERE id = %s", [previewed[0], sid])

    with running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=3):
        procs.start("--interval", "5")
        rows = wait_for(lambda: _finished(sid, 3), timeout=120, what="three runs finished")

    schedule = Schedule.objects.get(pk=sid)
    spec = timing.spec_of(schedule)
    assert [timing.dispatch_at(spec, r.scheduled_for) for r in rows] == previewed
    assert [r.trigger for r in rows] == ["schedule"] * 3
    assert [r.status for r in rows] == ["succeeded"] * 3, [r.error_summary for r in rows]
    third = rows[2]
    assert previewed[2] <= third.created_at <= previewed[2] + timedelta(seconds=LAG)
    assert (schedule.enabled, schedule.scheduled_run_count, schedule.paused_note) == (
        False,
        3,
        "completed 3 runs",
    )
    assert api.get(f"/api/schedules/{sid}").json()["runs_remaining"] == 0
    assert "slot dispatched" in procs.full_logs()


def test_backfill_of_50_slots__runs_50_runs_once_and_again_creates_none(api, procs, tmp_path):
    """What this proves: POST /backfill creates one run per missing slot of [start, end) (50 minutes of a
    1-minute schedule), published through the same path as scheduled runs so a real worker runs each
    exactly once; a second identical call creates nothing (the unique slot), with the scheduler running
    alongside and dispatching none of those past slots itself."""
    created = api.post(
        "/api/schedules/",
        {
            "name": "backfilled",
            "job_key": "sleep",
            "custom_directive_text": "0.05",
            "schedule_type": "interval",
            "interval_minutes": 1,
            "overlap_policy": "allow",
        },
        format="json",
    ).json()
    sid = created["id"]
    anchor = parse_datetime(created["next_run_at"])
    body = {
        "start": (anchor - timedelta(minutes=51)).isoformat(),
        "end": (anchor - timedelta(minutes=1)).isoformat(),
    }

    with running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=4):
        procs.start("--interval", "5")
        first = api.post(f"/api/schedules/{sid}/backfill", body, format="json").json()
        assert first == {"created": 50, "skipped": 0, "overlap_skipped": 0, "slots": 50}
        rows = wait_for(lambda: _finished(sid, 50), timeout=240, what="fifty backfilled runs finished")
        again = api.post(f"/api/schedules/{sid}/backfill", body, format="json").json()

    assert again == {"created": 0, "skipped": 50, "overlap_skipped": 0, "slots": 50}
    assert len(rows) == 50
    assert {r.trigger for r in rows} == {"backfill"}
    assert [r.status for r in rows] == ["succeeded"] * 50, {r.error_summary for r in rows}
    assert len({r.run_id for r in rows}) == 50  # one Run each, none shared, none made twice
    assert (
        ScheduledRun.objects.filter(schedule_id=sid).count() == 50
    )  # the scheduler added no slot of its own
