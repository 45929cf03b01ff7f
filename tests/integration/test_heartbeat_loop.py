"""A running run's heartbeat beats on time (worker/heartbeat.py `Heartbeat`), seen from outside: its
lease renewed in Redis and `heartbeat_at` stamped in PostgreSQL a quarter lease after it starts.

What must hold whatever else the process is beating: a run's first beat comes a quarter lease after its
start, also while another run with a much later beat is in progress, or after a run that has ended.
A late first beat is a lease that lapses under a live run (the reaper fails it as "worker lost").
"""

from __future__ import annotations

import time

import pytest
from django.utils import timezone

from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService, TaskFence
from tests.scheduler_support import db_now
from tests.support import wait_for
from worker.heartbeat import Heartbeat

pytestmark = pytest.mark.django_db(transaction=True)  # the beat threads use their own connections

LEASE = 2.0  # a beat every 0.5 s
# A thread woken on time still takes a moment to renew and stamp on a loaded machine; a missed wake-up
# would be 30 s (the later run's beat) or never (the idle loop).
SLACK = 0.5


def _running_run() -> Run:
    run = OrchestratorService.launch(
        job=Job.objects.get(key="sleep"), trigger="manual", task3_scope="allowlist"
    )
    Run.objects.filter(pk=run.pk).update(
        status="running", attempt=1, started_at=timezone.now(), heartbeat_at=None
    )
    return run


def _heartbeat(run: Run) -> Heartbeat:
    return Heartbeat(
        run_id=run.pk, scheduled_run_id=None, attempt=1, caps=[], owner=f"test:{run.pk}", fence=TaskFence()
    )


def _first_beats(heartbeat: Heartbeat, entered: float, entered_db) -> tuple[float, float]:
    """Seconds from entering the heartbeat to its first lease renewal and its first database stamp."""
    wait_for(lambda: heartbeat.last_renewed > entered, timeout=60, interval=0.01, what="the first renewal")
    stamped = wait_for(
        lambda: Run.objects.get(pk=heartbeat.run_id).heartbeat_at,
        timeout=60,
        interval=0.01,
        what="heartbeat_at",
    )
    assert not heartbeat.fence.reason, heartbeat.fence.reason
    return heartbeat.last_renewed - entered, (stamped - entered_db).total_seconds()


def _assert_on_time(renewed: float, stamped: float) -> None:
    quarter = LEASE / 4
    assert quarter - 0.01 <= renewed < quarter + SLACK, f"first renewal after {renewed:.3f} s"
    # heartbeat_at is the database's clock, read just after entering: not exact to the millisecond.
    assert quarter - 0.1 <= stamped < quarter + SLACK, f"first heartbeat_at after {stamped:.3f} s"


def test_heartbeat__its_first_beats_come_a_quarter_lease_after_the_run_starts(settings, redis_client):
    settings.WORKER_LEASE_SECONDS = LEASE
    heartbeat = _heartbeat(_running_run())
    entered_db = db_now()
    entered = time.monotonic()
    with heartbeat:
        renewed, stamped = _first_beats(heartbeat, entered, entered_db)
        # And it keeps beating: a second renewal a quarter lease after the first.
        first = heartbeat.last_renewed
        wait_for(lambda: heartbeat.last_renewed > first, timeout=60, interval=0.01, what="the second renewal")
        again = heartbeat.last_renewed - first
    _assert_on_time(renewed, stamped)
    assert LEASE / 4 - 0.01 <= again < LEASE / 4 + SLACK, f"second renewal {again:.3f} s after the first"


def test_heartbeat__a_run_due_sooner_is_beaten_on_time_while_a_later_one_is_in_progress(
    settings, redis_client
):
    settings.WORKER_LEASE_SECONDS = 120  # the first run's beats are 30 s apart
    later = _heartbeat(_running_run())
    with later:
        time.sleep(0.2)  # the later run's next beat is 30 s away
        settings.WORKER_LEASE_SECONDS = LEASE
        sooner = _heartbeat(_running_run())
        entered_db = db_now()
        entered = time.monotonic()
        with sooner:
            renewed, stamped = _first_beats(sooner, entered, entered_db)
    _assert_on_time(renewed, stamped)


def test_heartbeat__a_run_started_after_another_ended_is_beaten_on_time(settings, redis_client):
    settings.WORKER_LEASE_SECONDS = LEASE
    with _heartbeat(_running_run()) as earlier:
        wait_for(lambda: Run.objects.get(pk=earlier.run_id).heartbeat_at, timeout=60, what="a beat")
    # Past the beat the ended run would have had next.
    time.sleep(LEASE / 4 + 0.3)
    heartbeat = _heartbeat(_running_run())
    entered_db = db_now()
    entered = time.monotonic()
    with heartbeat:
        renewed, stamped = _first_beats(heartbeat, entered, entered_db)
    _assert_on_time(renewed, stamped)
