"""Guarantee 9 under kills (issue 33.3): each upstream run that ends in a qualifying status yields exactly
one downstream run, whatever is killed when.

A chain A -> B -> C. Two schedulers and two workers; A is run now 20 times (the trigger of every
upstream run) while a seeded storm SIGKILLs a scheduler or a worker at random points and starts a new
one. Worker kills fail some runs (worker lost: no downstream for those), and land between a run's
finish and anything after it; scheduler kills land inside the dependency sweep's transaction or right
after its commit. Afterwards: in SQL, every succeeded run of A has exactly one run of B linked to it
and no other run of A has any, and the same for B and C; a fan-in F after A and A2 (`all`) ran once per
date both succeeded; from what executed (each run's tasks append
their run id to a file), no run executed twice and every succeeded downstream run executed.
"""

from __future__ import annotations

import json
import logging
import random
import time
from datetime import UTC

import pytest

from orchestrator.jobs.registry import sync_jobs
from orchestrator.models import Job
from schedules import services
from schedules.models import Schedule, ScheduledRun, UpstreamEnd
from tests import worker_jobs
from tests.scheduler_support import Processes
from tests.support import process_env, wait_for
from tests.workerproc import FAST, start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
logger = logging.getLogger(__name__)

JOB = worker_jobs.CONTEXT_RECORDER.key
QUEUE = f"jobs.{JOB}"
UPSTREAM_RUNS = 20
SEED = 33
SCHEDULER_ARGS = ("--interval", "1", "--claim-ttl", "4", "--publish-grace", "2", "--republish-after", "5")


def _executions(path) -> dict[int, int]:
    counts: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                run_id = json.loads(line)["run_id"]
                counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def _settled(*schedules: Schedule) -> bool:
    unfinished = ScheduledRun.objects.filter(
        schedule__in=schedules, status__in=["queued", "throttled", "running"]
    ).exists()
    return not unfinished and not UpstreamEnd.objects.exists()


def test_kills__every_upstream_success_yields_exactly_one_downstream_run(tmp_path, redis_client):
    sync_jobs(Job)
    rng = random.Random(SEED)
    out = tmp_path / "executions.jsonl"
    job = Job.objects.get(key=JOB)
    common = {"job": job, "params": {"out": str(out)}, "overlap_policy": "allow"}
    a = services.create_schedule(name="storm-a", schedule_type="interval", interval_minutes=60 * 24, **common)
    b = services.create_schedule(name="storm-b", schedule_type="none", run_after=[a], **common)
    c = services.create_schedule(name="storm-c", schedule_type="none", run_after=[b], **common)
    # A fan-in: F runs once per date (UTC) on which both A and A2 have a succeeded run.
    a2 = services.create_schedule(
        name="storm-a2", schedule_type="interval", interval_minutes=60 * 24, **common
    )
    f = services.create_schedule(
        name="storm-f", schedule_type="none", run_after=[a, a2], run_after_mode="all", **common
    )

    procs = Processes(process_env(**FAST), tmp_path)
    workers = []
    n_workers = 0

    def new_worker():
        """A worker starting: the storm goes on while it boots (it is waited for before it is killed)."""
        nonlocal n_workers
        n_workers += 1
        return start_worker(
            [QUEUE],
            tmp_path=tmp_path,
            name=f"w{n_workers}",
            concurrency=2,
            include="tests.worker_jobs",
            ready=False,
        )

    kills = {"scheduler": 0, "worker": 0}
    try:
        schedulers = [procs.start(*SCHEDULER_ARGS) for _ in range(2)]
        workers = [new_worker(), new_worker()]
        for worker in workers:
            worker.wait_ready()
        for i in range(UPSTREAM_RUNS):
            services.run_now(a)
            if i % 5 == 0:
                services.run_now(a2)
            time.sleep(rng.uniform(0.2, 1.0))
            # A kill at a random point of what the processes are doing now; the victim is replaced.
            if rng.random() < 0.6:
                victim = rng.randrange(len(schedulers))
                procs.kill(schedulers[victim])
                schedulers[victim] = procs.start(*SCHEDULER_ARGS)
                kills["scheduler"] += 1
            if i % 4 == 3:
                victim = rng.randrange(len(workers))
                workers[victim].wait_ready()  # a worker that runs runs, not one still booting
                time.sleep(rng.uniform(0.0, 1.5))
                workers[victim].kill()
                workers[victim] = new_worker()
                kills["worker"] += 1
        wait_for(
            lambda: _settled(a, b), timeout=240, interval=0.5, what="every run ended and every end consumed"
        )
    finally:
        for worker in workers:
            worker.stop()
        procs.stop_all()
    logger.info("storm done", extra=kills)

    executed = _executions(out)
    assert max(executed.values()) <= 3  # no run executed twice (three task lines per run)
    assert len(ScheduledRun.objects.filter(schedule=a)) == UPSTREAM_RUNS
    for upstream, downstream in ((a, b), (b, c)):
        ups = list(ScheduledRun.objects.filter(schedule=upstream))
        downs = list(ScheduledRun.objects.filter(schedule=downstream))
        succeeded = {r.pk for r in ups if r.status == "succeeded"}
        assert succeeded, f"no run of {upstream.name} succeeded: the storm proved nothing"
        # SQL: exactly one downstream run per succeeded upstream run, none for the others.
        assert sorted(r.upstream_run_id for r in downs) == sorted(succeeded), (
            kills,
            [(r.pk, r.status) for r in ups],
        )
        assert all(r.trigger == "dependency" for r in downs)
        # What executed: every succeeded downstream run, once; no more downstream runs than upstream ends.
        done = {r.run_id for r in downs if r.status == "succeeded"}
        assert all(executed.get(run_id) == 3 for run_id in done)
        ran = {r.run_id for r in downs} & executed.keys()
        assert len(ran) <= len(succeeded)
    days = [
        {
            r.scheduled_for.astimezone(UTC).date()
            for r in ScheduledRun.objects.filter(schedule=s, status="succeeded")
        }
        for s in (a, a2)
    ]
    fan_in = list(ScheduledRun.objects.filter(schedule=f))
    assert sorted(r.dependency_date for r in fan_in) == sorted(days[0] & days[1])
