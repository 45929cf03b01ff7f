"""Cancelling runs with real workers (issue 32, item 2; docs/ARCHITECTURE.md, guarantee 7: a cancelled run
stops executing within its grace).

What executes is read from the operating system: the live task process groups of this test's runs
(orchestrator/taskprocs.py via tests/workerproc.ProcSampler), never the rows the code under test writes.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.models import Job, Run
from orchestrator.taskprocs import live_task_groups
from schedules import cancelling
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import process_env, wait_for
from tests.webproc import api_token, start_web
from tests.workerproc import TAG_ENV, ProcSampler, running_worker, start_worker, started_together

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

GRACE = 3.0


def _schedule(name: str, *, job_key: str = "sleep", seconds: str = "60", **fields) -> Schedule:
    job, _ = Job.objects.get_or_create(key=job_key, defaults={"name": job_key, "queue": f"jobs.{job_key}"})
    return Schedule.objects.create(
        name=name,
        job=job,
        enabled=False,  # launched with run-now only
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=seconds,
        overlap_policy="allow",
        **fields,
    )


def _status(scheduled: ScheduledRun) -> str:
    return ScheduledRun.objects.get(pk=scheduled.pk).status


def _stops_within_grace(procs: ProcSampler, run_id: int, asked: float, grace: float) -> None:
    """No task process of the run is left within grace + 1 s of the cancel request."""
    wait_for(lambda: run_id not in procs.now(), timeout=grace + 1, interval=0.02, what="task processes gone")
    assert procs.last_seen(run_id) - asked <= grace + 1


def _assert_cancelled(scheduled: ScheduledRun, by: str) -> None:
    scheduled.refresh_from_db()
    run = Run.objects.get(pk=scheduled.run_id)
    assert (scheduled.status, run.status) == ("cancelled", "cancelled"), (run.status, run.error_summary)
    assert run.cancelled_by == by
    assert run.error_summary == scheduled.error_summary == f"cancelled by {by}"
    assert run.finished_at is not None


def test_cancel__a_running_run_stops_within_its_grace_and_the_next_capped_run_starts(redis_client, tmp_path):
    long = _schedule("cancel-long", max_per_job=1)
    short = _schedule("cancel-next", seconds="0.2", max_per_job=1)
    tag = uuid.uuid4().hex
    with (
        running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=2, env={TAG_ENV: tag}) as worker,
        ProcSampler(tag) as procs,
    ):
        first = run_now(long)
        wait_for(lambda: first.run_id in procs.now(), timeout=120, what="the 60 s run executing")
        second = run_now(short)  # the job is capped at 1: it waits
        wait_for(lambda: _status(second) == "throttled", timeout=60, what="the next run throttled")

        asked = time.monotonic()
        run = cancelling.cancel_run(first.run_id, by="alice", grace=GRACE)
        assert run.status == "running"
        assert run.cancel_requested_at is not None
        assert run.cancel_deadline is not None
        _stops_within_grace(procs, first.run_id, asked, GRACE)

        wait_for(lambda: _status(second) == "succeeded", timeout=120, what="the next capped run done")
        wait_for(lambda: _status(first) == "cancelled", timeout=30, what="the cancelled run recorded")

    assert procs.error is None, procs.error
    _assert_cancelled(first, "alice")
    assert procs.first_seen(second.run_id) > procs.last_seen(first.run_id), worker.log()[-3000:]
    assert procs.max_live == 1


def test_cancel__a_task_that_ignores_sigterm_is_killed_when_the_grace_ends(redis_client, tmp_path):
    stubborn = _schedule("cancel-stubborn", job_key="stubborn")
    tag = uuid.uuid4().hex
    with (
        running_worker(
            ["jobs.stubborn"],
            tmp_path=tmp_path,
            concurrency=1,
            include="tests.worker_jobs",
            env={TAG_ENV: tag},
        ),
        ProcSampler(tag) as procs,
    ):
        scheduled = run_now(stubborn)
        # Past its first task: the one that ignores SIGTERM is executing, and ignores it already.
        wait_for(lambda: _ignores_sigterm(scheduled.run_id), timeout=120, what="its wait task")
        wait_for(lambda: scheduled.run_id in procs.now(), timeout=10, what="seen by the sampler")
        asked = time.monotonic()
        cancelling.cancel_run(scheduled.run_id, by="bob", grace=GRACE)
        _stops_within_grace(procs, scheduled.run_id, asked, GRACE)
        wait_for(lambda: _status(scheduled) == "cancelled", timeout=30, what="recorded cancelled")

    # SIGTERM did not end it (ignored): it lived until the grace was over, then SIGKILL did.
    assert procs.last_seen(scheduled.run_id) - asked >= GRACE / 2
    _assert_cancelled(scheduled, "bob")


def _ignores_sigterm(run_id: int) -> bool:
    """The run's `wait` task process has set SIGTERM to ignored (/proc/<pid>/status, SigIgn)."""
    for group in live_task_groups().values():
        if group.run_id == run_id and group.task == "wait":
            try:
                status = Path(f"/proc/{group.pgid}/status").read_text()
            except OSError:
                return False
            mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
            return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_cancel__across_two_workers_through_the_api_of_a_web_process(redis_client, tmp_path):
    long = _schedule("cancel-two-long", max_per_job=1)
    short = _schedule("cancel-two-next", seconds="0.2", max_per_job=1)
    tag = uuid.uuid4().hex
    web = start_web(process_env(), tmp_path, token=api_token("carol"))
    workers = []
    try:
        workers = started_together(
            [
                start_worker(
                    ["jobs.sleep"],
                    tmp_path=tmp_path,
                    name=name,
                    concurrency=1,
                    env={TAG_ENV: tag},
                    ready=False,
                )
                for name in ("wa", "wb")
            ]
        )
        with ProcSampler(tag) as procs:
            first = run_now(long)
            wait_for(lambda: first.run_id in procs.now(), timeout=120, what="the 60 s run executing")
            second = run_now(short)
            wait_for(lambda: _status(second) == "throttled", timeout=60, what="the next run throttled")
            executing_on = Run.objects.get(pk=first.run_id).worker.split("@")[0]

            asked = time.monotonic()
            code, body = web.call("POST", f"/api/runs/{first.run_id}/cancel", {"cancel_grace_seconds": GRACE})
            assert code == 202, body
            assert body["status"] == "running"
            assert body["cancelled_by"] == "carol"
            _stops_within_grace(procs, first.run_id, asked, GRACE)
            wait_for(lambda: _status(second) == "succeeded", timeout=120, what="the next capped run done")
            wait_for(lambda: _status(first) == "cancelled", timeout=30, what="the cancelled run recorded")
            code, body = web.call("POST", f"/api/runs/{first.run_id}/cancel")
            assert code == 409, body
    finally:
        for worker in workers:
            worker.stop()
        web.stop()

    assert executing_on in {"wa", "wb"}
    _assert_cancelled(first, "carol")
    assert procs.first_seen(second.run_id) > procs.last_seen(first.run_id)


def test_cancel__waiting_runs_end_at_once_and_never_start(redis_client, tmp_path):
    long = _schedule("cancel-wait-long", max_per_job=1)
    short = _schedule("cancel-wait-next", seconds="0.2", max_per_job=1)
    # Queued, no worker yet: cancelled at once.
    queued = run_now(short)
    run = cancelling.cancel_run(queued.run_id, by="dave")
    assert run.status == "cancelled"
    _assert_cancelled(queued, "dave")

    tag = uuid.uuid4().hex
    with (
        running_worker(["jobs.sleep"], tmp_path=tmp_path, concurrency=2, env={TAG_ENV: tag}) as worker,
        ProcSampler(tag) as procs,
    ):
        first = run_now(long)
        wait_for(lambda: first.run_id in procs.now(), timeout=120, what="the 60 s run executing")
        throttled = run_now(short)
        wait_for(lambda: _status(throttled) == "throttled", timeout=60, what="a run throttled")
        assert cancelling.cancel_run(throttled.run_id, by="dave").status == "cancelled"
        _assert_cancelled(throttled, "dave")
        after = run_now(short)  # behind the cancelled one in the line: it must not be held up by it
        wait_for(lambda: _status(after) == "throttled", timeout=60, what="the next run throttled")
        cancelling.cancel_run(first.run_id, by="dave", grace=0)
        wait_for(lambda: _status(after) == "succeeded", timeout=120, what="the run after them done")

    assert procs.error is None, procs.error
    for scheduled in (queued, throttled):
        _assert_cancelled(scheduled, "dave")
        run = Run.objects.get(pk=scheduled.run_id)
        assert (run.attempt, run.started_at) == (0, None)
        assert procs.first_seen(scheduled.run_id) is None, worker.log()[-3000:]
