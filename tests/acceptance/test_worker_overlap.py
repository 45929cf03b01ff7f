"""Overlap with a real worker (docs/ARCHITECTURE.md, guarantee 6): a `buffer_one` schedule's waiting run
starts only after the
run before it has ended, even with free pool processes; an `allow` schedule's runs overlap."""

from __future__ import annotations

import pytest

from orchestrator.models import Job
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _schedule(name: str, overlap_policy: str) -> Schedule:
    return Schedule.objects.create(
        name=name,
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text="1.5",
        overlap_policy=overlap_policy,
    )


def _both_finished(ids: list[int]) -> list[ScheduledRun] | None:
    rows = list(ScheduledRun.objects.filter(pk__in=ids).order_by("started_at"))
    return rows if all(r.status in {"succeeded", "failed"} for r in rows) else None


@pytest.mark.parametrize(("policy", "overlapping"), [("buffer_one", False), ("allow", True)])
def test_overlap_policy__decides_whether_two_runs_of_one_schedule_overlap(
    redis_client, tmp_path, policy, overlapping
):
    schedule = _schedule(f"overlap-{policy}", policy)
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=2) as worker:
        first, second = run_now(schedule), run_now(schedule)
        rows = wait_for(
            lambda: _both_finished([first.pk, second.pk]), timeout=240, interval=0.2, what="runs done"
        )
    assert [r.status for r in rows] == ["succeeded", "succeeded"], worker.log()[-3000:]
    earlier, later = rows
    assert (later.started_at < earlier.finished_at) is overlapping
