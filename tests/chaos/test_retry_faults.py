"""Guarantee 8 under faults: the wait between attempts is held in the database, so SIGKILLing the scheduler
and the worker during a backoff loses no retry and doubles none.

The job records each execution in a file (tests/worker_jobs.py, `fails_then_succeeds`): that file and
the attempts in the database are the counts.
"""

from __future__ import annotations

import pytest

from orchestrator.jobs.registry import sync_jobs
from orchestrator.models import Job, Run, RunAttempt
from schedules.models import ScheduledRun
from tests.acceptance.test_retries import JOB, create_schedule, executions
from tests.scheduler_support import Processes, sql
from tests.support import process_env, wait_for
from tests.workerproc import start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

BACKOFF = 12


@pytest.fixture
def procs(tmp_path, redis_client):
    sync_jobs(Job)  # the test job's row, as a migrate would write it
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _waiting_to_retry(run_id: int) -> bool:
    run = Run.objects.get(pk=run_id)
    return run.status == "queued" and run.attempt == 1 and run.retry_at is not None


def _seconds_until_retry(run_id: int) -> float:
    (row,) = sql("SELECT EXTRACT(EPOCH FROM retry_at - now()) FROM orchestrator_run WHERE id = %s", [run_id])
    return float(row[0])


@pytest.mark.parametrize("back", ["before_due", "after_due"])
def test_scheduler_and_worker_sigkilled_during_a_backoff__the_retry_happens_exactly_once(
    api, procs, tmp_path, back
):
    """What this proves: a run whose first attempt failed waits for its retry with no process alive
    (scheduler and worker SIGKILLed during the backoff); processes started again (two schedulers, so
    both sweep) run the second attempt once, no earlier than the backoff, either while the wait still
    runs (`before_due`) or after it passed with nothing running (`after_due`)."""
    out = tmp_path / "attempts.jsonl"
    policy = {"max_attempts": 3, "initial_interval_seconds": BACKOFF, "max_interval_seconds": BACKOFF}
    sid = create_schedule(api, f"retry-kill-{back}", out, fail_times=1, policy=policy)

    worker = start_worker([f"jobs.{JOB}"], tmp_path=tmp_path, name="w1", include="tests.worker_jobs")
    try:
        scheduler = procs.start("--interval", "30")
        run_id = api.post(f"/api/schedules/{sid}/run-now").json()["run"]
        wait_for(lambda: _waiting_to_retry(run_id), timeout=90, what="attempt 1 failed, retry pending")
        assert _seconds_until_retry(run_id) > 3, "the kill must land inside the backoff"
        procs.kill(scheduler)
        worker.kill()
        worker.stop()
    finally:
        worker.stop()
    assert [e["attempt"] for e in executions(out)] == [1]
    assert ScheduledRun.objects.get(schedule_id=sid).status == "queued"  # unfinished while it waits

    if back == "after_due":
        wait_for(lambda: _seconds_until_retry(run_id) < 0, timeout=BACKOFF + 30, what="the retry due")
    worker = start_worker([f"jobs.{JOB}"], tmp_path=tmp_path, name="w2", include="tests.worker_jobs")
    try:
        procs.start("--interval", "30")
        procs.start("--interval", "30")
        run = wait_for(
            lambda: (r := Run.objects.get(pk=run_id)).status in ("succeeded", "failed") and r,
            timeout=BACKOFF + 90,
            what="the retry ran",
        )
    finally:
        worker.stop()

    assert (run.status, run.attempt) == ("succeeded", 2), run.error_summary
    assert [(e["run_id"], e["attempt"]) for e in executions(out)] == [(run_id, 1), (run_id, 2)]
    attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("attempt"))
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "failed"), (2, "succeeded")]
    assert (attempts[1].started_at - attempts[0].finished_at).total_seconds() >= BACKOFF
    assert ScheduledRun.objects.filter(schedule_id=sid).count() == 1
    assert ScheduledRun.objects.get(schedule_id=sid).status == "succeeded"


def test_worker_sigkilled_during_an_attempt__is_retried_as_worker_lost_once(api, procs, tmp_path):
    """What this proves: an attempt whose worker is SIGKILLed (task included) is ended "worker lost" by
    a reaper, then retried under `retry_on: [worker_lost]` on another worker: two executions, the
    first attempt `worker_lost`, the second `succeeded`; one slot."""
    out = tmp_path / "attempts.jsonl"
    policy = {"max_attempts": 2, "initial_interval_seconds": 1, "retry_on": ["worker_lost"]}
    sid = create_schedule(api, "retry-worker-lost", out, fail_times=1, policy=policy, hang=True)

    worker = start_worker([f"jobs.{JOB}"], tmp_path=tmp_path, name="w1", include="tests.worker_jobs")
    try:
        procs.start("--interval", "30")
        run_id = api.post(f"/api/schedules/{sid}/run-now").json()["run"]
        wait_for(lambda: len(executions(out)) == 1, timeout=90, what="attempt 1 executing")
        worker.kill()
    finally:
        worker.stop()
    worker = start_worker([f"jobs.{JOB}"], tmp_path=tmp_path, name="w2", include="tests.worker_jobs")
    try:
        run = wait_for(
            lambda: (r := Run.objects.get(pk=run_id)).status in ("succeeded", "failed") and r,
            timeout=120,
            what="the retry ran",
        )
    finally:
        worker.stop()

    assert (run.status, run.attempt) == ("succeeded", 2), run.error_summary
    assert [e["attempt"] for e in executions(out)] == [1, 2]
    attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("attempt"))
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "worker_lost"), (2, "succeeded")]
    assert attempts[0].error_summary.startswith("worker lost")
    assert ScheduledRun.objects.filter(schedule_id=sid).count() == 1
