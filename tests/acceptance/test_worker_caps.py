"""Caps hold with a real worker process and real Redis (DESIGN 6.5): 60 runs at once, two jobs."""

from __future__ import annotations

import pytest

from orchestrator.models import Job, Run
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import RunningSampler, running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RUNNING_SQL = """
SELECT j.key, count(*) FROM orchestrator_run r JOIN orchestrator_job j ON j.id = r.job_id
 WHERE r.status = 'running' GROUP BY j.key
UNION ALL
SELECT 'all', count(*) FROM orchestrator_run WHERE status = 'running'
UNION ALL
SELECT 'throttled', count(*) FROM schedules_scheduledrun WHERE status = 'throttled'
"""


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

    # Six pool processes: more than either cap, so only the semaphore can hold the line.
    with (
        running_worker(
            ["jobs.sleep", "jobs.sleep_b"], tmp_path=tmp_path, concurrency=6, include="tests.worker_jobs"
        ) as worker,
        RunningSampler(RUNNING_SQL) as sampler,
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

    assert sampler.error is None
    statuses = list(ScheduledRun.objects.values_list("status", flat=True))
    assert statuses.count("succeeded") == 60, worker.log()[-4000:]
    assert Run.objects.filter(status="succeeded", attempt=1).count() == 60
    assert sampler.samples > 20
    print(f"caps: samples={sampler.samples} maxima={sampler.maxima}")
    assert sampler.maxima.get("all", 0) <= 3
    assert sampler.maxima.get("sleep", 0) <= 2
    assert sampler.maxima.get("sleep_b", 0) <= 2
    # The caps were reached and runs waited as throttled, so the limits above were really tested.
    assert sampler.maxima.get("all", 0) >= 2
    assert sampler.maxima.get("throttled", 0) > 0
