"""The overlap policies `cancel_other`, `terminate_other` and `buffer_all` with a real worker (issue 32,
item 3; docs/ARCHITECTURE.md, guarantee 6), checked against the process history: which run's task
processes were alive when, sampled from /proc every 50 ms (tests/workerproc.ProcSampler).

Slots are dispatched by the scheduler's own dispatch (schedules.dispatch.dispatch_claimed), one at a time
as they would come due live: each test moves the schedule's next slot into the past and bounds it with
`end_at`, so that one pass dispatches exactly that slot.
"""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import datetime, timedelta

import pytest

from orchestrator.models import Job, Run
from schedules import cancelling
from schedules.dispatch import dispatch_claimed
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import db_now, sql
from tests.support import wait_for
from tests.workerproc import TAG_ENV, ProcSampler, running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CLAIMANT = "test:overlap"


def _schedule(name: str, policy: str, *, job_key: str = "sleep", seconds: str = "60") -> Schedule:
    job, _ = Job.objects.get_or_create(key=job_key, defaults={"name": job_key, "queue": f"jobs.{job_key}"})
    return Schedule.objects.create(
        name=name,
        job=job,
        enabled=True,
        schedule_type="interval",
        interval_minutes=1,
        custom_directive_text=seconds,
        overlap_policy=policy,
        misfire_policy="run_all",
        next_run_at=None,
    )


def _dispatch_slot(schedule: Schedule, slot: datetime) -> ScheduledRun:
    """One scheduler pass over exactly `slot`: due, bounded by end_at, claimed by us."""
    sql(
        "UPDATE schedules_schedule SET next_run_at = %s, end_at = %s, claimed_by = %s,"
        " claimed_until = now() + interval '60 seconds' WHERE id = %s",
        [slot, slot, CLAIMANT, schedule.pk],
    )
    dispatch_claimed([schedule.pk], claimant=CLAIMANT, grace=timedelta(seconds=60), ttl=60.0)
    return ScheduledRun.objects.get(schedule=schedule, trigger="schedule", scheduled_for=slot)


def _slots(count: int) -> list[datetime]:
    start = db_now().replace(second=0, microsecond=0) - timedelta(minutes=count + 1)
    return [start + timedelta(minutes=i) for i in range(count)]


def _status(scheduled: ScheduledRun) -> str:
    return ScheduledRun.objects.get(pk=scheduled.pk).status


def _one_at_a_time_in_order(procs: ProcSampler, run_ids: list[int]) -> None:
    """Never two of the runs alive at once, and each one's processes gone before the next one's came."""
    assert procs.max_live == 1, procs.over_cap(1)
    for earlier, later in itertools.pairwise(run_ids):
        assert procs.last_seen(earlier) < procs.first_seen(later), (earlier, later)


@pytest.mark.parametrize(
    ("policy", "job_key"),
    [
        ("cancel_other", "sleep"),
        # A task that ignores SIGTERM: terminate_other does not wait for it (SIGKILL at once).
        ("terminate_other", "stubborn"),
    ],
)
def test_cancelling_policies__a_new_slot_stops_the_running_run_then_starts(
    redis_client, tmp_path, policy, job_key
):
    schedule = _schedule(f"overlap-{policy}", policy, job_key=job_key)
    tag = uuid.uuid4().hex
    with (
        running_worker(
            [f"jobs.{job_key}"],
            tmp_path=tmp_path,
            concurrency=2,
            include="tests.worker_jobs",
            env={TAG_ENV: tag},
        ) as worker,
        ProcSampler(tag) as procs,
    ):
        dispatched = []
        asked = []
        for slot in _slots(3):
            asked.append(time.monotonic())
            scheduled = _dispatch_slot(schedule, slot)
            dispatched.append(scheduled)
            wait_for(lambda s=scheduled: s.run_id in procs.now(), timeout=120, what=f"slot {slot} executing")
        cancelling.cancel_run(dispatched[-1].run_id, by="test", grace=0)
        wait_for(
            lambda: all(_status(s) == "cancelled" for s in dispatched), timeout=60, what="every run cancelled"
        )

    assert procs.error is None, procs.error
    run_ids = [s.run_id for s in dispatched]
    _one_at_a_time_in_order(procs, run_ids)
    for scheduled, next_asked in zip(dispatched, asked[1:], strict=False):
        run = Run.objects.get(pk=scheduled.run_id)
        assert run.status == "cancelled", worker.log()[-3000:]
        assert run.error_summary.startswith(f"cancelled by overlap_policy {policy} (slot "), run.error_summary
        if policy == "terminate_other":
            # Killed at once although it ignores SIGTERM: well before the default grace (10 s) was over.
            assert procs.last_seen(scheduled.run_id) - next_asked < 5


def test_buffer_all__every_overlapping_slot_runs_one_at_a_time_in_slot_order(redis_client, tmp_path):
    schedule = _schedule("overlap-buffer-all", "buffer_all", seconds="2")
    tag = uuid.uuid4().hex
    with (
        running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=3, env={TAG_ENV: tag}) as worker,
        ProcSampler(tag) as procs,
    ):
        slots = _slots(4)
        first = _dispatch_slot(schedule, slots[0])
        wait_for(lambda: first.run_id in procs.now(), timeout=120, what="the first slot executing")
        dispatched = [first]
        came_at = []
        for slot in slots[1:]:
            scheduled = _dispatch_slot(schedule, slot)
            came_at.append(time.monotonic())
            dispatched.append(scheduled)
            # Each waits behind the one before (its place in line taken before the next slot comes).
            wait_for(lambda s=scheduled: _status(s) != "queued", timeout=60, what=f"slot {slot} waiting")
        wait_for(
            lambda: all(_status(s) == "succeeded" for s in dispatched),
            timeout=240,
            interval=0.2,
            what="every buffered slot done",
        )

    assert procs.error is None, procs.error
    assert [s.status for s in ScheduledRun.objects.filter(schedule=schedule)] == ["succeeded"] * 4
    _one_at_a_time_in_order(procs, [s.run_id for s in dispatched])
    assert len([s for s in dispatched if procs.first_seen(s.run_id) is not None]) == 4, worker.log()[-3000:]
    # Each slot came while the run before it was still executing or waiting: every one overlapped.
    for earlier, at in zip(dispatched, came_at, strict=False):
        assert at < procs.last_seen(earlier.run_id), (earlier.run_id, procs.last_seen(earlier.run_id) - at)


def test_buffer_all__slots_dispatched_together_still_run_in_slot_order(redis_client, tmp_path):
    """A catch-up (misfire_policy run_all) publishes every slot at once: free pool processes take them
    together, and the slot order still holds (an earlier slot gets into the line first)."""
    schedule = _schedule("overlap-buffer-all-catch-up", "buffer_all", seconds="0.5")
    slots = _slots(5)
    tag = uuid.uuid4().hex
    with (
        running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=4, env={TAG_ENV: tag}) as worker,
        ProcSampler(tag) as procs,
    ):
        sql(
            "UPDATE schedules_schedule SET next_run_at = %s, end_at = %s, claimed_by = %s,"
            " claimed_until = now() + interval '60 seconds' WHERE id = %s",
            [slots[0], slots[-1], CLAIMANT, schedule.pk],
        )
        dispatch_claimed([schedule.pk], claimant=CLAIMANT, grace=timedelta(seconds=60), ttl=60.0)
        dispatched = list(ScheduledRun.objects.filter(schedule=schedule).order_by("scheduled_for"))
        assert [s.scheduled_for for s in dispatched] == slots
        wait_for(
            lambda: all(_status(s) == "succeeded" for s in dispatched),
            timeout=240,
            interval=0.2,
            what="every slot done",
        )

    assert procs.error is None, procs.error
    _one_at_a_time_in_order(procs, [s.run_id for s in dispatched])
    assert all(procs.first_seen(s.run_id) is not None for s in dispatched), worker.log()[-3000:]
