"""`run_scheduler` next to sessions holding locks (issue 15.4): nothing waits without bound.

A second session (psycopg2, as psql or a stuck transaction would be) holds a row lock on one due
schedule, or a table lock on all of them; the scheduler keeps dispatching what it can, does not spin,
and dispatches the rest once the lock goes.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import timedelta

import psycopg2
import pytest
from django.db import connection

from schedules.models import ScheduledRun
from tests.scheduler_support import Processes, db_now, make_schedule
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _session():
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg2.connect(**params)


def _dispatched(schedule) -> bool:
    return ScheduledRun.objects.filter(schedule=schedule, trigger="schedule").exists()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture
def blocker():
    session = _session()
    try:
        yield session
    finally:
        with contextlib.suppress(Exception):
            session.rollback()
        session.close()


def test_a_row_lock_on_one_due_schedule__the_others_dispatch_while_it_is_held_and_it_follows_the_release(
    procs, blocker
):
    due = db_now() - timedelta(seconds=1)
    schedules = [make_schedule(f"row-{i}", next_run_at=due) for i in range(5)]
    locked = schedules[2]
    with blocker.cursor() as cursor:
        cursor.execute("SELECT 1 FROM schedules_schedule WHERE id = %s FOR UPDATE", [locked.pk])

    proc = procs.start("--interval", "30")
    others = [s for s in schedules if s is not locked]
    wait_for(lambda: all(_dispatched(s) for s in others), timeout=60, what="the unlocked ones dispatched")
    assert not _dispatched(locked)

    # While the lock is held the loop polls for it; it does not spin on a row it cannot claim.
    before, started = _cpu_seconds(proc.pid), time.monotonic()
    time.sleep(4)
    cpu = _cpu_seconds(proc.pid) - before
    assert cpu < 0.5, f"scheduler used {cpu:.2f} s of CPU in {time.monotonic() - started:.1f} s"
    assert not _dispatched(locked)

    blocker.rollback()
    released = time.monotonic()
    wait_for(lambda: _dispatched(locked), timeout=10, interval=0.05, what="the locked one after release")
    assert time.monotonic() - released < 5
    assert proc.poll() is None, procs.logs()


def test_a_table_lock__the_claim_times_out_backs_off_and_dispatches_after_the_release(procs, blocker):
    s = make_schedule("table-locked", next_run_at=db_now() + timedelta(seconds=2))
    env = process_env(SCHEDULER_LOCK_TIMEOUT_MS="300")
    proc = procs.start("--interval", "1", env=env)
    # What a migration does (ALTER TABLE takes a stronger lock still): the claim's UPDATE must wait.
    with blocker.cursor() as cursor:
        cursor.execute("LOCK TABLE schedules_schedule IN SHARE MODE")
    wait_for(
        lambda: "database statement timed out; backing off" in procs.full_logs(),
        timeout=30,
        what="the claim stopped by lock_timeout, not waiting",
    )
    assert not _dispatched(s)
    assert proc.poll() is None, procs.logs()

    blocker.rollback()
    wait_for(lambda: _dispatched(s), timeout=15, what="dispatch once the table lock is gone")
    assert "LockNotAvailable" in procs.full_logs()
