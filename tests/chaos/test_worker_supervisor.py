"""`run_worker` keeps its Celery worker alive: killed on its own, the worker is back and runs execute.

The soak (scripts/soak.py) found a Celery worker that shut itself down ("Unrecoverable error") when Redis
restarted; under honcho that stops the whole `make run`. run_worker now supervises it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.models import Job
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import free_port
from tests.support import process_env, wait_for
from tests.workerproc import BASE_DIR, start_run_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_celery_worker_killed_alone__supervisor_starts_it_again_and_runs_execute(redis_client, tmp_path):
    worker = start_run_worker(tmp_path=tmp_path, name="sup")
    try:
        (celery_pid,) = _children(worker.proc.pid)
        os.kill(celery_pid, signal.SIGKILL)  # the worker process alone, not the supervisor's group

        wait_for(
            lambda: "celery worker exited unexpectedly; restarting" in worker.log(),
            timeout=30,
            what="the supervisor to notice",
        )
        wait_for(
            lambda: worker.log().count("worker maintenance started") >= 2,
            timeout=90,
            what="the worker started again",
        )
        assert worker.proc.poll() is None
        new_children = _children(worker.proc.pid)
        assert len(new_children) == 1
        assert new_children != [celery_pid]

        schedule = Schedule.objects.create(
            name="supervised",
            job=Job.objects.get(key="sleep"),
            enabled=False,
            schedule_type="interval",
            interval_minutes=60,
            custom_directive_text="0.1",
        )
        scheduled = run_now(schedule)
        wait_for(
            lambda: ScheduledRun.objects.get(pk=scheduled.pk).status == "succeeded",
            timeout=90,
            what="a run on the restarted worker",
        )

        worker.kill(signal.SIGTERM)  # the whole group, as honcho or a terminal's Ctrl-C does
        worker.proc.wait(timeout=60)
        assert worker.log().count("celery worker exited unexpectedly") == 1  # a stop is not a crash
    finally:
        worker.stop()


def test_run_worker_started_while_postgres_is_down__waits_for_it_instead_of_exiting(tmp_path):
    log_path = tmp_path / "run_worker-nodb.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "run_worker", "--jobs", "sleep"],
            cwd=BASE_DIR,
            env=process_env(POSTGRES_PORT=str(free_port())),  # nothing listens there
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: log_path.read_text().count("database unreachable") >= 2 or proc.poll() is not None,
            timeout=60,
            what="run_worker retrying the database",
        )
        assert proc.poll() is None, log_path.read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
