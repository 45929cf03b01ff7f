"""Throttled runs wait without polling (issue 14): parked in Redis, woken by the release of a slot.

- a parked run starts within a second of the slot freeing, with a retry backoff far longer than that;
- runs waiting under a cap of one start in the order they came due;
- a wait costs O(1) database writes: row UPDATEs of runs and scheduled runs are counted by a trigger
  (what PostgreSQL executed, not what the code says it did) and bounded per run, however long it waited.
"""

from __future__ import annotations

import os

import pytest
from django.db import connection

from orchestrator.models import Job, Run
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# A backoff far longer than the bound checked: a run that polled for its slot could not meet it.
SLOW_POLLING = {"WORKER_THROTTLE_BASE_SECONDS": "20", "WORKER_THROTTLE_MAX_SECONDS": "30"}
WAITERS = int(os.environ.get("WAITS_TEST_RUNS", "200"))

COUNT_UPDATES_SQL = """
CREATE TABLE test_update_count (tbl text PRIMARY KEY, n bigint NOT NULL);
CREATE FUNCTION test_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO test_update_count VALUES (TG_TABLE_NAME, 1)
  ON CONFLICT (tbl) DO UPDATE SET n = test_update_count.n + 1;
  RETURN NULL;
END $$;
CREATE TRIGGER test_count_run AFTER UPDATE ON orchestrator_run
  FOR EACH ROW EXECUTE FUNCTION test_count_update();
CREATE TRIGGER test_count_scheduledrun AFTER UPDATE ON schedules_scheduledrun
  FOR EACH ROW EXECUTE FUNCTION test_count_update();
"""

DROP_COUNT_SQL = """
DROP TRIGGER IF EXISTS test_count_run ON orchestrator_run;
DROP TRIGGER IF EXISTS test_count_scheduledrun ON schedules_scheduledrun;
DROP FUNCTION IF EXISTS test_count_update();
DROP TABLE IF EXISTS test_update_count;
"""


def _schedule(name: str, text: str) -> Schedule:
    return Schedule.objects.create(
        name=name,
        job=Job.objects.get(key="sleep"),
        enabled=False,
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text=text,
        overlap_policy="allow",
        max_per_job=1,
    )


def _ended(ids: list[int]) -> bool:
    return Run.objects.filter(pk__in=ids, status__in=["succeeded", "failed"]).count() == len(ids)


def test_parked_run__starts_within_a_second_of_the_slot_freeing(redis_client, tmp_path):
    holder_schedule = _schedule("waits-holder", "3")
    with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="wake", concurrency=2, env=SLOW_POLLING):
        holder = run_now(holder_schedule)
        wait_for(lambda: Run.objects.get(pk=holder.run_id).status == "running", timeout=60, what="holder")
        waiter = run_now(_schedule_same(holder_schedule, "0"))
        wait_for(
            lambda: ScheduledRun.objects.get(pk=waiter.pk).status == "throttled", timeout=30, what="parked"
        )
        wait_for(lambda: _ended([holder.run_id, waiter.run_id]), timeout=60, what="both runs ended")
    first = Run.objects.get(pk=holder.run_id)
    second = Run.objects.get(pk=waiter.run_id)
    assert (first.status, second.status) == ("succeeded", "succeeded")
    gap = (second.started_at - first.finished_at).total_seconds()
    print(f"slot freed -> parked run started: {gap * 1000:.0f} ms (backoff would be >= 10 s)")
    assert 0 <= gap < 1.0


def _schedule_same(schedule: Schedule, text: str) -> Schedule:
    schedule.custom_directive_text = text
    schedule.save(update_fields=["custom_directive_text"])
    return schedule


def test_runs_waiting_under_a_cap_of_one__start_in_due_order_with_o1_writes_each(redis_client, tmp_path):
    schedule = _schedule("waits-order", "5")
    with connection.cursor() as cursor:
        cursor.execute(DROP_COUNT_SQL)
        cursor.execute(COUNT_UPDATES_SQL)
    try:
        # The tests' usual short backoff (0.2 to 3 s): a run that polled would write at every poll.
        with running_worker(["jobs.sleep"], tmp_path=tmp_path, name="order", concurrency=2):
            # The first run holds the only slot long enough for every other message to be taken and parked.
            first = run_now(schedule)
            wait_for(lambda: Run.objects.get(pk=first.run_id).status == "running", timeout=60, what="first")
            _schedule_same(schedule, "0")
            waiting = [run_now(schedule) for _ in range(WAITERS)]
            ids = [first.run_id] + [item.run_id for item in waiting]
            wait_for(lambda: _ended(ids), timeout=60 + 3 * WAITERS, interval=0.5, what="every run ended")
        with connection.cursor() as cursor:
            cursor.execute("SELECT tbl, n FROM test_update_count")
            updates = dict(cursor.fetchall())
    finally:
        with connection.cursor() as cursor:
            cursor.execute(DROP_COUNT_SQL)

    rows = list(
        ScheduledRun.objects.filter(pk__in=[item.pk for item in waiting]).values_list(
            "scheduled_for", "run__started_at", "status"
        )
    )
    assert {status for _, _, status in rows} == {"succeeded"}
    by_due = [started for _, started, _ in sorted(rows)]
    assert by_due == sorted(by_due), "runs did not start in the order they came due"
    per_run = {table: n / (WAITERS + 1) for table, n in updates.items()}
    print(f"{WAITERS} waiters under cap 1: UPDATEs per run {per_run}")
    # Per run: the outbox stamp, the throttled transition, the start and the finish (+ the first run's
    # heartbeats): a handful, whatever the wait. A run that polled would add writes for every poll.
    assert per_run.get("orchestrator_run", 0) <= 5
    assert per_run.get("schedules_scheduledrun", 0) <= 5
