"""Alerts: each kind opens and resolves once with two real schedulers evaluating, and each transition is
notified exactly once to a webhook receiver on loopback (whose first answer is a 500, so delivery
retries); GET /api/alerts/ and its filters."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitoring import metrics
from schedules.models import Alert, Schedule, ScheduledRun
from tests.scheduler_support import Processes, db_now, make_schedule, sql
from tests.support import process_env, wait_for

TOKEN = "T0KEN-in-the-webhook-path-9f3a"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records each JSON body; answers 500 to the first `fail`."""

    def __init__(self, fail: int = 1) -> None:
        self.bodies: list[dict] = []
        self.attempts = 0
        self.fail = fail
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= receiver.fail:
                    self.send_response(500)
                else:
                    receiver.bodies.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[tuple[str, str, str]]:
        return sorted((b["alert"]["schedule"], b["alert"]["kind"], b["event"]) for b in self.bodies)


def alert_of(schedule: Schedule) -> Alert | None:
    return Alert.objects.filter(schedule=schedule).first()


def finished_run(schedule: Schedule, status: str, minutes_ago: int) -> None:
    at = db_now() - timedelta(minutes=minutes_ago)
    ScheduledRun.objects.create(
        schedule=schedule, trigger="manual", scheduled_for=at, status=status, started_at=at, finished_at=at
    )


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_each_kind_opens_and_resolves_once_and_each_transition_is_notified_once(redis_client, tmp_path):
    later = db_now() + timedelta(days=1)
    # missed: hourly, its slot 20 min ago is past the 10 min catch-up window (misfire skip): missed.
    missed = make_schedule(
        "alert-missed",
        interval_minutes=60,
        misfire_policy="skip",
        catchup_window_seconds=600,
        next_run_at=db_now() - timedelta(minutes=20),
    )
    failing = make_schedule("alert-failing", alert_after_failures=2, next_run_at=later)
    finished_run(failing, "succeeded", 30)
    finished_run(failing, "failed", 20)
    overdue = make_schedule("alert-overdue", alert_after_seconds=30, next_run_at=later)
    overdue_run = ScheduledRun.objects.create(
        schedule=overdue,
        trigger="manual",
        scheduled_for=db_now() - timedelta(minutes=5),
        status="running",
        started_at=db_now() - timedelta(minutes=5),
    )
    with Receiver(fail=1) as receiver:
        env = process_env(
            ALERT_WEBHOOK_URLS=receiver.url,
            ALERT_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",  # the receiver is on loopback: refused otherwise
            ALERT_EVALUATE_EVERY_SECONDS="0.5",
            ALERT_RETRY_BASE_SECONDS="0.2",
            WORKER_REAPER_INTERVAL_SECONDS="3600",  # the hand-made running row is not a lost run
        )
        procs = Processes(env, tmp_path)
        try:
            procs.start("--interval", "1", "--claimant", "sched-a")
            procs.start("--interval", "1", "--claimant", "sched-b")

            def opened(s: Schedule, kind: str) -> bool:
                alert = alert_of(s)
                return alert is not None and alert.kind == kind and alert.notified_open_at is not None

            wait_for(lambda: opened(missed, "missed"), timeout=60, what=f"missed alert\n{procs.logs()}")
            wait_for(lambda: opened(overdue, "overdue"), timeout=30, what="overdue alert")
            assert alert_of(failing) is None, "one failure of two is not failing yet"
            finished_run(failing, "failed", 10)
            wait_for(lambda: opened(failing, "failing"), timeout=30, what="failing alert")
            wait_for(
                lambda: len(receiver.bodies) == 3,
                timeout=30,
                what=f"three open notifications {receiver.attempts} {receiver.events()}\n{procs.logs()}",
            )

            # Clear each condition: the missed schedule's next slot is due now and dispatched on time,
            # the failing one succeeds, the overdue run finishes.
            sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [missed.pk])
            finished_run(failing, "succeeded", 0)
            ScheduledRun.objects.filter(pk=overdue_run.pk).update(status="succeeded", finished_at=db_now())
            wait_for(
                lambda: len(receiver.bodies) == 6, timeout=60, what=f"resolved notifications\n{procs.logs()}"
            )

            # Both schedulers keep evaluating for a while: nothing is opened or sent again.
            ticks = int(redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "ticks"))
            wait_for(
                lambda: int(redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "ticks")) >= ticks + 8,
                timeout=60,
                what="more scheduler passes",
            )
            logs = procs.full_logs()
        finally:
            procs.stop_all()

    for schedule, kind in ((missed, "missed"), (failing, "failing"), (overdue, "overdue")):
        alerts = list(Alert.objects.filter(schedule=schedule))
        assert [a.kind for a in alerts] == [kind], (schedule.name, alerts)
        assert alerts[0].resolved_at is not None
        assert alerts[0].notified_resolved_at is not None
    assert receiver.events() == sorted(
        (name, kind, event)
        for name, kind in (
            ("alert-missed", "missed"),
            ("alert-failing", "failing"),
            ("alert-overdue", "overdue"),
        )
        for event in ("alert.open", "alert.resolved")
    )
    assert receiver.attempts == 7, "the first POST failed and was retried: 6 notifications, 7 attempts"
    failing_open = next(
        b for b in receiver.bodies if b["alert"]["kind"] == "failing" and b["event"] == "alert.open"
    )
    assert "alert-failing" in failing_open["text"]
    assert "2 consecutive failed runs" in failing_open["text"]
    assert failing_open["alert"]["details"]["consecutive_failures"] == 2
    # Both instances ran (and evaluated); the webhook's token never reached a log line.
    assert "sched-a" in logs
    assert "sched-b" in logs
    assert "alert webhook failed" in logs
    assert TOKEN not in logs
    assert "/hooks/" not in logs


@pytest.mark.django_db
def test_alerts_api_lists_and_filters(api):
    a = make_schedule("api-a", next_run_at=db_now() + timedelta(days=1))
    b = make_schedule("api-b", next_run_at=db_now() + timedelta(days=1))
    open_missed = Alert.objects.create(schedule=a, kind="missed", details={"reason": "not dispatched"})
    resolved = Alert.objects.create(schedule=a, kind="failing", resolved_at=db_now())
    open_overdue = Alert.objects.create(schedule=b, kind="overdue")

    def ids(query: str) -> list[int]:
        response = api.get(f"/api/alerts/{query}")
        assert response.status_code == 200, response.content
        return sorted(row["id"] for row in response.json()["results"])

    assert ids("") == sorted([open_missed.pk, resolved.pk, open_overdue.pk])
    assert ids("?open=true") == sorted([open_missed.pk, open_overdue.pk])
    assert ids("?open=false") == [resolved.pk]
    assert ids(f"?schedule={a.pk}") == sorted([open_missed.pk, resolved.pk])
    assert ids(f"?schedule={a.pk}&kind=missed&open=true") == [open_missed.pk]
    row = api.get("/api/alerts?kind=overdue").json()["results"][0]
    assert row["schedule_name"] == "api-b"
    assert row["open"] is True
    for query, field in (("?open=maybe", "open"), ("?schedule=x", "schedule"), ("?kind=late", "kind")):
        response = api.get(f"/api/alerts/{query}")
        assert response.status_code == 400, query
        assert field in response.json(), query
    assert api.post("/api/alerts/", {}, format="json").status_code == 405


@pytest.mark.django_db(transaction=True)
def test_concurrent_evaluations_open_one_alert_and_claim_each_transition_once(settings):
    """The database's guarantee, without the Redis turn: evaluations racing on two connections."""
    from django.db import connection

    from monitoring import alerts

    settings.ALERT_WEBHOOK_URLS = []  # delivered to nobody; only the claims are counted
    schedules = [
        make_schedule(f"race-{i}", misfire_policy="skip", next_run_at=db_now() - timedelta(hours=2))
        for i in range(40)
    ]
    results: list[alerts.Evaluation] = []
    barrier = threading.Barrier(4)

    def evaluate() -> None:
        try:
            barrier.wait()
            results.append(alerts.evaluate(grace=60))
        finally:
            connection.close()

    threads = [threading.Thread(target=evaluate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 4
    assert Alert.objects.filter(kind="missed").count() == len(schedules)
    assert sum(r.opened for r in results) == len(schedules)
    assert sum(r.claimed for r in results) == len(schedules), "each open claimed by exactly one"
    assert alerts.sender().drain(30)
    assert not Alert.objects.filter(notified_open_at__isnull=True).exists()
