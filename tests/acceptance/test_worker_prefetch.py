"""Prefetch with real workers: a run never waits reserved by a busy worker while another worker has a
free pool process (the default `WORKER_PREFETCH_MULTIPLIER` = 1, project/celery.py).

A worker that reserves more messages than it has pool processes holds the extra runs until one of its
own runs ends, however idle the other workers are. The scenario that shows it every time: four long runs
wait in the queue, one worker (two processes) starts and takes what it is allowed to, then a second
worker (two processes) joins. With prefetch 1 the first worker holds two and the second starts the other
two: all four run at once. With the old default of 4 the first worker reserves all four and two of them
start only when its first two end, 12 s later, while the second worker sits idle.
"""

from __future__ import annotations

import pytest

from orchestrator.models import Job
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Long enough that the second worker is up well before the first runs end (it boots in 3 to 7 s here); a
# slower boot fails the test (the first worker takes the last two), it cannot make it pass.
RUN_SECONDS = 12


def test_prefetch__four_12s_runs_on_two_workers_all_run_at_once_none_waits_behind_a_busy_process(
    redis_client, tmp_path
):
    schedule = Schedule.objects.create(
        name="prefetch",
        job=Job.objects.get(key="sleep"),
        enabled=False,  # launched with run-now only
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=str(RUN_SECONDS),
        overlap_policy="allow",
        max_global=4,
        max_per_job=4,
    )
    ids = [run_now(schedule).pk for _ in range(4)]

    def running() -> list[ScheduledRun]:
        return list(ScheduledRun.objects.filter(pk__in=ids, status="running"))

    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="w1", concurrency=2) as first:
        # The first worker has taken what its prefetch allows and both its processes are busy.
        wait_for(lambda: len(running()) >= 2, timeout=120, interval=0.1, what="two runs started")
        with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="w2", concurrency=2) as second:
            rows = wait_for(
                lambda: _all_finished(ids),
                timeout=240,
                interval=0.2,
                what="all four runs finished",
            )

    logs = first.log()[-3000:] + second.log()[-3000:]
    assert [r.status for r in rows] == ["succeeded"] * 4, logs
    # All four ran at the same time: every run started before any of them ended. A run reserved behind
    # a busy process would start only after one of the first two ended.
    last_start = max(r.started_at for r in rows)
    first_end = min(r.finished_at for r in rows)
    assert last_start < first_end, [(r.worker, r.started_at, r.finished_at) for r in rows]
    # And each worker ran two: the second one's free processes were used.
    by_worker = sorted(r.worker.split("@")[0] for r in rows)
    assert by_worker == ["w1", "w1", "w2", "w2"], by_worker


def _all_finished(ids: list[int]) -> list[ScheduledRun] | None:
    rows = list(ScheduledRun.objects.filter(pk__in=ids).order_by("started_at"))
    return rows if all(r.status in {"succeeded", "failed"} for r in rows) else None
