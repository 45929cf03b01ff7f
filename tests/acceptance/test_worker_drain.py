"""Graceful drain with real processes (docs/ARCHITECTURE.md, guarantee 7; docs/OPERATIONS.md, "Stopping a
worker"): SIGTERM to a worker, as Kubernetes sends it, mid-run.

Two workers started as operators start them (`manage.py run_worker`, which passes SIGTERM on to Celery),
concurrency 2 each, share a per-job cap of 3; 6 runs. The victim starts alone and takes its fill first:
2 long runs executing and, with a prefetch of 2 per process, 2 more messages (of short runs) it holds
without starting them. Then the other worker starts, and the victim gets SIGTERM. Only the victim's 2
runs need to be long (in flight at the SIGTERM, and for the deadline test past the deadline); the 4 runs
the other worker executes are short, so the test does not wait for them. What executes is read from /proc (the
runs' task process groups, orchestrator/taskprocs.py) and the worker logs, not from the rows alone.
"""

from __future__ import annotations

import re
import signal
import time
import uuid

import pytest

from orchestrator.models import Job, Run
from schedules.dispatch import run_now
from schedules.models import Schedule
from tests.support import wait_for
from tests.workerproc import TAG_ENV, ProcSampler, WorkerProcess, start_run_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CAP = 3
RUNS = 6
SHORT_SECONDS = 2  # the runs the other worker executes: seen in /proc, not waited on for long


def _runs_on(prefix: str, status: str) -> list[Run]:
    return list(Run.objects.filter(worker__startswith=prefix, status=status))


def _received(worker: WorkerProcess) -> set[str]:
    return set(re.findall(r"Task [^\[\]]*\[([0-9a-f-]+)\] received", worker.log()))


def _started(log: str) -> list[str]:
    """The run ids of the "run started" lines in a worker log."""
    return [
        m for line in log.splitlines() if "run started" in line for m in re.findall(r"\brun_id=(\d+)", line)
    ]


def _drain(tmp_path, drain_seconds: float, victim_seconds: float):
    """Start the victim, fill it (2 runs of `victim_seconds` executing, 2 short ones held), start the other
    worker, SIGTERM the victim; wait until every run ended. Returns (victim, other, sampler, log of the
    victim up to the SIGTERM, monotonic time of the SIGTERM, monotonic time the victim exited)."""
    schedule = Schedule.objects.create(
        name="drain",
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=str(victim_seconds),
        overlap_policy="allow",
        max_per_job=CAP,
    )
    tag = uuid.uuid4().hex
    env = {TAG_ENV: tag, "WORKER_PREFETCH_MULTIPLIER": "2", "WORKER_DRAIN_SECONDS": str(drain_seconds)}
    victim = start_run_worker(tmp_path=tmp_path, name="victim", env=env)
    other = None
    try:
        with ProcSampler(tag) as procs:
            # A run keeps the directive text it was launched with: the first 2 (the victim's) are long.
            for _ in range(2):
                run_now(schedule)
            wait_for(lambda: len(_runs_on("victim@", "running")) == 2, timeout=90, what="victim running 2")
            schedule.custom_directive_text = str(SHORT_SECONDS)
            schedule.save(update_fields=["custom_directive_text"])
            for _ in range(RUNS - 2):
                run_now(schedule)
            wait_for(lambda: len(_received(victim)) == 4, timeout=30, what="victim holding 2 more")
            other = start_run_worker(tmp_path=tmp_path, name="other", env=env)
            wait_for(lambda: _runs_on("other@", "running"), timeout=60, what="other running one")
            before = victim.log()
            victim.proc.send_signal(signal.SIGTERM)  # the supervisor, PID 1 of a pod
            at = time.monotonic()
            code = victim.proc.wait(timeout=victim_seconds + drain_seconds + 60)
            exited = time.monotonic()
            wait_for(
                lambda: Run.objects.filter(status__in=["succeeded", "failed"]).count() == RUNS,
                timeout=180,
                interval=0.5,
                what="every run ended",
            )
        assert procs.error is None, procs.error
        assert code == 0, victim.log()[-3000:]
        return victim, other, procs, before, at, exited
    finally:
        victim.stop()
        if other is not None:
            other.stop()


def _common(victim, other, procs, before) -> None:
    runs = list(Run.objects.all())
    assert len(runs) == RUNS
    # 0 executed twice: one "sleep" task process group per run in /proc, one "run started" in the logs.
    for run in runs:
        assert procs.executions(run.pk, "sleep") == 1, (run.pk, procs.groups_of.get(run.pk))
    started = _started(victim.log()) + _started(other.log())
    assert sorted(started) == sorted(str(run.pk) for run in runs), started
    assert all(run.attempt == 1 for run in runs)
    # It stopped taking messages at once: nothing started on the victim after the SIGTERM.
    assert not _started(victim.log()[len(before) :])
    # Its 2 held messages went back to the queue, and the other worker executed them.
    held = _received(victim) - {r.task_id for r in runs if r.worker.startswith("victim@")}
    assert len(held) == 2, held
    assert all(r.worker.startswith("other@") and r.status == "succeeded" for r in runs if r.task_id in held)
    # Caps held throughout, from /proc.
    assert procs.max_live <= CAP, procs.over_cap(CAP)[:10]
    assert procs.max_live == CAP  # the cap was binding: both workers shared it


def test_sigterm__the_workers_runs_finish_and_the_other_worker_takes_the_rest(redis_client, tmp_path):
    # Long enough to be in flight at the SIGTERM after the other worker's start-up (about 5 s here);
    # checked below, so a slower start fails the test rather than leaving nothing to drain.
    victim, other, procs, before, at, exited = _drain(tmp_path, drain_seconds=120, victim_seconds=15)
    _common(victim, other, procs, before)
    mine = _runs_on("victim@", "succeeded")
    assert len(mine) == 2, [(r.pk, r.worker, r.status, r.error_summary) for r in Run.objects.all()]
    # They were executing when the SIGTERM came, and it let them finish.
    assert all(procs.last_seen(run.pk) > at for run in mine), [
        (r.pk, procs.last_seen(r.pk) - at) for r in mine
    ]
    assert len(_runs_on("other@", "succeeded")) == RUNS - 2
    # It left once its runs were done, long before the drain deadline.
    assert exited - at < 120


def test_sigterm__runs_still_running_at_the_deadline_end_failed_worker_drained(redis_client, tmp_path):
    drain = 5.0
    # Far longer than the drain: left alone they would live long past the bound on `last` below.
    victim, other, procs, before, at, exited = _drain(tmp_path, drain_seconds=drain, victim_seconds=60)
    _common(victim, other, procs, before)
    drained = _runs_on("victim@", "failed")
    assert len(drained) == 2, [(r.pk, r.worker, r.status, r.error_summary) for r in Run.objects.all()]
    for run in drained:
        assert run.error_summary.startswith("worker drained"), run.error_summary
        # Its task processes were gone from /proc soon after the deadline (not left to finish their 60 s).
        last = procs.last_seen(run.pk)
        assert last is not None
        assert last - at < drain + 10, (run.pk, last - at)
    assert len(_runs_on("other@", "succeeded")) == RUNS - 2
    assert exited - at < drain + 40
    assert "run drained" in victim.log()
