"""Caps hold with a real worker process and real Redis (docs/ARCHITECTURE.md, guarantee 5): 60 runs at once,
two jobs.

What executes is counted as the operating system sees it: the live task process groups of this test's
runs (orchestrator/taskprocs.py), sampled every 50 ms while the runs execute, never the rows the code
under test writes.
"""

from __future__ import annotations

import uuid

import pytest

from orchestrator.models import Job, Run
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import TAG_ENV, ProcSampler, RunningSampler, running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Only to show the caps were binding: runs waited as throttled meanwhile.
THROTTLED_SQL = "SELECT 'throttled', count(*) FROM schedules_scheduledrun WHERE status = 'throttled'"


def _schedule(name: str, job: Job, **caps) -> Schedule:
    return Schedule.objects.create(
        name=name,
        job=job,
        enabled=False,  # launched with run-now only
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text="0.2",
        overlap_policy="allow",
        **caps,
    )


def test_caps_hold__60_runs_never_exceed_global_or_per_job_cap(redis_client, tmp_path):
    sleep = Job.objects.get(key="sleep")
    sleep_b, _ = Job.objects.get_or_create(
        key="sleep_b", defaults={"name": "Sleep B", "queue": "jobs.sleep_b"}
    )
    a = _schedule("caps-a", sleep, max_global=3, max_per_job=2)
    b = _schedule("caps-b", sleep_b, max_global=3, max_per_job=2)

    tag = uuid.uuid4().hex
    # Six pool processes: more than either cap, so only the semaphore can hold the line.
    with (
        running_worker(
            ["jobs.sleep", "jobs.sleep_b"],
            tmp_path=tmp_path,
            concurrency=6,
            include="tests.worker_jobs",
            env={TAG_ENV: tag},
        ) as worker,
        ProcSampler(tag) as procs,
        RunningSampler(THROTTLED_SQL) as waiting,
    ):
        for _ in range(30):
            run_now(a)
            run_now(b)
        wait_for(
            lambda: Run.objects.filter(status__in=["succeeded", "failed"]).count() == 60,
            # Generous: each run starts three task processes, slow on a loaded 2-core machine.
            timeout=540,
            interval=0.5,
            what="all 60 runs finished",
        )

    assert procs.error is None, procs.error
    assert waiting.error is None, waiting.error
    statuses = list(ScheduledRun.objects.values_list("status", flat=True))
    assert statuses.count("succeeded") == 60, worker.log()[-4000:]
    assert Run.objects.filter(status="succeeded", attempt=1).count() == 60
    # Every run was seen executing, so the sampling was fine enough to catch one more.
    assert set(procs.job_of) == set(Run.objects.values_list("pk", flat=True))
    print(
        f"caps: samples={len(procs.samples)} max_live={procs.max_live} "
        f"sleep={procs.max_live_of('sleep')} sleep_b={procs.max_live_of('sleep_b')} "
        f"throttled={waiting.maxima.get('throttled', 0)}"
    )
    assert procs.max_live <= 3, f"over the global cap: {procs.over_cap(3)[:10]}"
    assert procs.max_live_of("sleep") <= 2
    assert procs.max_live_of("sleep_b") <= 2
    # The caps were reached and runs waited as throttled, so the limits above were really tested.
    assert procs.max_live >= 2
    assert waiting.maxima.get("throttled", 0) > 0
