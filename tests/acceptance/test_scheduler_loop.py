"""`run_scheduler` as a real process: fast pickup, claim expiry, SIGTERM, --once, and Celery beat."""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from datetime import timedelta

import psycopg2
import pytest
from django.db import connection

from orchestrator.models import Job
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import PYTHON, REPO, Processes, db_now, make_schedule, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
logger = logging.getLogger(__name__)


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def listening() -> bool:
    """A scheduler is parked in its wait, LISTENing for schedule changes."""
    return bool(
        sql(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'LISTEN schedules_wake' AND state = 'idle'"
        )
    )


def dispatched(schedule) -> int:
    return ScheduledRun.objects.filter(schedule=schedule, trigger="schedule").count()


def test_once__dispatches_what_is_due_and_exits_zero(procs, redis_client):
    s = make_schedule("once")
    proc = procs.start("--once", "--interval", "30")
    assert proc.wait(timeout=120) == 0, procs.logs()
    assert dispatched(s) == 1
    assert redis_client.llen("jobs.sleep") == 1
    log = procs.logs()
    assert "schedules claimed" in log
    assert "slot dispatched" in log


def test_fast_pickup__a_schedule_due_now_dispatches_within_a_second_with_interval_30(procs):
    procs.start("--interval", "30")
    latencies = []
    for i in range(3):
        wait_for(listening, timeout=60, what="scheduler waiting on LISTEN")
        started = time.monotonic()
        s = make_schedule(f"fast-{i}", next_run_at=db_now())
        # The deadline is only there to report a latency rather than hang; the second is asserted below.
        wait_for(lambda s=s: dispatched(s), timeout=10, interval=0.02, what="fast pickup")
        latencies.append(time.monotonic() - started)
    # A raw SQL edit of next_run_at wakes it too (the trigger, not the ORM, notifies).
    wait_for(listening, timeout=60, what="scheduler waiting on LISTEN")
    later = make_schedule("raw-sql", next_run_at=db_now() + timedelta(hours=1))
    wait_for(listening, timeout=60, what="scheduler waiting on LISTEN")
    started = time.monotonic()
    sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [later.pk])
    wait_for(lambda: dispatched(later), timeout=10, interval=0.02, what="pickup after raw SQL edit")
    latencies.append(time.monotonic() - started)
    logger.warning("fast pickup latencies (s): %s", [round(x, 3) for x in latencies])
    print("fast pickup latencies (s):", [round(x, 3) for x in latencies])
    # Measured from the commit that made each schedule due to the test seeing its run (polling every
    # 20 ms included): an upper bound of the scheduler's own pickup time, far below the 30 s interval.
    assert max(latencies) < 1.0, latencies


def test_sleep__wakes_for_the_earliest_next_run_at_not_the_interval(procs):
    procs.start("--interval", "30")
    wait_for(listening, timeout=60, what="scheduler waiting on LISTEN")
    s = make_schedule("soon", next_run_at=db_now() + timedelta(seconds=3))
    wait_for(lambda: dispatched(s), timeout=15, what="dispatch at next_run_at")
    (created_at, slot) = sql(
        "SELECT created_at, scheduled_for FROM schedules_scheduledrun WHERE schedule_id = %s", [s.pk]
    )[0]
    assert created_at >= slot  # never before its slot, by the database clock


def test_claim_expiry__a_dead_claimants_schedule_is_dispatched_once_the_claim_passes_and_not_before(procs):
    s = make_schedule("orphaned")
    sql(
        "UPDATE schedules_schedule SET claimed_by = 'dead:1', claimed_until = now() + interval '4 seconds'"
        " WHERE id = %s",
        [s.pk],
    )
    (claimed_until,) = sql("SELECT claimed_until FROM schedules_schedule WHERE id = %s", [s.pk])[0]
    procs.start("--interval", "30")
    wait_for(lambda: dispatched(s), timeout=30, what="dispatch after claim expiry")
    (created_at,) = sql("SELECT created_at FROM schedules_scheduledrun WHERE schedule_id = %s", [s.pk])[0]
    assert created_at >= claimed_until
    assert dispatched(s) == 1


def test_sigterm__finishes_the_batch_in_hand_releases_claims_and_exits_zero(procs):
    first = db_now().replace(second=0, microsecond=0) - timedelta(minutes=90)
    schedules = [
        make_schedule(f"big-{i}", next_run_at=first, interval_minutes=1, misfire_policy="run_all")
        for i in range(40)
    ]
    proc = procs.start("--interval", "30", "--claimant", "term:1")
    wait_for(lambda: ScheduledRun.objects.exists(), timeout=60, interval=0.01, what="dispatch started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, procs.logs()
    assert not Schedule.objects.filter(claimed_by="term:1").exists()
    # Whatever was done is whole: each schedule's slots are contiguous up to its last_run_at.
    for s in schedules:
        s.refresh_from_db()
        slots = sorted(ScheduledRun.objects.filter(schedule=s).values_list("scheduled_for", flat=True))
        if slots:
            assert slots[-1] == s.last_run_at
            assert slots == [slots[0] + timedelta(minutes=i) for i in range(len(slots))]
            assert s.next_run_at == s.last_run_at + timedelta(minutes=1)
    # Another instance finishes the rest at once: the claims were given back, not left to expire.
    proc2 = procs.start("--once", "--interval", "30")
    assert proc2.wait(timeout=120) == 0, procs.logs()
    for s in schedules:
        assert ScheduledRun.objects.filter(schedule=s).count() >= 90


def test_celery_beat__database_scheduler_dispatches(procs, tmp_path):
    s = make_schedule("via-beat")
    log = open(tmp_path / "beat.log", "wb")
    beat = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "project",
            "beat",
            "-S",
            "schedules.beat:DatabaseScheduler",
            "--loglevel",
            "INFO",
            "--pidfile",
            "",
            "--schedule",
            str(tmp_path / "beat-schedule"),
        ],
        cwd=REPO,
        env=process_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.procs.append(beat)
    beat.log_path = log.name
    log.close()
    wait_for(lambda: dispatched(s), timeout=60, what="dispatch by celery beat")
    # A schedule made due while beat waits is picked up through NOTIFY too.
    wait_for(listening, timeout=60, what="beat waiting on LISTEN")
    s2 = make_schedule("via-beat-2", next_run_at=db_now())
    wait_for(lambda: dispatched(s2), timeout=10, what="fast pickup under celery beat")
    beat.send_signal(signal.SIGTERM)
    beat.wait(timeout=60)


def test_sigterm_holding_claims__the_peer_dispatches_them_at_once_not_after_the_ttl(procs):
    """Graceful drain of a scheduler (Kubernetes' SIGTERM in a rolling update): it gives back the claims
    it holds as it stops, and the other replica, asleep with nothing claimable, is woken and takes them,
    well before the claims' TTL would have let it.

    To hold the claims until the SIGTERM, the holder's first dispatch transaction waits on a lock the
    test holds on the schedules' job row (its new runs' foreign key check), as in
    tests/chaos/test_scheduler_handover.py; the lock goes right after the SIGTERM. 300 schedules due
    now are more than one transaction dispatches (200): the rest is still claimed when it stops."""
    ttl = 30.0
    count = 300
    job = Job.objects.create(key="drained", name="drained", queue="jobs.drained")
    for i in range(count):
        make_schedule(f"held-{i}", job=job)
    args = ("--interval", "30", "--claim-ttl", str(ttl))
    env = process_env(SCHEDULER_LOCK_TIMEOUT_MS="120000", SCHEDULER_STATEMENT_TIMEOUT_MS="120000")
    blocker = psycopg2.connect(**{k: v for k, v in connection.get_connection_params().items() if k in _PG})
    try:
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM orchestrator_job WHERE id = %s FOR UPDATE", [job.pk])
        holder = procs.start(*args, "--claimant", "holder:1", env=env)

        def held() -> int:
            return sql("SELECT count(*) FROM schedules_schedule WHERE claimed_by = 'holder:1'")[0][0]

        wait_for(lambda: held() == count, timeout=60, what="the holder claiming every schedule")
        wait_for(_waiting_on_a_lock, timeout=60, what="its dispatch waiting on the job row")
        peer = procs.start(*args, "--claimant", "peer:1", env=env)
        # The peer found nothing claimable and waits on LISTEN (the holder, blocked, is not waiting).
        wait_for(listening, timeout=60, what="the peer waiting")
        holder.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        blocker.rollback()

        def peer_claimed() -> bool:
            return bool(sql("SELECT 1 FROM schedules_schedule WHERE claimed_by = 'peer:1' LIMIT 1"))

        wait_for(peer_claimed, timeout=ttl + 30, interval=0.01, what="the peer claiming")
        took = time.monotonic() - sent
        assert holder.wait(timeout=60) == 0, procs.logs()
    finally:
        blocker.close()
    print(f"peer took over {took:.2f}s after the SIGTERM (claim TTL {ttl:g}s)")
    # Within a second, plus the holder's transaction in hand on a loaded machine; claims left to expire
    # would take the 30 s TTL.
    assert took < 10, procs.logs()
    assert held() == 0
    wait_for(
        lambda: ScheduledRun.objects.filter(schedule__job=job).count() == count,
        timeout=120,
        what="every slot dispatched",
    )
    assert peer.poll() is None


_PG = ("dbname", "user", "password", "host", "port")


def _waiting_on_a_lock() -> bool:
    return bool(
        sql(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
    )
