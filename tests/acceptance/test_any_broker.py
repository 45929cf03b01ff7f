"""Any Celery broker (issue 15.8): the whole system on RabbitMQ, the semaphores staying in Redis.

A real scheduler, a real worker and the web (gunicorn) all get CELERY_BROKER_URL=amqp://...; nothing in
the system reads a broker's internals, so a scheduled run and a run-now succeed unchanged, and a
message the broker lost (its queue purged before any worker took it) is published again by the outbox
sweep from the run's own state, and runs exactly once.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import subprocess

import pytest
from django.db import connection

from orchestrator.models import Job, Run
from project.celery import broker_is_redis
from schedules.models import ScheduledRun
from tests.scheduler_support import PYTHON, REPO, Processes, db_now, make_schedule, sleep_job, sql
from tests.support import process_env, wait_for
from tests.webproc import api_token, start_web
from tests.workerproc import start_run_worker

pytestmark = [pytest.mark.django_db(transaction=True)]

AMQP = ("127.0.0.1", 5672)
QUEUE = "jobs.sleep"
REPUBLISH_AFTER = 2.0


def _amqp_answers() -> bool:
    try:
        with socket.create_connection(AMQP, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def amqp_url() -> str:
    """RabbitMQ's URL on a vhost of this test database's own (made with rabbitmqctl), queue emptied."""
    if not _amqp_answers():
        pytest.skip("RabbitMQ does not answer on 127.0.0.1:5672 (Debian package rabbitmq-server)")
    vhost = f"cb_{connection.settings_dict['NAME']}"
    if shutil.which("rabbitmqctl") is None or not _own_vhost(vhost):
        vhost = ""  # the default vhost: still correct, the queue is purged first
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    _purge(url)
    return url


def _own_vhost(vhost: str) -> bool:
    """Create the vhost (if missing) and let guest use it; False when rabbitmqctl may not (not root)."""
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], capture_output=True, timeout=60)  # may exist
    allowed = subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        capture_output=True,
        timeout=60,
    )
    return allowed.returncode == 0


def _queue_depth(url: str) -> int:
    """Messages ready in the queue (RabbitMQ's own count: a passive declare, public AMQP)."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=5) as conn:
            return conn.default_channel.queue_declare(queue=QUEUE, passive=True).message_count
    except Exception:
        return 0  # not declared yet


def _purge(url: str) -> int:
    """Drop every message waiting in the queue, as a broker that loses them would."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=5) as conn:
            return conn.default_channel.queue_purge(QUEUE) or 0
    except Exception:
        return 0


def _status(scheduled_run_id: int) -> str:
    return ScheduledRun.objects.get(pk=scheduled_run_id).status


@pytest.mark.slow
def test_rabbitmq__scheduled_and_run_now_succeed_and_a_lost_message_runs_once(
    amqp_url, tmp_path, redis_client
):
    assert not broker_is_redis(amqp_url)
    sleep_job()
    # A job timeout past Redis's visibility timeout: the warning is a Redis-broker one only.
    Job.objects.filter(key="sleep").update(timeout_seconds=5 * 3600)
    env = process_env(CELERY_BROKER_URL=amqp_url)
    procs = Processes(env, tmp_path)
    web = worker = None
    try:
        # The lost message's queue fills again before any worker runs (step 2): the backstop re-publishes
        # it, whatever the queue holds.
        procs.start(
            "--interval",
            "1",
            "--publish-grace",
            "1",
            "--republish-after",
            str(REPUBLISH_AFTER),
            "--republish-backlog-after",
            str(REPUBLISH_AFTER),
        )
        web = start_web(env, tmp_path, token=api_token())

        # 1. A scheduled slot whose message the broker loses before any worker takes it.
        lost = make_schedule("amqp-lost")
        lost_sr = wait_for(
            lambda: ScheduledRun.objects.filter(schedule=lost, published_at__isnull=False).first(),
            timeout=60,
            what="first slot published to RabbitMQ",
        )
        wait_for(lambda: _queue_depth(amqp_url) >= 1, timeout=30, what="its message in the queue")
        # The sweep may already have sent a copy (after REPUBLISH_AFTER): purge until a purge found it.
        assert _purge(amqp_url) >= 1
        purged_at = db_now()

        # 2. A schedule made through the API, due now (its row aged by SQL), and a run-now of another.
        status, created = web.call(
            "POST",
            "/api/schedules/",
            {
                "name": "amqp-scheduled",
                "job_key": "sleep",
                "custom_directive_text": "0.1",
                "schedule_type": "interval",
                "interval_minutes": 60,
                "timezone": "UTC",
            },
        )
        assert status == 201, created
        sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [created["id"]])
        status, body = web.call(
            "POST",
            "/api/schedules/",
            {
                "name": "amqp-run-now",
                "job_key": "sleep",
                "enabled": False,
                "interval_minutes": 60,
                "schedule_type": "interval",
                "custom_directive_text": "0.1",
            },
        )
        assert status == 201, body
        status, run_now = web.call("POST", f"/api/schedules/{body['id']}/run-now")
        assert status == 202, run_now
        scheduled_sr = wait_for(
            lambda: ScheduledRun.objects.filter(schedule_id=created["id"], trigger="schedule").first(),
            timeout=60,
            what="the API schedule's slot dispatched",
        )

        # 3. The lost one is published again from its own state (no worker has seen anything yet).
        wait_for(
            lambda: ScheduledRun.objects.filter(pk=lost_sr.pk, published_at__gt=purged_at).exists(),
            timeout=60,
            what="lost message re-published by the sweep",
        )

        # 4. A worker on RabbitMQ: each run executes once, however many copies the queue holds.
        worker = start_run_worker(tmp_path=tmp_path, env={"CELERY_BROKER_URL": amqp_url})
        ids = [lost_sr.pk, scheduled_sr.pk, run_now["id"]]
        wait_for(
            lambda: all(_status(i) in {"succeeded", "failed"} for i in ids),
            timeout=120,
            what="all three runs finished",
        )
        assert [_status(i) for i in ids] == ["succeeded"] * 3, procs.logs()
        log = worker.log()
        for scheduled_run in ScheduledRun.objects.filter(pk__in=ids):
            run = Run.objects.get(pk=scheduled_run.run_id)
            started = re.findall(rf"run started attempt=\d+ job=sleep run_id={run.pk} ", log)
            assert (len(started), run.attempt) == (1, 1), (run.pk, started)
        assert "Connected to amqp://guest:**@127.0.0.1:5672/" in log
        assert "BROKER_VISIBILITY_TIMEOUT" not in log
        assert web.call("GET", "/api/health/")[0] == 200
        print(f"RabbitMQ: 3 runs ran once each; {log.count('message dropped')} copies dropped by the gate")
    finally:
        if worker is not None:
            worker.stop()
        if web is not None:
            web.stop()
        procs.stop_all()


def test_visibility_warning__is_given_for_a_redis_broker(caplog):
    """The counterpart of the RabbitMQ run above, where the same long timeout warns of nothing."""
    from worker.reaper import _warn_if_visibility_too_short

    assert broker_is_redis()
    sleep_job()
    Job.objects.filter(key="sleep").update(timeout_seconds=5 * 3600)
    with caplog.at_level(logging.WARNING):
        _warn_if_visibility_too_short()
    assert "BROKER_VISIBILITY_TIMEOUT is not longer than the longest hard time limit" in caplog.text


_OPTIONS_SCRIPT = """
import django
django.setup()
from project.celery import app
print(sorted(app.conf.broker_transport_options or {}))
"""


@pytest.mark.parametrize(
    ("broker", "options"),
    [("amqp://guest:guest@127.0.0.1:5672//", "[]"), ("redis://127.0.0.1:6379/15", "['visibility_timeout']")],
)
def test_transport_options__the_visibility_timeout_is_set_for_a_redis_broker_only(broker, options):
    out = subprocess.run(
        [PYTHON, "-c", _OPTIONS_SCRIPT],
        cwd=REPO,
        env=process_env(CELERY_BROKER_URL=broker),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == options
