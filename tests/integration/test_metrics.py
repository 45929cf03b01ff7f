"""GET /metrics: its own auth, every series after a real run (a scheduler and a worker process), the
served-from-cache path, and the run's JSON log lines across both processes (LOG_FORMAT=json)."""

from __future__ import annotations

import base64
import gzip
import json
import time
from datetime import timedelta

import pytest
from django.test import Client, override_settings
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from orchestrator.models import Run
from project.logging import RUN_FIELDS
from schedules.models import ScheduledRun
from tests.scheduler_support import Processes, db_now, make_schedule
from tests.support import process_env, wait_for
from tests.workerproc import start_run_worker

BASIC = "Basic " + base64.b64encode(b"prometheus:s3cret-scrape").decode()


def scrape(client, **headers) -> tuple[int, str]:
    response = client.get("/metrics", **headers)
    return response.status_code, response.content.decode(errors="replace")


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


@pytest.mark.django_db
@override_settings(METRICS_BASIC_AUTH="prometheus:s3cret-scrape", DEBUG=False, METRICS_MAX_AGE_SECONDS=0)
def test_metrics_needs_its_basic_auth_or_an_api_token(anon, api, redis_client):
    assert anon.get("/metrics").status_code == 401
    wrong = "Basic " + base64.b64encode(b"prometheus:guess").decode()
    assert anon.get("/metrics", HTTP_AUTHORIZATION=wrong).status_code == 401
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Basic !!notbase64").status_code == 401
    status, text = scrape(Client(), HTTP_AUTHORIZATION=BASIC)
    assert status == 200
    assert "cb_runs_total" in text
    assert api.get("/metrics").status_code == 200
    # Prometheus asks for gzip and gets it; the body is the same exposition.
    response = Client().get("/metrics", HTTP_AUTHORIZATION=BASIC, HTTP_ACCEPT_ENCODING="gzip")
    assert response["Content-Encoding"] == "gzip"
    assert b"cb_scheduler_ticks_total" in gzip.decompress(response.content)


@pytest.mark.django_db
@pytest.mark.parametrize(("debug", "expected"), [(False, 401), (True, 200)])
def test_metrics_without_basic_auth_is_open_only_with_debug(anon, redis_client, debug, expected):
    with override_settings(METRICS_BASIC_AUTH="", DEBUG=debug, METRICS_MAX_AGE_SECONDS=0):
        assert anon.get("/metrics").status_code == expected


@pytest.mark.django_db(transaction=True)  # the rebuild thread reads with its own connection
def test_scrapes_are_served_from_the_last_build_and_a_stale_one_is_rebuilt_in_the_background(
    api, redis_client
):
    with override_settings(METRICS_MAX_AGE_SECONDS=60):
        make_schedule("cached-1", next_run_at=db_now() + timedelta(hours=1))
        assert 'schedule="cached-1"' in scrape(api)[1]
        make_schedule("cached-2", next_run_at=db_now() + timedelta(hours=1))
        assert 'schedule="cached-2"' not in scrape(api)[1], "served from the build, not rebuilt"
        redis_client.hset(metrics.EXPOSITION_KEY, "built_at", time.time() - 120)
        assert 'schedule="cached-2"' not in scrape(api)[1], "a stale build is still served at once"
        wait_for(lambda: 'schedule="cached-2"' in scrape(api)[1], timeout=30, what="background rebuild")


def json_lines(text: str) -> list[dict]:
    """Every log line as JSON; the only other lines allowed are Celery's start-up banner."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_run_shows_in_every_series_and_in_json_logs_of_scheduler_and_worker(
    api, redis_client, tmp_path
):
    ok = make_schedule("metrics-ok", custom_directive_text="0.1", next_run_at=db_now())
    # Its slots (every 10 min) all missed, the latest 5 min ago, misfire_policy skip: recorded as skipped.
    make_schedule("metrics-skip", misfire_policy="skip", next_run_at=db_now() - timedelta(minutes=65))
    env = {"LOG_FORMAT": "json", "ALERT_EVALUATE_EVERY_SECONDS": "1"}
    worker = start_run_worker(tmp_path=tmp_path, env=env)
    procs = Processes(process_env(**env), tmp_path)
    try:
        procs.start("--interval", "2")
        run = wait_for(
            lambda: Run.objects.filter(scheduled_runs__schedule=ok, status="succeeded").first(),
            timeout=90,
            what=f"the scheduled run to succeed\n{procs.logs()}\n{worker.log()[-3000:]}",
        )
        wait_for(lambda: ScheduledRun.objects.filter(status="skipped").exists(), timeout=30, what="skip")
        wait_for(lambda: redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "claimed"), timeout=30)
        with override_settings(METRICS_MAX_AGE_SECONDS=0):
            status, text = scrape(api)
        scheduler_log = procs.full_logs()
        worker_log = worker.log()
    finally:
        procs.stop_all()
        worker.stop()
    assert status == 200
    found = families(text)

    def sample(family: str, name: str | None = None, **labels):
        samples = [s for s in found[family].samples if s.name == (name or family)]
        return next((s for s in samples if all(s.labels.get(k) == v for k, v in labels.items())), None)

    assert sample("cb_runs", "cb_runs_total", job="sleep", trigger="schedule", status="succeeded").value == 1
    assert sample("cb_run_duration_seconds", "cb_run_duration_seconds_count", job="sleep").value == 1
    assert sample("cb_run_duration_seconds", "cb_run_duration_seconds_bucket", job="sleep", le="+Inf")
    assert sample("cb_dispatch_lag_seconds", "cb_dispatch_lag_seconds_count").value == 1
    assert sample("cb_start_lag_seconds", "cb_start_lag_seconds_count").value == 1
    assert sample("cb_runs_waiting", job="sleep").value == 0
    assert sample("cb_cap_in_use", cap="global").value == 0
    assert sample("cb_cap_limit", cap="global").value >= 1
    assert sample("cb_slots_skipped", "cb_slots_skipped_total", reason="missed").value == 1
    assert sample("cb_schedule_next_run_timestamp_seconds", schedule="metrics-ok").value > time.time()
    last = sample("cb_schedule_last_success_timestamp_seconds", schedule="metrics-ok").value
    assert abs(last - run.finished_at.timestamp()) < 1
    assert sample("cb_schedule_last_success_timestamp_seconds", schedule="metrics-skip") is None
    assert sample("cb_scheduler_instances").value == 1
    assert sample("cb_scheduler_ticks", "cb_scheduler_ticks_total").value >= 1
    assert sample("cb_scheduler_claims", "cb_scheduler_claims_total").value >= 2

    # LOG_FORMAT=json: one object per line, and the run followed from the scheduler to the worker.
    for log in (scheduler_log, worker_log):
        assert json_lines(log), log[-2000:]
    expected = {
        "run_id": run.pk,
        "scheduled_run_id": ScheduledRun.objects.get(run=run).pk,
        "schedule_id": ok.pk,
        "job": "sleep",
        "task_id": run.task_id,
    }
    dispatched = [r for r in json_lines(scheduler_log) if r["message"] == "slot dispatched"]
    assert any({k: r.get(k) for k in RUN_FIELDS} == expected for r in dispatched), dispatched
    about_run = [r for r in json_lines(worker_log) if r.get("run_id") == run.pk]
    messages = {r["message"] for r in about_run}
    assert {"run started", "run succeeded"} <= messages, messages
    for record in about_run:
        assert {k: record.get(k) for k in RUN_FIELDS} == expected, record


@pytest.mark.django_db
@override_settings(METRICS_MAX_AGE_SECONDS=0)
def test_schedule_names_are_escaped_in_the_labels_postgresql_renders(api, redis_client):
    name = 'we"ird \\ name\nwith a newline'
    make_schedule(name, next_run_at=db_now() + timedelta(hours=1))
    found = families(scrape(api)[1])
    labels = [s.labels["schedule"] for s in found["cb_schedule_next_run_timestamp_seconds"].samples]
    assert name in labels


@pytest.mark.django_db
@override_settings(METRICS_MAX_AGE_SECONDS=0)
def test_a_run_waiting_for_a_slot_counts_in_runs_waiting_until_it_starts(api, redis_client):
    from orchestrator.models import Job
    from orchestrator.services import OrchestratorService
    from schedules import runstate

    def waiting() -> float:
        found = families(scrape(api)[1])
        return next(s.value for s in found["cb_runs_waiting"].samples if s.labels["job"] == "sleep")

    run = OrchestratorService.launch(
        job=Job.objects.get(key="sleep"), trigger="manual", task3_scope="allowlist"
    )
    assert waiting() == 0
    runstate.run_mark_throttled(run.pk, None, "waiting: global cap 1/1")
    assert waiting() == 1
    runstate.run_start(run.pk, None, worker="w@h:1", lease_seq=1)
    assert waiting() == 0


@pytest.mark.django_db
@override_settings(METRICS_MAX_AGE_SECONDS=0)
def test_runs_parked_behind_a_rate_limit_count_once_each_and_show_waiting(api, redis_client):
    from datetime import UTC, datetime

    from orchestrator.models import Job
    from orchestrator.rates import RateLimit
    from worker.ratelimit import ratelimit_take

    Job.objects.filter(key="sleep").update(rate_limit="1/h")

    def series() -> tuple[float, float]:
        found = families(scrape(api)[1])
        limited = next(s.value for s in found["cb_rate_limited"].samples if s.labels["job"] == "sleep")
        waiting = next(s.value for s in found["cb_rate_limit_waiting"].samples if s.labels["job"] == "sleep")
        return limited, waiting

    assert series() == (0, 0)
    due = datetime(2026, 1, 1, tzinfo=UTC)
    take = {"job_key": "sleep", "due": due, "park": "{}"}
    assert ratelimit_take(RateLimit(1, 3600), member="a", waiter="run:1", **take).admitted
    for waiter in ("run:2", "run:3", "run:2"):  # run 2 woken early, parked again: counted once
        assert not ratelimit_take(RateLimit(1, 3600), member=waiter, waiter=waiter, **take).admitted
    assert series() == (2, 2)
