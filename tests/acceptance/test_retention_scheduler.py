"""Retention by the scheduler's own housekeeping, and slot dedup after pruning (issue 15.7).

Once the history of a schedule is pruned, nothing but its `last_run_at` high-water mark remembers which
slots ran (the unique slot constraint has no rows left to conflict with). The test prunes everything,
then puts `next_run_at` back at the first pruned slot (as restoring an older copy of the row, or an edit,
could) and restarts the scheduler: none of the old slots is dispatched again.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator.models import Run
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import Processes, db_now, make_schedule, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def test_scheduler_prunes_everything_and_no_old_slot_runs_again(procs):
    first_slot = db_now().replace(second=0, microsecond=0) - timedelta(minutes=5)
    schedule = make_schedule(
        "pruned", next_run_at=first_slot, interval_minutes=1, misfire_policy="run_all", history_keep=0
    )
    assert procs.start("--once").wait(timeout=120) == 0, procs.logs()
    old_slots = sorted(ScheduledRun.objects.filter(schedule=schedule).values_list("scheduled_for", flat=True))
    assert len(old_slots) >= 6
    schedule.refresh_from_db()
    high_water = schedule.last_run_at
    assert high_water == old_slots[-1]

    # Every run finished long ago (aged with SQL).
    sql(
        "UPDATE orchestrator_run SET status = 'succeeded', finished_at = now(),"
        " created_at = now() - interval '40 days'"
    )
    sql(
        "UPDATE schedules_scheduledrun SET status = 'succeeded', finished_at = now(),"
        " created_at = now() - interval '40 days'"
    )
    old_runs = list(Run.objects.values_list("pk", flat=True))
    # A scheduler prunes in its first pass, by itself.
    housekeeper = procs.start("--interval", "5")
    # (It may dispatch the slot of the minute that has just begun, too: that one is recent and stays.)
    wait_for(
        lambda: (
            not ScheduledRun.objects.filter(scheduled_for__lte=high_water).exists()
            and not Run.objects.filter(pk__in=old_runs).exists()
        ),
        timeout=60,
        what="history pruned by the scheduler",
    )
    wait_for(lambda: "history pruned" in procs.logs(), timeout=30, what="the prune logged")
    procs.kill(housekeeper)
    housekeeper.wait(timeout=30)

    sql("UPDATE schedules_schedule SET next_run_at = %s, claimed_by = '', claimed_until = NULL", [first_slot])
    assert procs.start("--once").wait(timeout=120) == 0, procs.logs()
    again = list(ScheduledRun.objects.filter(schedule=schedule).values_list("scheduled_for", flat=True))
    assert all(slot > high_water for slot in again), (again, high_water)
    schedule = Schedule.objects.get(pk=schedule.pk)
    assert schedule.last_run_at >= high_water
    assert schedule.next_run_at > high_water
