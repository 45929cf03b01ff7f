"""`Job.rate_limit` holds across workers (docs/ARCHITECTURE.md, guarantee 10): 40 runs of a near-no-op
job under `5/s`, two real workers with two pool processes each. Unlimited, those 4 processes start such
runs faster than 5 a second, so the limit binds: 40 runs are 7 windows' worth, enough for the crowded
window and the spread below to fail when it does not hold, at a third of the time 100 runs take.

Starts are counted as the operating system recorded them: each run's one task process appends the start
time the kernel keeps for it (/proc/<pid>/stat, field 22, via psutil) to a file, and `Run.started_at`
is checked as well. No 1 s window may hold more than 5 starts: sorted, start i + 5 comes at least 1 s
after start i.
"""

from __future__ import annotations

import json
import uuid

import pytest

from orchestrator.models import Job, Run
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import TAG_ENV, ProcSampler, RunningSampler, start_worker, started_together

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RUNS, LIMIT, WINDOW = 40, 5, 1.0
THROTTLED_SQL = "SELECT 'throttled', count(*) FROM schedules_scheduledrun WHERE status = 'throttled'"
# psutil's start times are kernel ticks (10 ms) plus the boot time, in floating point.
EPSILON = 1e-6


def _crowded_windows(starts: list[float]) -> list[tuple[float, float]]:
    """(start i, start i + LIMIT) pairs less than a window apart: a window holding LIMIT + 1 starts."""
    starts = sorted(starts)
    return [
        (starts[i], starts[i + LIMIT])
        for i in range(len(starts) - LIMIT)
        if starts[i + LIMIT] - starts[i] < WINDOW - EPSILON
    ]


def _stamped_schedule(name: str, stamps, *, cap: int | None) -> Schedule:
    """A schedule of the start_stamp job under `LIMIT/s` (and a per-job cap), launched with run-now only;
    its task processes append their start times to `stamps`."""
    job, _ = Job.objects.get_or_create(
        key="start_stamp", defaults={"name": "Start stamp", "queue": "jobs.start_stamp"}
    )
    Job.objects.filter(pk=job.pk).update(rate_limit=f"{LIMIT}/s", max_concurrency=cap)
    return Schedule.objects.create(
        name=name,
        job=job,
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=str(stamps),
        overlap_policy="allow",
    )


def test_rate_limit__40_runs_across_two_workers_never_start_more_than_5_in_any_second(redis_client, tmp_path):
    stamps = tmp_path / "starts.jsonl"
    schedule = _stamped_schedule("rate-limited", stamps, cap=None)
    tag = uuid.uuid4().hex
    common = {"tmp_path": tmp_path, "concurrency": 2, "include": "tests.worker_jobs", "env": {TAG_ENV: tag}}
    workers = started_together(
        [start_worker(["jobs.start_stamp"], name=name, ready=False, **common) for name in ("r1", "r2")]
    )
    try:
        with RunningSampler(THROTTLED_SQL) as waiting:
            for _ in range(RUNS):
                run_now(schedule)
            wait_for(
                lambda: Run.objects.filter(status__in=["succeeded", "failed", "cancelled"]).count() == RUNS,
                timeout=300,
                interval=0.5,
                what=f"all {RUNS} runs ended",
            )
    finally:
        for worker in workers:
            worker.stop()
    logs = "\n".join(worker.log()[-3000:] for worker in workers)

    assert waiting.error is None, waiting.error
    assert ScheduledRun.objects.filter(status="succeeded").count() == RUNS, logs
    assert Run.objects.filter(status="succeeded", attempt=1).count() == RUNS
    # Each run executed exactly once: one task process each, as the processes themselves recorded.
    records = [json.loads(line) for line in stamps.read_text().splitlines()]
    assert sorted(r["run_id"] for r in records) == sorted(Run.objects.values_list("pk", flat=True))
    assert len({r["pid"] for r in records}) == RUNS

    proc_starts = [r["start"] for r in records]
    db_starts = [t.timestamp() for t in Run.objects.values_list("started_at", flat=True)]
    print(
        f"rate: {RUNS} runs in {max(proc_starts) - min(proc_starts):.1f}s, "
        f"throttled at most {waiting.maxima.get('throttled', 0)} at once"
    )
    assert _crowded_windows(proc_starts) == [], "more than 5 task processes started within 1 s"
    assert _crowded_windows(db_starts) == [], "more than 5 started_at within 1 s"
    # The limit was binding: runs waited as throttled, and the starts spread over the 7 s it takes.
    assert waiting.maxima.get("throttled", 0) > 0
    assert max(proc_starts) - min(proc_starts) >= (RUNS - LIMIT) / LIMIT * WINDOW - EPSILON


def test_rate_limit_and_cap_together__both_hold_and_runs_move_between_their_lines(redis_client, tmp_path):
    """A job under `5/s` and a per-job cap of one: a run the window admits may find the cap full and wait
    for it, and the other way round; every run still ends once, and neither limit is exceeded."""
    runs = 20
    stamps = tmp_path / "starts.jsonl"
    schedule = _stamped_schedule("rate-and-cap", stamps, cap=1)
    tag = uuid.uuid4().hex
    common = {"tmp_path": tmp_path, "concurrency": 2, "include": "tests.worker_jobs", "env": {TAG_ENV: tag}}
    workers = started_together(
        [start_worker(["jobs.start_stamp"], name=name, ready=False, **common) for name in ("c1", "c2")]
    )
    try:
        with ProcSampler(tag) as procs:
            for _ in range(runs):
                run_now(schedule)
            wait_for(
                lambda: Run.objects.filter(status__in=["succeeded", "failed", "cancelled"]).count() == runs,
                timeout=300,
                interval=0.5,
                what=f"all {runs} runs ended",
            )
    finally:
        for worker in workers:
            worker.stop()
    logs = "\n".join(worker.log()[-3000:] for worker in workers)
    assert Run.objects.filter(status="succeeded", attempt=1).count() == runs, logs
    records = [json.loads(line) for line in stamps.read_text().splitlines()]
    assert sorted(r["run_id"] for r in records) == sorted(Run.objects.values_list("pk", flat=True))
    assert _crowded_windows([r["start"] for r in records]) == []
    assert procs.error is None, procs.error
    assert procs.max_live_of("start_stamp") <= 1, procs.over_cap(1)[:5]
