"""A cancel that comes while the run's worker is unreachable (issue 32, item 2; docs/ARCHITECTURE.md,
guarantee 7): the run still ends `cancelled`, by fencing, within a lease (and a reaper pass); the worker,
once back, writes nothing over it and stops the run's task processes.
"""

from __future__ import annotations

import signal

import pytest

from orchestrator.models import Job, Run
from orchestrator.taskprocs import live_runs
from schedules import cancelling, runstate
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import FAST, running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LEASE = float(FAST["WORKER_LEASE_SECONDS"])


def test_cancel_while_the_worker_is_cut_off__the_reaper_ends_the_run_cancelled_and_the_worker_writes_nothing(
    redis_client, tmp_path, settings
):
    settings.WORKER_LEASE_SECONDS = LEASE  # this process's reaper, as the workers'
    schedule = Schedule.objects.create(
        name="cancel-cut-off",
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text="60",
        overlap_policy="allow",
    )
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="cutoff", concurrency=1) as worker:
        scheduled = run_now(schedule)
        wait_for(lambda: scheduled.run_id in live_runs(), timeout=60, what="the run executing")
        worker.kill(signal.SIGSTOP)  # no heartbeat, no lease renewal, no listener: a partition
        try:
            asked = cancelling.cancel_run(scheduled.run_id, by="ops", grace=2)
            assert asked.status == "running"
            wait_for(
                lambda: scheduled.run_id in runstate.reap_lost_runs(),
                timeout=LEASE * 5,
                interval=0.2,
                what="the run ended by the reaper once its lease expired",
            )
            ended = Run.objects.get(pk=scheduled.run_id)
        finally:
            worker.kill(signal.SIGCONT)
        # Back: the cancel (or its own fence) stops the task processes, and its finish is refused.
        wait_for(lambda: scheduled.run_id not in live_runs(), timeout=LEASE * 5, what="task processes gone")
        wait_for(
            lambda: "run ended but was no longer ours" in worker.log(),
            timeout=LEASE * 5,
            what="the worker back, its finish refused",
        )

    run = Run.objects.get(pk=scheduled.run_id)
    assert (run.status, run.error_summary, run.cancelled_by) == ("cancelled", "cancelled by ops", "ops")
    assert run.finished_at == ended.finished_at
    scheduled = ScheduledRun.objects.get(pk=scheduled.pk)
    assert (scheduled.status, scheduled.error_summary) == ("cancelled", "cancelled by ops")
