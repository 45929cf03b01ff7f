"""Redis (broker and semaphores) restarted with its data lost while runs wait: they complete afterwards.

Uses a private redis-server on a free port: the shared one is never restarted.
"""

from __future__ import annotations

import pytest
from celery import Celery
from django.db import transaction
from django.utils import timezone

from orchestrator.models import Job, Run
from schedules.dispatch import launch_run
from schedules.models import Schedule, ScheduledRun
from schedules.publishing import RUN_TASK_NAME
from tests.support import wait_for
from tests.workerproc import PrivateRedis, RunningSampler, free_port, running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RUNS = 5
CAP = 1

RUNNING_SQL = """
SELECT 'running', count(*) FROM orchestrator_run WHERE status = 'running'
"""


@pytest.fixture
def private_redis():
    server = PrivateRedis(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


def _publish(broker_url: str, scheduled: list[ScheduledRun]) -> None:
    """Publish to the private broker (the test process's own app points at the shared test Redis)."""
    publisher = Celery("publisher", broker=broker_url)
    try:
        for item in scheduled:
            publisher.send_task(
                RUN_TASK_NAME,
                kwargs={"run_id": item.run_id, "scheduled_run_id": item.pk, "job_key": "sleep"},
                task_id=item.task_id,
                queue="jobs.sleep",
                routing_key="jobs.sleep",
            )
    finally:
        publisher.close()


def _waiting_runs(schedule: Schedule, n: int) -> list[ScheduledRun]:
    items = []
    for _ in range(n):
        with transaction.atomic():
            run = launch_run(
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
    env = {"REDIS_URL": private_redis.url, "CELERY_BROKER_URL": private_redis.url}
    with (
        running_worker(["jobs.sleep"], tmp_path=tmp_path, name="rr", concurrency=3, env=env) as worker,
        RunningSampler(RUNNING_SQL) as sampler,
    ):
        scheduled = _waiting_runs(schedule, RUNS)
        _publish(private_redis.url, scheduled)
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

    assert sampler.error is None
    assert list(Run.objects.values_list("status", flat=True)) == ["succeeded"] * RUNS, worker.log()[-4000:]
    assert "waiting runs re-published" in worker.log()
    print(f"redis restart: max running={sampler.maxima}")
    # No window any more (docs/OPERATIONS.md, "Redis lost lease state"): nothing is admitted until the
    # lease sets are rebuilt from the database's running runs, so the cap holds across the restart.
    assert sampler.maxima["running"] <= CAP
