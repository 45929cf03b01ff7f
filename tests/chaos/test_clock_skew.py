"""The database clock everywhere (issue 15.2): web, scheduler and worker processes whose own clocks are
ten minutes off (libfaketime, `FAKETIME=+10m` / `-10m` through LD_PRELOAD) still agree with PostgreSQL's
now() on what is due. No slot early, none late beyond the normal lag, none twice.

On the old code the web process anchored a new or re-enabled schedule's `next_run_at` on its own clock
(ten minutes late, or nine minutes in the past and so due at once) and stamped `Run.created_at` with it,
which orders the waiters for a cap and times the outbox sweep's grace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest

from orchestrator.models import Run, RunStatus
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import Processes, db_now, sleep_job, sql
from tests.support import process_env, wait_for
from tests.webproc import api_token, start_web
from tests.workerproc import start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
# The scheduler's wake-up after a due instant, plus a slow machine: what "not late" allows.
NORMAL_LAG = timedelta(seconds=10)


def _skewed(offset: str) -> dict[str, str]:
    # File times stay real: gunicorn's arbiter times its workers' heartbeats by setting and reading a
    # file's mtime with the monotonic clock, which libfaketime's stat faking breaks (EINVAL, timeouts).
    # (Leaving the monotonic clock unfaked instead breaks time.sleep's absolute clock_nanosleep.)
    return {"FAKETIME": offset, "LD_PRELOAD": LIBFAKETIME, "NO_FAKE_STAT": "1"}


@pytest.fixture(autouse=True)
def _needs_faketime():
    if not (shutil.which("faketime") and os.path.exists(LIBFAKETIME)):
        pytest.skip("needs faketime (Debian package `faketime`, libfaketime)")


def _clock_offset(offset: str) -> float:
    """Seconds between a process's clock under FAKETIME=`offset` and PostgreSQL's."""
    probe = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **_skewed(offset)},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(probe.stdout) - db_now().timestamp()


def _between(value, low, high) -> bool:
    return low <= value <= high


@pytest.mark.parametrize(
    ("web_offset", "scheduler_offset", "worker_offset"),
    [("+10m", "-10m", "+10m"), ("-10m", "+10m", "-10m")],
)
def test_skewed_clocks__every_due_time_is_the_databases(
    tmp_path, redis_client, web_offset, scheduler_offset, worker_offset
):
    sleep_job()
    for offset in {web_offset, scheduler_offset, worker_offset}:
        # The skew really applies: a Python process started so sees its clock ten minutes off.
        assert abs(abs(_clock_offset(offset)) - 600) < 30
    procs = Processes(process_env(**_skewed(scheduler_offset)), tmp_path)
    worker = web = None
    try:
        worker = start_worker(
            ["jobs.sleep"], tmp_path=tmp_path, name="skewed", concurrency=2, env=_skewed(worker_offset)
        )
        web = start_web(process_env(**_skewed(web_offset)), tmp_path, token=api_token())
        procs.start("--interval", "5")

        # Create through the skewed web: the first slot is one interval after the database's now.
        before = db_now()
        status, body = web.call(
            "POST",
            "/api/schedules/",
            {
                "name": "skewed",
                "job_key": "sleep",
                "custom_directive_text": "0.2",
                "schedule_type": "interval",
                "interval_minutes": 1,
                "overlap_policy": "allow",
            },
        )
        after = db_now()
        assert status == 201, body
        schedule = Schedule.objects.get(pk=body["id"])
        first = schedule.next_run_at
        assert _between(first, before, after + timedelta(minutes=1)), (before, first, after)

        # Re-enabled through the skewed web: from the database's now again.
        assert web.call("POST", f"/api/schedules/{schedule.pk}/disable")[0] == 200
        sql(
            "UPDATE schedules_schedule SET next_run_at = now() - interval '1 hour' WHERE id = %s",
            [schedule.pk],
        )
        before = db_now()
        status, body = web.call("POST", f"/api/schedules/{schedule.pk}/enable")
        after = db_now()
        assert status == 200, body
        schedule.refresh_from_db()
        assert _between(schedule.next_run_at, before, after + timedelta(minutes=1))

        # Run-now through the skewed web: its run's created_at and its slot are the database's.
        before = db_now()
        status, body = web.call("POST", f"/api/schedules/{schedule.pk}/run-now")
        after = db_now()
        assert status == 202, body
        manual = ScheduledRun.objects.select_related("run").get(pk=body["id"])
        assert _between(manual.scheduled_for, before, after)
        assert _between(manual.run.created_at, before, after)
        assert _between(manual.created_at, before, after)

        # A slot due in a few seconds (database clock), dispatched by the skewed scheduler and run by
        # the skewed worker: not before its time, not late, once.
        slot = sql(
            "UPDATE schedules_schedule SET next_run_at = date_trunc('second', now()) + interval '3 seconds'"
            " WHERE id = %s RETURNING next_run_at",
            [schedule.pk],
        )[0][0]
        scheduled = wait_for(
            lambda: ScheduledRun.objects.filter(schedule=schedule, trigger="schedule").first(),
            timeout=60,
            what="the slot dispatched",
        )
        assert scheduled.scheduled_for == slot
        assert scheduled.created_at >= slot, "dispatched early"
        assert scheduled.created_at - slot < NORMAL_LAG, "dispatched late"

        done = wait_for(
            lambda: all(
                status == RunStatus.SUCCEEDED
                for status in Run.objects.filter(pk__in=[manual.run_id, scheduled.run_id]).values_list(
                    "status", flat=True
                )
            ),
            timeout=90,
            what="both runs succeeded",
        )
        assert done, worker.log()[-3000:]
        for run in Run.objects.filter(pk__in=[manual.run_id, scheduled.run_id]):
            assert run.attempt == 1  # started once
            assert run.started_at >= run.created_at
        # The next slot is one interval after this one, never the clock's; nothing dispatched twice.
        schedule.refresh_from_db()
        assert schedule.next_run_at == slot + timedelta(minutes=1)
        assert schedule.last_run_at == slot
        assert ScheduledRun.objects.filter(schedule=schedule, trigger="schedule").count() == 1
    finally:
        for process in (web, worker):
            if process is not None:
                process.stop()
        procs.stop_all()
