"""A scheduler frozen mid-transaction (SIGSTOP: a stuck host, a process the network cut off) cannot hold its
schedules' rows past the claim TTL: `SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS` ends its session, and
another instance dispatches the slots once the claims expire (docs/OPERATIONS.md, "A frozen scheduler").

Without it the rows stay locked until TCP keepalive gives up on a cut-off host (about 30 s here), and for
as long as the process stays stopped on a frozen one: the other instance's claims skip locked rows.

To freeze the scheduler inside its dispatch transaction (a window of milliseconds), the test holds an
ACCESS EXCLUSIVE lock on the runs table: the transaction, having locked its schedules, waits on it at
its first run insert. The test then stops the process and lets the insert through; the server finishes
the statement and waits, idle in transaction, for a client that never speaks again.
"""

from __future__ import annotations

import contextlib
import signal
import time

import psycopg2
import pytest
from django.db import connection

from schedules.models import ScheduledRun
from tests.scheduler_support import Processes, make_schedule, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TTL = 6  # claim TTL (s)
IDLE_MS = 1000


def _session():
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg2.connect(**params)


def _dispatching_and_waiting(app: str) -> bool:
    """The scheduler's backend has locked schedule rows (FOR UPDATE) and waits on a lock."""
    return bool(
        sql(
            "SELECT 1 FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.granted"
            " WHERE a.application_name = %s AND a.wait_event_type = 'Lock'"
            " AND l.relation = 'schedules_schedule'::regclass AND l.mode = 'RowShareLock'",
            [app],
        )
    )


def _locked_schedule_ids() -> set[int]:
    """Rows some other session holds locked: those SKIP LOCKED cannot take."""
    with _session() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT id FROM schedules_schedule")
        every = {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT id FROM schedules_schedule FOR UPDATE SKIP LOCKED")
        free = {row[0] for row in cursor.fetchall()}
        conn.rollback()
    return every - free


def test_scheduler_frozen_mid_transaction__its_slots_are_dispatched_by_the_peer_within_the_claim_ttl(
    tmp_path,
):
    schedules = [make_schedule(f"frozen-{i}") for i in range(3)]
    env = process_env(SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS=str(IDLE_MS))
    procs = Processes(env, tmp_path)
    blocker = _session()
    frozen = None
    try:
        with blocker.cursor() as cursor:
            cursor.execute("LOCK TABLE orchestrator_run IN ACCESS EXCLUSIVE MODE")
        frozen = procs.start(
            "--claim-ttl",
            str(TTL),
            "--interval",
            "1",
            "--claimant",
            "frozen",
            env={**env, "PGAPPNAME": "frozen"},
        )
        wait_for(
            lambda: _dispatching_and_waiting("frozen"), timeout=60, interval=0.02, what="dispatch waiting"
        )
        procs.kill(frozen, signal.SIGSTOP)
        blocker.rollback()  # the insert goes through; the stopped client never sends the next statement
        frozen_at = time.monotonic()
        wait_for(
            lambda: (
                sql("SELECT state FROM pg_stat_activity WHERE application_name = 'frozen'")
                == [("idle in transaction",)]
            ),
            timeout=10,
            what="the frozen scheduler's session idle in transaction",
        )
        locked = _locked_schedule_ids()
        assert locked == {s.pk for s in schedules}, locked

        procs.start("--claim-ttl", str(TTL), "--interval", "1", "--claimant", "peer")
        wait_for(
            lambda: ScheduledRun.objects.filter(schedule_id__in=locked).count() == len(locked),
            timeout=TTL + 20,
            interval=0.1,
            what="the peer dispatching the frozen scheduler's slots",
        )
        took = time.monotonic() - frozen_at
    finally:
        blocker.close()
        procs.stop_all()
        if frozen is not None:
            with contextlib.suppress(Exception):
                procs.kill(frozen, signal.SIGCONT)

    # One slot each, dispatched by the peer (the frozen scheduler's transaction never committed), and
    # the frozen session is gone: PostgreSQL ended it.
    assert sorted(ScheduledRun.objects.values_list("schedule_id", flat=True)) == sorted(locked)
    assert sql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'frozen'") == [(0,)]
    print(
        f"frozen scheduler: its {len(locked)} slots dispatched by the peer {took:.1f}s after the freeze"
        f" (claim TTL {TTL}s, idle-in-transaction timeout {IDLE_MS} ms)"
    )
