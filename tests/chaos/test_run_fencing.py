"""A run's life under the faults of issue 13, with real workers and schedulers (docs/ARCHITECTURE.md,
guarantees 5 and 7).

- every worker SIGKILLed, only a scheduler left: the scheduler reaps the run within a lease + a period;
- a run the system gave up on (here: ended behind its back) stops executing, counted from /proc;
- a finish write stuck on a row lock: the hard time limit kills the pool process, the run ends
  "time limit" once the lock goes;
- a task's grandchild dies with a SIGKILLed worker;
- a worker cut off long enough to be reaped comes back (a partition that healed): it writes nothing over
  the reaper's outcome, neither the run's nor its task's result.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest
from django.db import connection
from django_celery_results.models import TaskResult

from orchestrator.models import Job, Run
from orchestrator.taskprocs import live_runs, processes_of_run
from schedules import runstate
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import PYTHON, REPO, db_now
from tests.support import process_env, wait_for
from tests.workerproc import FAST, running_worker, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LEASE = float(FAST["WORKER_LEASE_SECONDS"])
REAPER = float(FAST["WORKER_REAPER_INTERVAL_SECONDS"])


def _schedule(job_key: str, text: str, **fields) -> Schedule:
    job, _ = Job.objects.get_or_create(key=job_key, defaults={"name": job_key, "queue": f"jobs.{job_key}"})
    return Schedule.objects.create(
        name=f"fence-{Schedule.objects.count()}",
        job=job,
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=text,
        **fields,
    )


def _run(run_id: int) -> Run:
    return Run.objects.get(pk=run_id)


def _ended(run_id: int) -> Run | None:
    run = _run(run_id)
    return run if run.status in ("succeeded", "failed", "cancelled") else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _scheduler(tmp_path: Path) -> subprocess.Popen:
    log = open(tmp_path / "scheduler.log", "wb")
    return subprocess.Popen(
        [PYTHON, "manage.py", "run_scheduler", "--interval", "1"],
        cwd=REPO,
        env=process_env(**FAST),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def test_every_worker_killed__a_scheduler_alone_reaps_the_run_and_frees_its_slot(redis_client, tmp_path):
    schedule = _schedule("sleep", "120", max_per_job=1, overlap_policy="allow")
    scheduler = _scheduler(tmp_path)
    try:
        doomed = start_worker(["jobs.sleep"], tmp_path=tmp_path, name="doomed", concurrency=1)
        try:
            first = run_now(schedule)
            wait_for(lambda: first.run_id in live_runs(), timeout=60, what="the run executing")
            doomed.kill()  # the whole worker: parent and pool; no worker is left to reap
            killed_at = db_now()  # the database's clock, which also stamps the reaped run's finished_at
            # Gone at once (the template's parent-death signal); the bound is the guarantee's: before the
            # slot can go to another run, which is one lease at the soonest.
            wait_for(
                lambda: first.run_id not in live_runs(),
                timeout=float(FAST["WORKER_LEASE_SECONDS"]),
                interval=0.02,
                what="the run's processes gone within a lease",
            )
            run = wait_for(lambda: _ended(first.run_id), timeout=60, interval=0.1, what="run reaped")
            took = (run.finished_at - killed_at).total_seconds()
        finally:
            doomed.stop()
        log = (tmp_path / "scheduler.log").read_text(errors="replace")
        print(f"reaped by the scheduler {took:.1f}s after the kill (lease {LEASE}s + period {REAPER}s)")
        assert (run.status, run.error_summary) == ("failed", f"worker lost (lease of {LEASE:g}s expired)")
        first.refresh_from_db()
        assert (first.status, first.error_summary) == ("failed", run.error_summary)
        assert "run reaped: worker lost" in log
        # Bound: the lease lapses within one lease of the kill, and a pass comes every reaper period; the
        # second is for the pass's own statements on a loaded machine (measured by the database's clock,
        # so the test's polling is not counted).
        assert took < LEASE + REAPER + 1, log[-3000:]

        # The slot was freed: a new worker runs the job again under its cap of one.
        schedule.custom_directive_text = "0.1"
        schedule.save(update_fields=["custom_directive_text"])
        with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="next", concurrency=1):
            second = run_now(schedule)
            done = wait_for(lambda: _ended(second.run_id), timeout=90, what="the next run")
        assert done.status == "succeeded", done.error_summary
    finally:
        scheduler.kill()
        scheduler.wait(timeout=20)


def test_run_ended_behind_its_back__its_task_processes_are_killed(redis_client, tmp_path):
    """Fencing: a run the system gave up on (cancelled, reaped) stops executing within a lease, before its
    slot could go to another run: its heartbeat, every quarter lease, finds the run no longer its own."""
    schedule = _schedule("sleep", "120", max_per_job=1, overlap_policy="allow")
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="fenced", concurrency=1) as worker:
        scheduled = run_now(schedule)
        wait_for(lambda: scheduled.run_id in live_runs(), timeout=60, what="the run executing")
        # What a cancel (or a reaper on another host) does: the run is no longer this worker's.
        Run.objects.filter(pk=scheduled.run_id).update(status="cancelled", error_summary="cancelled by test")
        stopped_at = time.monotonic()
        wait_for(lambda: not processes_of_run(scheduled.run_id), timeout=LEASE, what="task processes killed")
        took = time.monotonic() - stopped_at
        wait_for(lambda: "run fenced: task processes killed" in worker.log(), timeout=10, what="fence log")
    print(f"task processes gone {took:.2f}s after the run was taken away (heartbeat every {LEASE / 4}s)")
    run = _run(scheduled.run_id)
    assert (run.status, run.error_summary) == ("cancelled", "cancelled by test")  # not overwritten


def test_finish_blocked_on_a_row_lock__hard_time_limit_kills_the_pool_process(
    redis_client, tmp_path, settings
):
    """Job.timeout_seconds is Celery's soft limit and + grace its hard limit, applied per message."""
    # The limits travel in the message, computed by the publisher (this process): the worker's grace.
    settings.WORKER_HARD_LIMIT_GRACE_SECONDS = float(FAST["WORKER_HARD_LIMIT_GRACE_SECONDS"])
    Job.objects.filter(key="sleep").update(timeout_seconds=3)
    # The task sleeps past its soft limit, so the row lock below is always taken while it still runs,
    # however slow the machine: its finish (failed, timed out) is the write the lock then holds. (A
    # 1 s task could end and write its finish before a loaded test took the lock.)
    schedule = _schedule("sleep", "60", max_per_job=1, overlap_policy="allow")
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    locker = psycopg2.connect(**params)
    try:
        # No lock_timeout (WORKER_LOCK_TIMEOUT_MS=0): the hard time limit is the backstop for a pool
        # process stuck wherever it is, a lock with no limit being the plainest such place.
        no_lock_timeout = {"WORKER_LOCK_TIMEOUT_MS": "0"}
        with running_worker(
            ["jobs.sleep"], tmp_path=tmp_path, name="limited", concurrency=1, env=no_lock_timeout
        ) as worker:
            scheduled = run_now(schedule)
            wait_for(lambda: _run(scheduled.run_id).status == "running", timeout=60, what="run started")
            with locker.cursor() as cursor:
                # Hold the run's row: the soft limit ends the task, then its finish write waits on this lock.
                cursor.execute(
                    "SELECT status FROM orchestrator_run WHERE id = %s FOR UPDATE", [scheduled.run_id]
                )
                assert cursor.fetchone() == ("running",)
                hard = 3 + float(FAST["WORKER_HARD_LIMIT_GRACE_SECONDS"])
                wait_for(
                    lambda: "Hard time limit" in worker.log() or "hard time limit" in worker.log(),
                    timeout=hard + 30,
                    what="the hard time limit",
                )
                assert _run(scheduled.run_id).status == "running"  # the lock still holds every write
            locker.rollback()
            run = wait_for(lambda: _ended(scheduled.run_id), timeout=30, what="the run ended")
    finally:
        locker.close()
    assert run.status == "failed"
    assert "time limit" in run.error_summary, run.error_summary
    assert ScheduledRun.objects.get(pk=scheduled.pk).status == "failed"


def test_worker_sigkilled__nothing_the_task_started_survives(redis_client, tmp_path):
    pidfile = tmp_path / "pids"
    schedule = _schedule("spawner", str(pidfile), overlap_policy="allow")
    worker = start_worker(
        ["jobs.spawner"], tmp_path=tmp_path, name="spawning", concurrency=1, include="tests.worker_jobs"
    )
    try:
        scheduled = run_now(schedule)
        wait_for(pidfile.exists, timeout=60, what="the task's pid file")
        runner, grandchild = (int(pid) for pid in pidfile.read_text().split())
        assert _alive(runner)
        assert _alive(grandchild)
        assert grandchild in processes_of_run(scheduled.run_id)
        worker.kill()  # SIGKILL to the worker's process group; the task's group is another session
        wait_for(
            lambda: not _alive(runner) and not _alive(grandchild) and not processes_of_run(scheduled.run_id),
            timeout=2,
            interval=0.02,
            what="every process of the run gone within 2 s",
        )
    finally:
        worker.stop()


def test_finish_blocked_on_a_row_lock__with_the_lock_timeout_the_pool_process_moves_on(
    redis_client, tmp_path
):
    """WORKER_LOCK_TIMEOUT_MS (default 5 s): the finish write gives up instead of waiting without bound,
    its outcome stays in Redis, and a reaper pass writes it once the lock goes (issue 15.4)."""
    schedule = _schedule("sleep", "0.5", max_per_job=1, overlap_policy="allow")
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    locker = psycopg2.connect(**params)
    try:
        with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="timeout", concurrency=1) as worker:
            scheduled = run_now(schedule)
            wait_for(lambda: _run(scheduled.run_id).status == "running", timeout=60, what="run started")
            with locker.cursor() as cursor:
                cursor.execute("SELECT 1 FROM orchestrator_run WHERE id = %s FOR UPDATE", [scheduled.run_id])
                wait_for(
                    lambda: "outcome left in Redis for the reapers" in worker.log(),
                    timeout=60,
                    what="the pool process giving the write up",
                )
                assert _run(scheduled.run_id).status == "running"
            locker.rollback()
            run = wait_for(lambda: _ended(scheduled.run_id), timeout=30, what="the outcome written")
    finally:
        locker.close()
    assert (run.status, run.error_summary) == ("succeeded", "")
    assert ScheduledRun.objects.get(pk=scheduled.pk).status == "succeeded"
    # Its task stored nothing (its finish was not written); the reaper that wrote it stores its result.
    wait_for(
        lambda: TaskResult.objects.filter(task_id=scheduled.task_id, status="SUCCESS").exists(),
        timeout=30,
        what="the task's SUCCESS stored by the reaper",
    )


def test_worker_back_after_its_run_was_reaped__writes_nothing_over_the_reapers_outcome(
    redis_client, tmp_path, settings
):
    """The worker is stopped (SIGSTOP to its parent and pool: no heartbeat, no lease renewal), as a
    partition cuts it off; a reaper fails its run "worker lost" and stores the task's FAILURE. Then it
    resumes: its fence stops the job, its finish is not its own to write, and its task stores nothing."""
    settings.WORKER_LEASE_SECONDS = LEASE  # this process's reaper, as the workers'
    schedule = _schedule("sleep", "60", max_per_job=1, overlap_policy="allow")
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="cutoff", concurrency=1) as worker:
        scheduled = run_now(schedule)
        wait_for(lambda: scheduled.run_id in live_runs(), timeout=60, what="the run executing")
        worker.kill(signal.SIGSTOP)  # the job's own process group (another session) sleeps on
        try:
            wait_for(
                lambda: scheduled.run_id in runstate.reap_lost_runs(),
                timeout=LEASE * 5,
                interval=0.2,
                what="the run reaped once its lease expired",
            )
            reaped = _run(scheduled.run_id)
            assert TaskResult.objects.get(task_id=scheduled.task_id).status == "FAILURE"
        finally:
            worker.kill(signal.SIGCONT)
        wait_for(
            lambda: "run ended but was no longer ours" in worker.log(),
            timeout=LEASE * 5,
            what="the worker back, its finish refused",
        )
        wait_for(
            lambda: f"[{scheduled.task_id}] ignored" in worker.log(),
            timeout=30,
            what="its task ended storing nothing",
        )
    run = _run(scheduled.run_id)
    assert (run.status, run.error_summary) == ("failed", f"worker lost (lease of {LEASE:g}s expired)")
    assert run.finished_at == reaped.finished_at
    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("failed", run.error_summary)
    result = TaskResult.objects.get(task_id=scheduled.task_id)
    assert result.status == "FAILURE"
    assert "worker lost" in result.result
