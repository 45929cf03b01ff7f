"""Redis (broker and semaphores) restarted with its data lost while runs wait: they complete afterwards,
and the cap holds across the restart, counted from the runs' live task processes (tests/workerproc.py).

Uses a private redis-server on a free port: the shared one is never restarted.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import pytest
from django.db import transaction
from django.utils import timezone

from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import TAG_ENV, PrivateRedis, ProcSampler, free_port, publish_runs, start_run_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RUNS = 5
CAP = 1


@pytest.fixture
def private_redis():
    server = PrivateRedis(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _waiting_runs(schedule: Schedule, n: int) -> list[ScheduledRun]:
    items = []
    for _ in range(n):
        with transaction.atomic():
            run = OrchestratorService.launch(
                job=schedule.job,
                custom_directive_text=schedule.custom_directive_text,
                task3_scope="allowlist",
            )
            items.append(
                ScheduledRun.objects.create(
                    schedule=schedule,
                    run=run,
                    trigger="manual",
                    scheduled_for=timezone.now(),
                    task_id=run.task_id,
                )
            )
    return items


@contextmanager
def running_run_worker(**kwargs):
    worker = start_run_worker(**kwargs)
    try:
        yield worker
    finally:
        worker.stop()


def test_redis_restarted_while_runs_wait__they_complete_afterwards(private_redis, tmp_path):
    schedule = Schedule.objects.create(
        name="redis-restart",
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text="2",
        overlap_policy="allow",
        max_per_job=CAP,
    )
    tag = uuid.uuid4().hex
    env = {"REDIS_URL": private_redis.url, "CELERY_BROKER_URL": private_redis.url, TAG_ENV: tag}
    with (
        # Supervised, as operators run it: kombu may end a plain Celery worker when Redis restarts under
        # unacknowledged messages (worker/supervisor.py), which this restart provokes now and then.
        running_run_worker(tmp_path=tmp_path, name="rr", concurrency=3, env=env) as worker,
        ProcSampler(tag) as procs,
    ):
        scheduled = _waiting_runs(schedule, RUNS)
        publish_runs(private_redis.url, scheduled)
        wait_for(
            lambda: (
                ScheduledRun.objects.filter(status="running").count() == 1
                and ScheduledRun.objects.filter(status="throttled").count() >= 2
            ),
            timeout=60,
            what="one run running, others throttled",
        )

        private_redis.restart()  # no persistence: queued messages, retries and leases are all gone

        wait_for(
            lambda: Run.objects.filter(status__in=["succeeded", "failed"]).count() == RUNS,
            timeout=180,
            interval=0.5,
            what="all runs finished after the restart",
        )

    assert procs.error is None, procs.error
    assert list(Run.objects.values_list("status", flat=True)) == ["succeeded"] * RUNS, worker.log()[-4000:]
    assert "waiting runs re-published" in worker.log()
    print(f"redis restart: samples={len(procs.samples)} max live={procs.max_live}")
    # No window any more (docs/OPERATIONS.md, "Redis lost lease state"): nothing is admitted until the
    # lease sets are rebuilt from the database's running runs, so the cap holds across the restart.
    assert procs.max_live <= CAP, f"over the cap: {procs.over_cap(CAP)[:10]}"
    assert procs.max_live == CAP  # runs were seen executing, so the bound above was really sampled
