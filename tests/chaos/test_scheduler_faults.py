"""Faults: Redis stopped then started, PostgreSQL restarted and stopped under a running scheduler.

Both servers are private to the test (their own ports and data), so stopping them disturbs nothing
else on the machine. Every slot must still be dispatched exactly once and every run message must reach
Redis once the fault is over; the scheduler process must survive both.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
from django.db.models import F
from django.db.models.functions import Now

from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import (
    PrivatePostgres,
    PrivateRedis,
    Processes,
    db_now,
    migrate,
    sleep_job,
)
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

REPUBLISH_AFTER = 3.0
FAST = (
    "--interval",
    "1",
    "--claim-ttl",
    "5",
    "--publish-grace",
    "1",
    "--republish-after",
    str(REPUBLISH_AFTER),
    "--republish-backlog-after",
    str(REPUBLISH_AFTER),
)


def _ids(client, queue: str = "jobs.sleep") -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in client.lrange(queue, 0, -1)]


def _hourly_schedules(prefix: str, n: int, *, hours_back: int, policy: str = "run_all") -> list[Schedule]:
    """Hourly schedules with `hours_back` + 1 slots due now and none more for most of an hour."""
    first = db_now().replace(second=0, microsecond=0) - timedelta(hours=hours_back)
    job = sleep_job()
    return Schedule.objects.bulk_create(
        Schedule(
            name=f"{prefix}-{i}",
            job=job,
            custom_directive_text="0.1",
            schedule_type="interval",
            interval_minutes=60,
            misfire_policy=policy,
            overlap_policy="allow",
            next_run_at=first,
        )
        for i in range(n)
    )


def test_redis_stopped_then_started__slots_stay_queued_and_are_published_once(tmp_path):
    redis = PrivateRedis()
    redis.start()
    env = process_env(REDIS_URL=redis.url, CELERY_BROKER_URL=redis.url)
    procs = Processes(env, tmp_path)
    try:
        before = _hourly_schedules("before", 10, hours_back=4)
        proc = procs.start(*FAST)
        wait_for(
            lambda: ScheduledRun.objects.filter(published_at__isnull=False).count() >= 50,
            timeout=60,
            what="first slots published",
        )
        assert len(_ids(redis.client())) == ScheduledRun.objects.count()

        redis.stop()  # --save "": the queue is gone with it
        during = _hourly_schedules("during", 10, hours_back=0, policy="run_once")
        wait_for(
            lambda: ScheduledRun.objects.filter(schedule__in=during).count() == 10,
            timeout=60,
            what="slots dispatched while Redis is down",
        )
        wait_for(lambda: "publish failed" in procs.logs(), timeout=60, what="a failed publish logged")
        assert ScheduledRun.objects.filter(schedule__in=during, published_at__isnull=True).count() == 10
        assert proc.poll() is None, procs.logs()

        redis.start()
        client = redis.client()
        expected = set(ScheduledRun.objects.values_list("task_id", flat=True))
        wait_for(lambda: set(_ids(client)) >= expected, timeout=90, what="every message back in Redis")
        # The sweep never looks inside the broker (issue 15.8): a run still queued is sent again on a
        # back-off that doubles with its age, so the copies stay logarithmic in the wait (the start
        # gate runs each once). Publishes by age A: the first, then ages >= R, 2R, 4R...
        ids = _ids(client)
        ages = dict(ScheduledRun.objects.annotate(age=Now() - F("created_at")).values_list("task_id", "age"))
        for task_id in expected:
            bound = 2 + math.log2(max(ages[task_id].total_seconds(), REPUBLISH_AFTER) / REPUBLISH_AFTER)
            assert 1 <= ids.count(task_id) <= bound, (task_id, ids.count(task_id), ages[task_id])
        assert proc.poll() is None, procs.logs()
    finally:
        procs.stop_all()
        redis.stop()

    assert ScheduledRun.objects.count() == 10 * 5 + 10
    for s in before:
        assert ScheduledRun.objects.filter(schedule=s).count() == 5


def test_postgres_restarted_and_stopped__every_slot_dispatched_once(tmp_path, redis_client):
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        admin = pg.connect()
        with admin.cursor() as cur:
            cur.execute("CREATE DATABASE cb_chaos")
        admin.close()
        env = process_env(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(pg.port), POSTGRES_DB="cb_chaos")
        migrate(env)
        db = pg.connect("cb_chaos")

        def q(statement, params=None):
            with db.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if cur.description else []

        q(
            """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled, schedule_type,
                   interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy,
                   next_run_at, claimed_by, created_at, updated_at)
               SELECT 'pg-' || g, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '0.1', true,
                      'interval', 1, '', 'UTC', 'allowlist', 'run_all', 'allow',
                      date_trunc('minute', now()) - interval '59 minutes', '', now(), now()
                 FROM generate_series(1, 60) g"""
        )
        (start_minute,) = q("SELECT date_trunc('minute', now())")[0]

        def dispatched() -> int:
            return q("SELECT count(*) FROM schedules_scheduledrun")[0][0]

        def behind() -> int:
            return q(
                "SELECT count(*) FROM schedules_schedule WHERE last_run_at IS NULL OR last_run_at < %s",
                [start_minute],
            )[0][0]

        procs = Processes(env, tmp_path)
        try:
            proc = procs.start(*FAST, "--batch-size", "3")
            wait_for(dispatched, timeout=60, interval=0.01, what="first dispatch")
            db.close()
            pg.stop("fast")  # a restart: every connection is cut, mid-transaction or not
            pg.start()
            db = pg.connect("cb_chaos")
            done = dispatched()
            wait_for(lambda: dispatched() > done, timeout=60, interval=0.01, what="progress after restart")
            db.close()
            outages = procs.full_logs().count("database unreachable")
            pg.stop("immediate")  # now down for a while: the loop backs off and keeps trying
            wait_for(
                lambda: procs.full_logs().count("database unreachable") >= outages + 2,
                timeout=60,
                what="repeated back-off while the database is down",
            )
            assert proc.poll() is None, procs.logs()
            pg.start()
            db = pg.connect("cb_chaos")
            wait_for(lambda: behind() == 0, timeout=120, what="all schedules caught up after the outage")
            expected = {row[0] for row in q("SELECT task_id FROM schedules_scheduledrun")}
            wait_for(lambda: set(_ids(redis_client)) >= expected, timeout=60, what="every message in Redis")
            assert proc.poll() is None, procs.logs()
        finally:
            procs.stop_all()
        # Nothing reached the broker for a transaction that the restart rolled back.
        assert set(_ids(redis_client)) <= {row[0] for row in q("SELECT task_id FROM schedules_scheduledrun")}

        assert (
            q(
                "SELECT schedule_id, scheduled_for FROM schedules_scheduledrun"
                " GROUP BY 1, 2 HAVING count(*) > 1"
            )
            == []
        )
        assert (
            q("SELECT count(*) FROM schedules_scheduledrun")[0][0]
            == q("SELECT count(*) FROM orchestrator_run")[0][0]
        )
        for sid, first, last, count, last_run_at in q(
            """SELECT s.id, min(sr.scheduled_for), max(sr.scheduled_for), count(*), s.last_run_at
                 FROM schedules_schedule s JOIN schedules_scheduledrun sr ON sr.schedule_id = s.id
                GROUP BY s.id"""
        ):
            assert first == start_minute - timedelta(minutes=59), sid
            assert last == last_run_at
            assert count == int((last - first).total_seconds() // 60) + 1  # none missing, none twice
        db.close()
    finally:
        pg.destroy()
