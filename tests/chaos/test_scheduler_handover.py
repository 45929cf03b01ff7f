"""A claimant SIGKILLed holding its claims while another instance runs (issue 15.1, docs/ARCHITECTURE.md,
guarantee 2).

The peer takes the claims over once they expire. The time the dead instance held them is a hand-over,
not a downtime: no slot is recorded as missed for it, whatever the policy, even though the claim TTL
is longer than the misfire grace would allow for a slot that simply waited.

To kill the claimant between its claim and its dispatch (a window of milliseconds), the test holds a
lock on the schedules' job row: the dispatch transaction's commit waits on it (the foreign key check
of the new runs), and the claims, committed before, are then held by an instance that dies.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import psycopg2
import pytest
from django.db import connection

from orchestrator.models import Job
from schedules.models import ScheduledRun
from tests.scheduler_support import Processes, db_now, make_schedule, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# The first slot has waited 45 s when the doomed instance claims it; the peer takes it over once the claim
# expires, TTL later: 45 + TTL + the start-up > GRACE, so without the hand-over exemption the skip
# policy records it missed, and with it the slot is on time while the start-up and the peer's pass take
# less than 15 s (GRACE - 45).
TTL = 15
GRACE = 60  # what --interval 30 gives by default; the claim TTL default (120 s) is longer still


def _session():
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg2.connect(**params)


def _backends_waiting_on_a_lock() -> list[int]:
    return [
        pid
        for (pid,) in sql(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    ]


def _claimed_by(claimant: str, *schedules) -> bool:
    ids = [s.pk for s in schedules]
    (held,) = sql(
        "SELECT count(*) FROM schedules_schedule WHERE claimed_by = %s AND id = ANY(%s)", [claimant, ids]
    )[0]
    return held == len(ids)


def test_sigkilled_claimant__its_slots_are_dispatched_by_the_peer_not_skipped(tmp_path, redis_client):
    job = Job.objects.create(key="handover", name="handover", queue="jobs.handover")
    now = db_now()
    # The first slot waited 45 s already (within the grace) when the first instance claims it; the
    # second comes due 15 s from now, while the dead instance's claim (taken after now) still holds
    # the row.
    first = now - timedelta(seconds=45)
    skip = make_schedule(
        "handover-skip", job=job, interval_minutes=1, misfire_policy="skip", next_run_at=first
    )
    once = make_schedule(
        "handover-run-once", job=job, interval_minutes=1, misfire_policy="run_once", next_run_at=first
    )
    args = ("--interval", "1", "--claim-ttl", str(TTL), "--misfire-grace", str(GRACE))
    # The doomed instance must still be waiting on the job lock when it is killed.
    env = process_env(SCHEDULER_LOCK_TIMEOUT_MS="120000", SCHEDULER_STATEMENT_TIMEOUT_MS="120000")
    procs = Processes(env, tmp_path)
    blocker = _session()
    try:
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM orchestrator_job WHERE id = %s FOR UPDATE", [job.pk])
        doomed = procs.start(*args, "--claimant", "doomed:1")
        wait_for(
            lambda: _claimed_by("doomed:1", skip, once), timeout=60, what="the doomed instance holding both"
        )
        waiting = wait_for(_backends_waiting_on_a_lock, timeout=30, what="its dispatch waiting on the job")
        peer = procs.start(*args, "--claimant", "peer:1")
        procs.kill(doomed)
        doomed.wait(timeout=10)
        # A killed client's backend would still finish the COMMIT it waits in once the lock goes; a
        # dead host's would not. Terminate it, so what is left is what a crash leaves: the claims.
        for pid in waiting:
            sql("SELECT pg_terminate_backend(%s)", [pid])
        wait_for(lambda: not _backends_waiting_on_a_lock(), timeout=30, what="the dead backend gone")
        blocker.rollback()
        assert not ScheduledRun.objects.filter(schedule__in=[skip, once]).exists()

        def both_slots_decided() -> bool:
            return ScheduledRun.objects.filter(schedule__in=[skip, once], trigger="schedule").count() >= 4

        wait_for(both_slots_decided, timeout=TTL + 60, what="the peer dispatching the taken-over slots")
        assert peer.poll() is None, procs.logs()
    finally:
        with contextlib.suppress(Exception):
            blocker.close()
        procs.stop_all()

    for s in (skip, once):
        rows = ScheduledRun.objects.filter(schedule=s, trigger="schedule").order_by("scheduled_for")
        assert [(r.scheduled_for, r.status) for r in rows] == [
            (first, "queued"),
            (first + timedelta(minutes=1), "queued"),
        ], procs.logs()
    assert "missed while the scheduler was down" not in procs.full_logs()
    assert "peer:1" in procs.full_logs()
