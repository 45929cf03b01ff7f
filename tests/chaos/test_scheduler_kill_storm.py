"""Exactly once under a kill storm (issue 3): 3 schedulers racing, one SIGKILLed and restarted every ~1 s.

100 schedules, interval 1 minute, anchored two hours back, misfire_policy run_all: each has 120 missed
slots, of which run_all dispatches the latest 100 (docs/ARCHITECTURE.md, guarantee 2), then every slot that
comes due while the
storm goes on. Afterwards SQL must show, for every schedule, exactly the slots from the 100th-latest at
its first dispatch up to its last_run_at: none twice, none missing, each with its own run, and every
run message in Redis.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from datetime import timedelta

import pytest

from schedules.models import Schedule
from tests.scheduler_support import Processes, db_now, sleep_job, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
logger = logging.getLogger(__name__)

SCHEDULES = 100
CATCH_UP = 100
STORM_SECONDS_MAX = 150
_LIVE_CLAIMANTS_SQL = (
    "SELECT DISTINCT claimed_by FROM schedules_schedule WHERE claimed_by <> '' AND claimed_until > now()"
)


def test_kill_storm__every_slot_dispatched_exactly_once(tmp_path, redis_client):
    anchor = db_now().replace(second=0, microsecond=0) - timedelta(hours=2)
    job = sleep_job()
    Schedule.objects.bulk_create(
        Schedule(
            name=f"storm-{i:03d}",
            job=job,
            custom_directive_text="0.1",
            schedule_type="interval",
            interval_minutes=1,
            misfire_policy="run_all",
            overlap_policy="allow",
            next_run_at=anchor + timedelta(minutes=1),
        )
        for i in range(SCHEDULES)
    )
    storm_start = db_now()
    args = (
        "--interval",
        "1",
        "--claim-ttl",
        "4",
        "--batch-size",
        "10",
        "--publish-grace",
        "2",
        "--republish-after",
        "5",
        "--republish-backlog-after",
        "5",
    )
    procs = Processes(process_env(), tmp_path)
    kills = 0
    kills_holding_claims = 0
    try:
        alive = [procs.start(*args) for _ in range(3)]
        started = time.monotonic()

        def all_caught_up() -> bool:
            (behind,) = sql(
                "SELECT count(*) FROM schedules_schedule WHERE last_run_at IS NULL OR last_run_at < %s",
                [storm_start.replace(second=0, microsecond=0)],
            )[0]
            return behind == 0

        # The storm starts once dispatching has: kills then land on instances holding claims, mid-pass.
        wait_for(
            lambda: sql("SELECT 1 FROM schedules_scheduledrun LIMIT 1"),
            timeout=90,
            interval=0.02,
            what="first dispatch",
        )
        victim = 0
        rng = random.Random(SCHEDULES)
        host = socket.gethostname()
        # At least three kills whatever the machine's speed (a quiet machine catches up in a few seconds),
        # and at least one on an instance holding claims: an instance holds them for its dispatch
        # transaction only, not while it publishes, so kills in rhythm alone can miss every pass (they did:
        # 4 kills, none holding claims, on a quick machine).
        while not all_caught_up() or kills < 3 or kills_holding_claims == 0:
            assert time.monotonic() - started < STORM_SECONDS_MAX, procs.logs()
            time.sleep(rng.uniform(0.7, 1.5))  # the storm's own rhythm, not a wait for a condition
            # Aimed at an instance with live claims (mid-pass) when one has them within a second; else the
            # next in turn.
            look_until = time.monotonic() + 1.0
            while True:
                holders = {row[0] for row in sql(_LIVE_CLAIMANTS_SQL)}
                aimed = [i for i, proc in enumerate(alive) if f"{host}:{proc.pid}" in holders]
                if aimed or time.monotonic() > look_until:
                    break
                time.sleep(0.005)
            if aimed:
                victim = aimed[0]
            claimant = f"{host}:{alive[victim].pid}"
            procs.kill(alive[victim])
            alive[victim].wait(timeout=10)
            kills += 1
            (held,) = sql("SELECT count(*) FROM schedules_schedule WHERE claimed_by = %s", [claimant])[0]
            kills_holding_claims += int(held > 0)
            alive[victim] = procs.start(*args)
            victim = (victim + 1) % 3
        storm_seconds = time.monotonic() - started
        # Leave the survivors running until every message is in Redis: the outbox sweep covers a kill
        # between commit and publish (published_at NULL) and between its own stamp and send (re-checked
        # against the broker after --republish-after).
        wait_for(lambda: not missing_from_redis(redis_client), timeout=90, what="every run message in Redis")
    finally:
        procs.stop_all()

    summary = (
        f"kill storm: {kills} kills ({kills_holding_claims} of them holding claims),"
        f" caught up in {storm_seconds:.1f} s"
    )
    logger.warning(summary)
    print(summary)
    assert kills >= 3
    # The storm really hit instances while they held claims (what could lose or double a slot); the
    # duplicate-slot count it used to check could not fail: the unique constraint makes it zero.
    assert kills_holding_claims >= 1
    # Each scheduled run has its own run, and no run exists without its scheduled run.
    assert (
        sql("SELECT count(*) FROM schedules_scheduledrun WHERE run_id IS NULL OR status <> 'queued'")[0][0]
        == 0
    )
    assert (
        sql("SELECT count(*), count(DISTINCT run_id) FROM schedules_scheduledrun")[0]
        == sql("SELECT count(*), count(*) FROM orchestrator_run")[0]
    )

    # None missing: per schedule, exactly the 100 latest slots at its first dispatch, then every slot
    # up to last_run_at, one minute apart.
    rows = sql(
        """SELECT s.id, s.last_run_at, s.next_run_at,
                  array_agg(sr.scheduled_for ORDER BY sr.scheduled_for),
                  min(sr.created_at)
             FROM schedules_schedule s JOIN schedules_scheduledrun sr ON sr.schedule_id = s.id
            GROUP BY s.id"""
    )
    assert len(rows) == SCHEDULES
    for sid, last_run_at, next_run_at, slots, first_dispatch in rows:
        newest_at_first = first_dispatch.replace(second=0, microsecond=0)
        expected_first = newest_at_first - timedelta(minutes=CATCH_UP - 1)
        expected = [expected_first + timedelta(minutes=i) for i in range(len(slots))]
        assert slots == expected, f"schedule {sid}: slots not contiguous from {expected_first}"
        assert len(slots) >= CATCH_UP
        assert slots[-1] == last_run_at
        assert next_run_at == last_run_at + timedelta(minutes=1)

    assert missing_from_redis(redis_client) == set()
    # And nothing was published for a dispatch that did not commit (a kill before the commit).
    in_redis = {json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("jobs.sleep", 0, -1)}
    assert in_redis <= {row[0] for row in sql("SELECT task_id FROM schedules_scheduledrun")}


def missing_from_redis(redis_client) -> set[str]:
    in_redis = {json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("jobs.sleep", 0, -1)}
    return {row[0] for row in sql("SELECT task_id FROM schedules_scheduledrun")} - in_redis
