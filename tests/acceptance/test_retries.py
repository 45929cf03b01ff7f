"""Issue 32.1, retries with backoff, end to end: a real `run_scheduler` and a real Celery worker run a job
that records each attempt in a file and fails its first attempts (tests/worker_jobs.py,
`fails_then_succeeds`), driven through the API.

The SIGKILL of every process during a backoff is tests/chaos/test_retry_faults.py; the pieces against
PostgreSQL alone are tests/integration/test_retries.py.
"""

from __future__ import annotations

import itertools
import json

import pytest

from orchestrator.jobs.registry import sync_jobs
from orchestrator.models import Job, Run, RunAttempt
from schedules.models import ScheduledRun
from tests import worker_jobs
from tests.scheduler_support import Processes
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

JOB = worker_jobs.FAILS_THEN_SUCCEEDS.key


@pytest.fixture
def procs(tmp_path, redis_client):
    sync_jobs(Job)  # the test job's row, as a migrate would write it
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def executions(path) -> list[dict]:
    """Each execution of the job's task, as it recorded itself."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def create_schedule(api, name: str, out, *, fail_times: int, policy: dict, hang: bool = False) -> int:
    created = api.post(
        "/api/schedules/",
        {
            "name": name,
            "job_key": JOB,
            "enabled": False,
            "schedule_type": "interval",
            "interval_minutes": 60,
            "params": {"out": str(out), "fail_times": fail_times, "hang": hang},
            "retry_policy": policy,
        },
        format="json",
    )
    assert created.status_code == 201, created.content
    return created.json()["id"]


def test_a_job_failing_twice_then_succeeding__ends_succeeded_at_attempt_3_after_the_backoffs(
    api, procs, tmp_path
):
    """What this proves: one slot, one ScheduledRun, one Run, three attempts in three executions; the
    second attempt starts at least initial_interval_seconds after the first, the third at least
    initial * coefficient after the second; history and the run show each attempt's outcome and times."""
    out = tmp_path / "attempts.jsonl"
    policy = {
        "max_attempts": 4,
        "initial_interval_seconds": 2,
        "backoff_coefficient": 2,
        "max_interval_seconds": 10,
    }
    sid = create_schedule(api, "retry-twice", out, fail_times=2, policy=policy)

    with running_worker([f"jobs.{JOB}"], tmp_path=tmp_path, include="tests.worker_jobs", concurrency=2):
        procs.start("--interval", "30")
        launched = api.post(f"/api/schedules/{sid}/run-now")
        assert launched.status_code == 202, launched.content
        run_id = launched.json()["run"]
        run = wait_for(
            lambda: (r := Run.objects.get(pk=run_id)).status in ("succeeded", "failed") and r,
            timeout=120,
            what="the run ended",
        )

    assert (run.status, run.attempt) == ("succeeded", 3), run.error_summary
    assert ScheduledRun.objects.filter(schedule_id=sid).count() == 1
    assert ScheduledRun.objects.get(schedule_id=sid).status == "succeeded"
    assert [(e["run_id"], e["attempt"]) for e in executions(out)] == [(run_id, 1), (run_id, 2), (run_id, 3)]
    attempts = list(RunAttempt.objects.filter(run_id=run_id).order_by("attempt"))
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert attempts[0].error_summary == attempts[1].error_summary == "task attempt failed: RuntimeError"
    # The backoff, from the attempts' start times (database clock): at least 2 s, then at least 4 s.
    gaps = [(b.started_at - a.started_at).total_seconds() for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 2.0, gaps
    assert gaps[1] >= 4.0, gaps
    # ... and from the executions' own clocks (the same host).
    at = [e["at"] for e in executions(out)]
    assert at[1] - at[0] >= 2.0, at
    assert at[2] - at[1] >= 4.0, at

    history = api.get(f"/api/schedules/{sid}/history").json()["results"]
    assert len(history) == 1
    assert [(a["attempt"], a["outcome"]) for a in history[0]["attempts"]] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert api.get(f"/api/runs/{run_id}/").json()["attempts"] == history[0]["attempts"]


def test_after_the_last_attempt__the_run_fails_with_the_last_error_and_counts_once(api, procs, tmp_path):
    """What this proves: with max_attempts 2 and a job that always fails, the slot ends `failed` once,
    after its second attempt, with that attempt's error; no third execution."""
    out = tmp_path / "attempts.jsonl"
    policy = {"max_attempts": 2, "initial_interval_seconds": 1}
    sid = create_schedule(api, "retry-gives-up", out, fail_times=99, policy=policy)

    with running_worker([f"jobs.{JOB}"], tmp_path=tmp_path, include="tests.worker_jobs", concurrency=2):
        procs.start("--interval", "30")
        run_id = api.post(f"/api/schedules/{sid}/run-now").json()["run"]
        run = wait_for(
            lambda: (r := Run.objects.get(pk=run_id)).status in ("succeeded", "failed") and r,
            timeout=120,
            what="the run ended",
        )

    sr = ScheduledRun.objects.get(schedule_id=sid)
    assert (run.status, run.attempt, sr.status) == ("failed", 2, "failed")
    assert sr.error_summary == run.error_summary == "task attempt failed: RuntimeError"
    assert [e["attempt"] for e in executions(out)] == [1, 2]
