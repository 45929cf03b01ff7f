"""The run lifecycle's database side: the at-most-once start, fenced writes, the reaper, re-publishing."""

from __future__ import annotations

import pytest
from django.db import connection
from django.utils import timezone

from orchestrator.models import Job, Run
from schedules.dispatch import launch_run
from schedules.models import Schedule, ScheduledRun
from worker import execution, reaper

pytestmark = pytest.mark.django_db


@pytest.fixture
def sleep_job():
    return Job.objects.get(key="sleep")


@pytest.fixture
def schedule(sleep_job):
    return Schedule.objects.create(
        name="life", job=sleep_job, schedule_type="interval", interval_minutes=5, max_per_job=2, max_global=3
    )


def _scheduled_run(schedule) -> ScheduledRun:
    run = launch_run(job=schedule.job, trigger="schedule", task3_scope="allowlist")
    return ScheduledRun.objects.create(
        schedule=schedule, run=run, trigger="schedule", scheduled_for=timezone.now(), task_id=run.task_id
    )


def _age(table: str, column: str, pk: int, seconds: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {column} = now() - make_interval(secs => %s) WHERE id = %s", [seconds, pk]
        )


def test_caps_for__schedule_then_job_then_global_default(schedule, sleep_job, settings):
    settings.SCHEDULER_MAX_GLOBAL = 7
    assert [(c.scope, c.limit) for c in execution.caps_for(sleep_job, schedule)] == [
        (f"schedule:{schedule.pk}", 1),  # overlap_policy buffer_one: one run of the schedule at a time
        ("job:sleep", 2),
        ("global", 3),
    ]
    schedule.overlap_policy = "allow"
    assert [c.scope for c in execution.caps_for(sleep_job, schedule)] == ["job:sleep", "global"]
    sleep_job.max_concurrency = 4
    assert [(c.scope, c.limit) for c in execution.caps_for(sleep_job, None)] == [
        ("job:sleep", 4),
        ("global", 7),
    ]
    sleep_job.max_concurrency = None
    assert [(c.scope, c.limit) for c in execution.caps_for(sleep_job, None)] == [("global", 7)]


def test_run_start__takes_a_run_once(schedule):
    scheduled = _scheduled_run(schedule)
    execution.run_mark_throttled(scheduled.run_id, scheduled.pk, "waiting: per-job cap 2/2 for sleep")
    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("throttled", "waiting: per-job cap 2/2 for sleep")

    assert execution.run_start(scheduled.run_id, scheduled.pk, "w@h:1") == 1
    assert execution.run_start(scheduled.run_id, scheduled.pk, "w@h:2") is None
    scheduled.refresh_from_db()
    run = Run.objects.get(pk=scheduled.run_id)
    assert (run.status, run.attempt, run.worker, run.error_summary) == ("running", 1, "w@h:1", "")
    assert (scheduled.status, scheduled.worker) == ("running", "w@h:1")
    assert scheduled.started_at is not None


def test_run_start__refuses_a_slot_settled_elsewhere(schedule):
    scheduled = _scheduled_run(schedule)
    ScheduledRun.objects.filter(pk=scheduled.pk).update(status="skipped")
    assert execution.run_start(scheduled.run_id, scheduled.pk, "w@h:1") is None
    assert Run.objects.get(pk=scheduled.run_id).status == "queued"


def test_writes_after_start__are_fenced_by_attempt(schedule):
    scheduled = _scheduled_run(schedule)
    attempt = execution.run_start(scheduled.run_id, scheduled.pk, "w@h:1")
    assert not execution.run_heartbeat(scheduled.run_id, scheduled.pk, attempt + 1)
    assert not execution.run_finish(scheduled.run_id, scheduled.pk, status="succeeded", attempt=attempt + 1)
    assert execution.run_finish(scheduled.run_id, scheduled.pk, status="succeeded", attempt=attempt, stats={})
    scheduled.refresh_from_db()
    assert scheduled.status == "succeeded"
    # A late outcome from anyone changes nothing.
    assert not execution.run_finish(scheduled.run_id, scheduled.pk, status="failed", attempt=attempt)
    assert not execution.run_heartbeat(scheduled.run_id, scheduled.pk, attempt)


def test_reaper__fails_runs_without_a_recent_heartbeat_only(schedule, settings, redis_client):
    settings.WORKER_LEASE_SECONDS = 60
    lost, alive = _scheduled_run(schedule), _scheduled_run(schedule)
    execution.run_start(lost.run_id, lost.pk, "w@h:1")
    execution.run_start(alive.run_id, alive.pk, "w@h:2")
    _age("orchestrator_run", "heartbeat_at", lost.run_id, 61)

    assert reaper.reap_lost_runs() == [lost.run_id]
    assert reaper.reap_lost_runs() == []  # once, whoever gets there first
    lost.refresh_from_db()
    assert (lost.status, lost.error_summary) == ("failed", "worker lost (no heartbeat for 60s)")
    assert Run.objects.get(pk=lost.run_id).status == "failed"
    assert Run.objects.get(pk=alive.run_id).status == "running"


def test_stalled_throttled_runs__are_republished_once(schedule, settings, redis_client):
    settings.WORKER_LEASE_SECONDS = 3
    settings.WORKER_THROTTLE_MAX_SECONDS = 1
    scheduled = _scheduled_run(schedule)
    execution.run_mark_throttled(scheduled.run_id, scheduled.pk, "waiting: global cap 3/3")
    assert reaper.republish_stalled_throttled() == 0  # its retry is not late yet

    _age("schedules_scheduledrun", "published_at", scheduled.pk, 3600)
    before = redis_client.llen("jobs.sleep")
    assert reaper.republish_stalled_throttled() == 1
    assert redis_client.llen("jobs.sleep") == before + 1
    assert reaper.republish_stalled_throttled() == 0


def test_worker_queues__every_enabled_job_by_default_or_the_named_ones(sleep_job):
    from worker.routing import UnknownJobs, route_run, worker_queue_names

    everything = worker_queue_names()
    assert {"jobs.sleep", "jobs.log_triage"} <= set(everything)
    Job.objects.filter(key="log_triage").update(enabled=False)
    assert "jobs.log_triage" not in worker_queue_names()
    assert worker_queue_names(["sleep"]) == ["jobs.sleep"]
    with pytest.raises(UnknownJobs, match="log_triage, nope"):
        worker_queue_names(["sleep", "log_triage", "nope"])
    assert route_run("worker.execute_run", (), {"job_key": "sleep"}, {})["queue"] == "jobs.sleep"
    assert route_run("other.task", (), {"job_key": "sleep"}, {}) is None


def test_heartbeat__keeps_the_leases_while_the_database_is_unreachable(
    schedule, settings, redis_client, monkeypatch
):
    """A PostgreSQL outage longer than a lease must not free the slots of runs still executing."""
    from django.db import OperationalError

    from worker.semaphore import Cap, semaphore_holders, semaphore_renew

    settings.WORKER_LEASE_SECONDS = 30
    cap = Cap(scope="job:sleep", limit=1, label="per-job cap", subject="sleep")
    heartbeat = execution.Heartbeat(run_id=1, scheduled_run_id=None, attempt=1, caps=[cap], owner="ours")
    semaphore_renew([cap], owner="ours", reassert=True)
    redis_client.flushdb()  # the lease gone, as if it had expired while heartbeats failed

    def unreachable(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(execution, "run_heartbeat", unreachable)
    heartbeat.beat()
    assert not heartbeat.lost
    assert semaphore_holders(cap) == ["ours"]
