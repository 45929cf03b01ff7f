"""Retries against PostgreSQL (schedules/retries.py): a failed attempt puts the same run and slot back
to `queued` with `retry_at`; the start gate and the outbox sweep wait for it; each attempt is recorded
and shown; the API refuses a bad policy naming the key. The real processes (a worker failing twice,
SIGKILLs during a backoff) are in tests/acceptance/test_retries.py and tests/chaos/test_retry_faults.py.
"""

from __future__ import annotations

import pytest
from django.test import override_settings

from orchestrator.models import Job, Run, RunAttempt, RunStatus
from schedules import runstate
from schedules.dispatch import run_now
from schedules.models import ScheduleChange, ScheduledRun
from schedules.publishing import sweep_outbox
from tests.scheduler_support import make_schedule, sql

pytestmark = pytest.mark.django_db

POLICY = {
    "max_attempts": 3,
    "initial_interval_seconds": 30,
    "backoff_coefficient": 2,
    "max_interval_seconds": 45,
}


def _start_and_fail(sr: ScheduledRun, attempt: int, summary: str = "ValueError") -> None:
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) == attempt
    assert runstate.run_finish(sr.run_id, sr.pk, status="failed", error_summary=summary, attempt=attempt)


def _due_now(run_id: int) -> None:
    # Aged, not waited for (the test's transaction holds now() still): the retry is due, and the slot
    # is older than the sweep's grace.
    sql("UPDATE orchestrator_run SET retry_at = now() - interval '1 second' WHERE id = %s", [run_id])
    sql(
        "UPDATE schedules_scheduledrun SET created_at = now() - interval '1 minute' WHERE run_id = %s",
        [run_id],
    )


def _seconds_until_retry(run_id: int) -> float:
    (row,) = sql("SELECT EXTRACT(EPOCH FROM retry_at - now()) FROM orchestrator_run WHERE id = %s", [run_id])
    return float(row[0])


def test_failed_attempt__requeues_the_same_run_and_slot_after_the_backoff(redis_client):
    schedule = make_schedule("retry-me", enabled=False, retry_policy=POLICY)
    sr = run_now(schedule)
    _start_and_fail(sr, 1)

    run, sr = Run.objects.get(pk=sr.run_id), ScheduledRun.objects.get(pk=sr.pk)
    assert (run.status, sr.status, run.attempt) == (RunStatus.QUEUED, "queued", 1)
    assert run.finished_at is None
    assert sr.finished_at is None
    assert sr.error_summary.startswith("attempt 1 of 3 failed, retry in 30s: ValueError")
    assert 25 < _seconds_until_retry(run.pk) <= 30
    assert list(RunAttempt.objects.values_list("attempt", "outcome", "error_summary")) == [
        (1, "failed", "ValueError")
    ]
    assert ScheduledRun.objects.filter(schedule=schedule).count() == 1

    # Before retry_at the start gate refuses it, and the sweep leaves it alone.
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:2", lease_seq=None) is None
    assert sweep_outbox(grace=0, republish_after=3600).published == 0

    _due_now(run.pk)
    assert sweep_outbox(grace=0, republish_after=3600).published == 1
    _start_and_fail(sr, 2, "worker lost (lease of 4s expired)")
    assert 40 < _seconds_until_retry(run.pk) <= 45  # min(30 * 2, 45)

    _due_now(run.pk)
    _start_and_fail(sr, 3, "timed out after 2s (Job.timeout_seconds; soft time limit)")
    run, sr = Run.objects.get(pk=sr.run_id), ScheduledRun.objects.get(pk=sr.pk)
    # The last attempt's failure is the run's.
    assert (run.status, sr.status, run.attempt) == ("failed", "failed", 3)
    assert (
        sr.error_summary == run.error_summary == "timed out after 2s (Job.timeout_seconds; soft time limit)"
    )
    assert list(RunAttempt.objects.filter(run=run).values_list("attempt", "outcome")) == [
        (1, "failed"),
        (2, "worker_lost"),
        (3, "timed_out"),
    ]
    # Counted once, at its end, by the metrics' totals (a failed attempt never passes through `failed`).
    assert sql("SELECT status, sum(runs) FROM monitoring_runtotal GROUP BY 1") == [("failed", 1)]
    assert sql("SELECT status, sum(slots) FROM monitoring_slottotal GROUP BY 1") == [("failed", 1)]


def test_retry_on__an_outcome_not_listed_ends_the_run(redis_client):
    schedule = make_schedule(
        "no-retry-on-lost", enabled=False, retry_policy={**POLICY, "retry_on": ["failed"]}
    )
    sr = run_now(schedule)
    _start_and_fail(sr, 1, "worker lost (lease of 4s expired)")
    assert Run.objects.get(pk=sr.run_id).status == "failed"
    assert ScheduledRun.objects.get(pk=sr.pk).status == "failed"


def test_no_policy__one_attempt_and_no_attempt_rows(redis_client):
    sr = run_now(make_schedule("plain", enabled=False))
    _start_and_fail(sr, 1)
    assert Run.objects.get(pk=sr.run_id).status == "failed"
    assert not RunAttempt.objects.exists()


def test_job_policy__applies_unless_the_schedule_overrides_it(redis_client):
    Job.objects.filter(key="sleep").update(retry_policy={"max_attempts": 2, "initial_interval_seconds": 0})
    inherits = run_now(make_schedule("inherits", enabled=False))
    overrides = run_now(make_schedule("overrides", enabled=False, retry_policy={"max_attempts": 1}))
    _start_and_fail(inherits, 1)
    _start_and_fail(overrides, 1)
    assert Run.objects.get(pk=inherits.run_id).status == "queued"
    assert Run.objects.get(pk=overrides.run_id).status == "failed"
    # A zero interval: the next attempt may start at once.
    assert runstate.run_start(inherits.run_id, inherits.pk, worker="w@h:1", lease_seq=None) == 2


def test_success_after_a_retry__history_and_run_show_every_attempt(api, redis_client):
    schedule = make_schedule("shown", enabled=False, retry_policy=POLICY)
    sr = run_now(schedule)
    _start_and_fail(sr, 1)
    _due_now(sr.run_id)

    history = api.get(f"/api/schedules/{schedule.pk}/history").json()["results"][0]
    assert history["status"] == "queued"
    assert history["attempt"] == 1
    assert history["retry_at"] is not None
    assert [a["outcome"] for a in history["attempts"]] == ["failed"]

    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) == 2
    running = api.get(f"/api/runs/{sr.run_id}/").json()
    assert [(a["attempt"], a["outcome"]) for a in running["attempts"]] == [(1, "failed"), (2, "running")]

    assert runstate.run_finish(sr.run_id, sr.pk, status="succeeded", attempt=2)
    run = api.get(f"/api/runs/{sr.run_id}/").json()
    assert (run["status"], run["attempt"]) == ("succeeded", 2)
    assert [(a["attempt"], a["outcome"], a["error_summary"]) for a in run["attempts"]] == [
        (1, "failed", "ValueError"),
        (2, "succeeded", ""),
    ]
    assert all(a["started_at"] and a["finished_at"] for a in run["attempts"])
    history = api.get(f"/api/schedules/{schedule.pk}/history").json()["results"][0]
    assert history["status"] == "succeeded"
    assert history["attempts"] == run["attempts"]


def test_a_run_of_one_attempt__shows_that_attempt(api, redis_client):
    sr = run_now(make_schedule("single", enabled=False))
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) == 1
    assert runstate.run_finish(sr.run_id, sr.pk, status="succeeded", attempt=1)
    attempts = api.get(f"/api/runs/{sr.run_id}/").json()["attempts"]
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "succeeded")]


def test_cancel_while_waiting_to_retry__ends_the_run(redis_client):
    sr = run_now(make_schedule("cancel-waiting", enabled=False, retry_policy=POLICY))
    _start_and_fail(sr, 1)
    assert runstate.run_cancel([sr.run_id], "cancelled: test") == [sr.run_id]
    assert ScheduledRun.objects.get(pk=sr.pk).status == "cancelled"
    _due_now(sr.run_id)
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) is None


def _create(api, **fields):
    body = {
        "name": "api-retry",
        "job_key": "sleep",
        "schedule_type": "interval",
        "interval_minutes": 5,
        **fields,
    }
    return api.post("/api/schedules/", body, format="json")


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": "3"}, "max_attempts"),
        ({"initial_interval_seconds": -1}, "initial_interval_seconds"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"max_interval_seconds": 10**9}, "max_interval_seconds"),
        ({"retry_on": ["exploded"]}, "retry_on"),
        ({"attempts": 3}, "attempts"),
    ],
)
def test_api__a_bad_policy_is_a_400_naming_the_key_and_nothing_is_written(api, policy, key):
    response = _create(api, retry_policy=policy)
    assert response.status_code == 400, response.content
    assert list(response.json()["retry_policy"]) == [key]
    assert not ScheduleChange.objects.exists()

    job = api.patch("/api/jobs/sleep/", {"retry_policy": policy}, format="json")
    assert job.status_code == 400
    assert list(job.json()["retry_policy"]) == [key]
    assert Job.objects.get(key="sleep").retry_policy == {}


def test_api__not_an_object_is_a_400(api):
    response = _create(api, retry_policy=[3])
    assert response.status_code == 400
    assert "retry_policy" in response.json()


def test_api__policy_is_stored_complete_shown_and_recorded_in_the_change_history(api):
    response = _create(api, retry_policy={"max_attempts": 3})
    assert response.status_code == 201, response.content
    schedule = response.json()
    assert schedule["retry_policy"] == {
        "max_attempts": 3,
        "initial_interval_seconds": 10,
        "backoff_coefficient": 2.0,
        "max_interval_seconds": 600,
        "retry_on": ["failed", "timed_out", "worker_lost"],
    }
    patched = api.patch(f"/api/schedules/{schedule['id']}/", {"retry_policy": None}, format="json")
    assert patched.status_code == 200
    assert patched.json()["retry_policy"] is None
    change = ScheduleChange.objects.filter(schedule_id=schedule["id"], action="update").get()
    assert change.changes["retry_policy"]["old"]["max_attempts"] == 3
    assert change.changes["retry_policy"]["new"] is None

    job = api.patch(
        "/api/jobs/sleep/", {"retry_policy": {"max_attempts": 2, "retry_on": ["worker_lost"]}}, format="json"
    )
    assert job.status_code == 200
    assert job.json()["retry_policy"]["retry_on"] == ["worker_lost"]
    assert Job.objects.get(key="sleep").retry_policy["max_attempts"] == 2


def test_dashboard__schedule_page_shows_the_policy_and_each_attempt(staff, redis_client):
    from django.urls import reverse

    schedule = make_schedule("dash-retry", enabled=False, retry_policy=POLICY)
    sr = run_now(schedule)
    _start_and_fail(sr, 1, "task attempt failed: RuntimeError")
    page = staff.get(reverse("dashboard:schedule", args=[schedule.pk])).content.decode()
    assert "up to 3 attempts, 30 s then x2 (at most 45 s), on failed, timed_out, worker_lost" in page
    assert "#1 failed" in page
    assert "retry at" in page
    plain = make_schedule("dash-plain", enabled=False)
    assert (
        "no retry (the job&#x27;s policy)"
        in staff.get(reverse("dashboard:schedule", args=[plain.pk])).content.decode()
    )

    _due_now(sr.run_id)
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:9", lease_seq=None) == 2
    run_page = staff.get(reverse("dashboard:run", args=[sr.run_id])).content.decode()
    assert "<h2>Attempts</h2>" in run_page
    assert "task attempt failed: RuntimeError" in run_page
    assert "w@h:9" in run_page


@override_settings(METRICS_BASIC_AUTH="prometheus:s3cret-scrape", DEBUG=False, METRICS_MAX_AGE_SECONDS=0)
def test_metrics__a_run_waiting_to_retry_counts_until_its_next_attempt_starts(api, redis_client):
    from tests.integration.test_metrics import families, scrape

    def retrying() -> float:
        found = families(scrape(api)[1])["cb_runs_waiting_to_retry"]
        return sum(s.value for s in found.samples if s.labels["job"] == "sleep")

    sr = run_now(make_schedule("metric-retry", enabled=False, retry_policy=POLICY))
    assert retrying() == 0
    _start_and_fail(sr, 1)
    assert retrying() == 1
    _due_now(sr.run_id)
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) == 2
    assert retrying() == 0


def test_admin__policies_are_checked_naming_the_key_and_a_run_lists_its_attempts(staff, redis_client):
    from schedules.models import Schedule
    from tests.support import admin_schedule_form

    job = Job.objects.get(key="sleep")
    url = f"/admin/orchestrator/job/{job.pk}/change/"
    data = {
        "name": job.name,
        "enabled": "on",
        "timeout_seconds": "60",
        "task3_allowlist": "[]",
        "_save": "Save",
    }
    refused = staff.post(url, {**data, "retry_policy": '{"max_attempts": 0}'})
    assert refused.status_code == 200
    assert "max_attempts: Must be an integer from 1" in refused.content.decode()
    assert Job.objects.get(pk=job.pk).retry_policy == {}
    assert staff.post(url, {**data, "retry_policy": '{"max_attempts": 2}'}).status_code == 302
    assert Job.objects.get(pk=job.pk).retry_policy["max_attempts"] == 2
    assert staff.post(url, {**data, "retry_policy": ""}).status_code == 302  # blank: one attempt
    assert Job.objects.get(pk=job.pk).retry_policy == {}

    form = admin_schedule_form(retry_policy='{"backoff_coefficient": 0}')
    refused = staff.post("/admin/schedules/schedule/add/", form)
    assert refused.status_code == 200
    assert "backoff_coefficient: Must be a number from 1" in refused.content.decode()
    assert not Schedule.objects.exists()
    saved = staff.post(
        "/admin/schedules/schedule/add/", admin_schedule_form(retry_policy='{"max_attempts": 3}')
    )
    assert saved.status_code == 302
    assert Schedule.objects.get(name="admin-made").retry_policy == {"max_attempts": 3}

    sr = run_now(make_schedule("admin-retry", enabled=False, retry_policy=POLICY))
    _start_and_fail(sr, 1, "task attempt failed: RuntimeError")
    page = staff.get(f"/admin/orchestrator/run/{sr.run_id}/change/").content.decode()
    assert "#1 failed" in page
    assert "task attempt failed: RuntimeError" in page


def test_worker_lost_from_the_parent__fenced_by_worker_is_retried_too(redis_client):
    """The worker's parent ends a dead pool process's run fenced by `worker`, not knowing the attempt or
    the scheduled run (worker/parent.py): the retry finds both itself."""
    sr = run_now(make_schedule("parent-lost", enabled=False, retry_policy=POLICY))
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:7", lease_seq=None) == 1
    assert not runstate.run_finish(
        sr.run_id, None, status="failed", error_summary="worker lost (x)", worker="w@h:8"
    )
    assert runstate.run_finish(
        sr.run_id, None, status="failed", error_summary="worker lost (signal 9)", worker="w@h:7"
    )
    assert ScheduledRun.objects.get(pk=sr.pk).status == "queued"
    assert list(RunAttempt.objects.values_list("attempt", "outcome", "worker")) == [
        (1, "worker_lost", "w@h:7")
    ]


@pytest.mark.django_db(transaction=True)
def test_failing_alert_and_pause_after_failures__count_a_retried_slot_once_after_its_last_attempt(
    settings, redis_client
):
    """With alert_after_failures 1 and pause_after_failures 1, a slot whose first attempt failed and waits
    to retry opens no alert and pauses nothing; its last attempt failing does both, once."""
    from monitoring import alerts
    from schedules.models import Alert, Schedule

    settings.ALERT_WEBHOOK_URLS = []
    schedule = make_schedule(
        "alert-once", enabled=True, alert_after_failures=1, pause_after_failures=1, retry_policy=POLICY
    )
    sr = run_now(schedule)
    try:
        _start_and_fail(sr, 1)
        _due_now(sr.run_id)
        _start_and_fail(sr, 2)
        alerts.evaluate(grace=3600)
        assert not Alert.objects.filter(schedule=schedule).exists()
        assert Schedule.objects.get(pk=schedule.pk).enabled

        _due_now(sr.run_id)
        _start_and_fail(sr, 3)
        alerts.evaluate(grace=3600)
        alerts.evaluate(grace=3600)
        (alert,) = Alert.objects.filter(schedule=schedule)
        assert (alert.kind, alert.details["consecutive_failures"]) == ("failing", 1)
        assert not Schedule.objects.get(pk=schedule.pk).enabled
    finally:
        assert alerts.sender().drain(timeout=30)


def test_an_early_copy_of_its_message_finding_a_cap_full__leaves_the_retry_wait_as_it_is(redis_client):
    """A copy of the run's message delivered during the backoff (an old re-publish) that finds its cap
    full is parked by the worker; it must not turn the waiting retry into a `throttled` wait, which the
    outbox sweep would then leave alone at retry_at."""
    sr = run_now(make_schedule("early-copy", enabled=False, retry_policy=POLICY))
    _start_and_fail(sr, 1)
    runstate.run_mark_throttled(sr.run_id, sr.pk, "waiting: per-job cap 1 reached")
    run, sr = Run.objects.get(pk=sr.run_id), ScheduledRun.objects.get(pk=sr.pk)
    assert (run.waiting_since, sr.status) == (None, "queued")
    _due_now(run.pk)
    assert sweep_outbox(grace=0, republish_after=3600).published == 1


def test_a_running_run_asked_to_cancel__fails_into_cancelled_and_is_never_retried(redis_client):
    # The cancel's SIGTERM makes the attempt fail: that failure is the cancel, not a reason to retry.
    schedule = make_schedule("cancel-not-retried", enabled=False, retry_policy=POLICY)
    sr = run_now(schedule)
    assert runstate.run_start(sr.run_id, sr.pk, worker="w@h:1", lease_seq=None) == 1
    sql(
        "UPDATE orchestrator_run SET cancel_requested_at = now(), cancelled_by = 'ops' WHERE id = %s",
        [sr.run_id],
    )
    assert runstate.run_finish(sr.run_id, sr.pk, status="failed", error_summary="SIGTERM", attempt=1)

    run, sr = Run.objects.get(pk=sr.run_id), ScheduledRun.objects.get(pk=sr.pk)
    assert (run.status, sr.status, run.retry_at) == (RunStatus.CANCELLED, "cancelled", None)
    assert run.error_summary == "cancelled by ops"
