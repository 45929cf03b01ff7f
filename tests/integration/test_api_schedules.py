"""The schedules REST API (docs/ARCHITECTURE.md, "API conventions"): CRUD, actions, history, validation,
auth, both slash forms."""

from __future__ import annotations

import base64
import itertools
import json
import threading
from datetime import timedelta
from zoneinfo import ZoneInfo

import psycopg2
import pytest
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from orchestrator.models import Directive, Job, Run
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for

pytestmark = pytest.mark.django_db

SEED_BODY = {
    "name": "triage-every-10",
    "job_key": "log_triage",
    "enabled": True,
    "schedule_type": "interval",
    "interval_minutes": 10,
    "timezone": "UTC",
}

RESPONSE_FIELDS = {
    "name",
    "job_key",
    "directive",
    "custom_directive_text",
    "enabled",
    "schedule_type",
    "interval_minutes",
    "cron_expr",
    "timezone",
    "task3_scope",
    "max_global",
    "max_per_job",
    "misfire_policy",
    "overlap_policy",
    "last_run_at",
    "next_run_at",
    "claimed_by",
    "claimed_until",
    "created_at",
    "updated_at",
}


def _dt(value: str):
    return parse_datetime(value)


def _create(api, **overrides):
    body = {**SEED_BODY, **overrides}
    response = api.post("/api/schedules/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


# --- Create and read ----------------------------------------------------------------------------------


def test_create__seed_body_gives_201_with_next_run_and_5_upcoming(api):
    before = timezone.now()
    response = api.post("/api/schedules/", SEED_BODY, format="json")
    after = timezone.now()

    assert response.status_code == 201, response.content
    body = response.json()
    assert RESPONSE_FIELDS <= body.keys()
    assert body["job_key"] == "log_triage"
    assert body["enabled"] is True
    next_run = _dt(body["next_run_at"])
    assert before + timedelta(minutes=10) - timedelta(seconds=1) <= next_run <= after + timedelta(minutes=10)
    upcoming = [_dt(t) for t in body["upcoming"]]
    assert len(upcoming) == 5
    assert upcoming[0] == next_run
    assert all(b - a == timedelta(minutes=10) for a, b in itertools.pairwise(upcoming))
    assert Schedule.objects.get(pk=body["id"]).next_run_at == next_run


def test_create__cron_in_new_york_fires_at_0200_local_so_0600_or_0700_utc(api):
    body = _create(
        api,
        name="ny-nightly",
        schedule_type="cron",
        interval_minutes=None,
        cron_expr="0 2 * * *",
        timezone="America/New_York",
    )
    new_york = ZoneInfo("America/New_York")
    upcoming = [_dt(t) for t in body["upcoming"]]
    assert len(upcoming) == 5
    for t in upcoming:
        local = t.astimezone(new_york)
        assert (local.hour, local.minute) == (2, 0)
        expected_utc_hour = 2 - int(local.utcoffset().total_seconds() // 3600)
        assert t.astimezone(ZoneInfo("UTC")).hour == expected_utc_hour in (6, 7)


def test_create__directive_by_key_or_id(api):
    directive = Directive.objects.create(key="short", name="Short", text="be brief")
    by_key = _create(api, name="a", directive="short")
    by_id = _create(api, name="b", directive=directive.pk)
    assert by_key["directive"] == by_id["directive"] == directive.pk
    assert by_key["directive_key"] == "short"


def test_create__disabled_schedule_still_shows_its_times(api):
    body = _create(api, enabled=False)
    assert body["enabled"] is False
    assert body["next_run_at"] is not None


def test_list_and_retrieve(api):
    created = _create(api)
    listing = api.get("/api/schedules/").json()
    assert listing["count"] == 1
    assert listing["results"][0]["id"] == created["id"]
    detail = api.get(f"/api/schedules/{created['id']}/").json()
    assert detail == created | {"upcoming": detail["upcoming"]}


def test_retrieve__unknown_id_is_404(api):
    assert api.get("/api/schedules/999999/").status_code == 404
    assert api.get("/api/schedules/not-a-number/").status_code == 404


# --- Update -------------------------------------------------------------------------------------------


def test_patch__timing_change_recomputes_next_run(api):
    created = _create(api)
    response = api.patch(f"/api/schedules/{created['id']}/", {"interval_minutes": 60}, format="json")
    assert response.status_code == 200, response.content
    next_run = _dt(response.json()["next_run_at"])
    assert timedelta(minutes=59) < next_run - timezone.now() <= timedelta(minutes=60)


def test_patch__other_fields_keep_next_run(api):
    created = _create(api)
    response = api.patch(
        f"/api/schedules/{created['id']}/", {"max_global": 3, "name": "renamed"}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["next_run_at"] == created["next_run_at"]
    assert response.json()["max_global"] == 3


def test_patch__switching_to_cron_clears_interval(api):
    created = _create(api)
    response = api.patch(
        f"/api/schedules/{created['id']}/",
        {"schedule_type": "cron", "cron_expr": "30 3 * * *"},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["interval_minutes"] is None
    assert _dt(body["next_run_at"]).astimezone(ZoneInfo("UTC")).strftime("%H:%M") == "03:30"


def test_patch__inconsistent_row_is_400_and_nothing_is_written(api):
    created = _create(api)
    response = api.patch(
        f"/api/schedules/{created['id']}/", {"name": "changed", "schedule_type": "cron"}, format="json"
    )
    assert response.status_code == 400
    assert "cron_expr" in response.json()
    row = Schedule.objects.get(pk=created["id"])
    assert (row.name, row.schedule_type, row.interval_minutes) == ("triage-every-10", "interval", 10)


def test_patch__leaves_scheduler_fields_alone(api):
    created = _create(api)
    claimed_until = timezone.now() + timedelta(minutes=2)
    Schedule.objects.filter(pk=created["id"]).update(claimed_by="beat-1", claimed_until=claimed_until)
    assert (
        api.patch(f"/api/schedules/{created['id']}/", {"interval_minutes": 5}, format="json").status_code
        == 200
    )
    row = Schedule.objects.get(pk=created["id"])
    assert (row.claimed_by, row.claimed_until) == ("beat-1", claimed_until)


def test_put_is_not_offered(api):
    created = _create(api)
    assert api.put(f"/api/schedules/{created['id']}/", SEED_BODY, format="json").status_code == 405


# --- Actions ------------------------------------------------------------------------------------------


def test_disable_then_enable__200_and_next_run_computed_from_now(api):
    created = _create(api)
    pk = created["id"]
    disabled = api.post(f"/api/schedules/{pk}/disable")
    assert disabled.status_code == 200
    assert disabled.json()["enabled"] is False
    # While disabled, slots pass: make the stored next run long overdue.
    Schedule.objects.filter(pk=pk).update(next_run_at=timezone.now() - timedelta(hours=5))

    enabled = api.post(f"/api/schedules/{pk}/enable")
    assert enabled.status_code == 200
    assert enabled.json()["enabled"] is True
    next_run = _dt(enabled.json()["next_run_at"])
    assert timedelta(minutes=9) < next_run - timezone.now() <= timedelta(minutes=10)


def test_enable__on_an_enabled_schedule_keeps_its_anchor(api):
    created = _create(api)
    assert api.post(f"/api/schedules/{created['id']}/enable").json()["next_run_at"] == created["next_run_at"]


@pytest.mark.django_db(transaction=True)
def test_run_now__202_with_queued_manual_run_and_message_on_job_queue(api, redis_client):
    created = _create(api)
    response = api.post(f"/api/schedules/{created['id']}/run-now")

    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["trigger"], body["status"], body["schedule"]) == ("manual", "queued", created["id"])
    scheduled_run = ScheduledRun.objects.select_related("run").get(pk=body["id"])
    assert scheduled_run.run.trigger == "manual"
    assert scheduled_run.task_id == scheduled_run.run.task_id == body["task_id"]
    assert body["published_at"] is not None

    raw = wait_for(lambda: redis_client.lrange("jobs.log_triage", 0, -1), timeout=10, what="message on queue")
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "worker.execute_run"
    assert message["headers"]["id"] == body["task_id"]
    _args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {"run_id": body["run"], "scheduled_run_id": body["id"], "job_key": "log_triage"}


@pytest.mark.django_db(transaction=True)
def test_run_now__works_on_a_disabled_schedule(api, redis_client):
    created = _create(api, enabled=False)
    assert api.post(f"/api/schedules/{created['id']}/run-now").status_code == 202
    wait_for(lambda: redis_client.llen("jobs.log_triage") == 1, timeout=10, what="message on queue")


def test_run_now__a_disabled_job_is_refused_as_runs_and_bulk_refuse_it_nothing_run(api, staff, redis_client):
    """A disabled schedule may run now; a schedule of a disabled job may not: the single run-now (API, the
    admin's button, the dashboard's) answers as POST /api/runs/ and a bulk run-now do, naming the job."""
    created = _create(api)
    Job.objects.filter(key="log_triage").update(enabled=False)
    refused = {"job_key": ["Job 'log_triage' is disabled."]}
    assert api.post("/api/runs/", {"job_key": "log_triage"}, format="json").json() == refused

    response = api.post(f"/api/schedules/{created['id']}/run-now")
    assert response.status_code == 400, response.content
    assert response.json() == refused
    bulk = api.post("/api/schedules/bulk", {"action": "run-now", "ids": [created["id"]]}, format="json")
    assert bulk.json()["refused"][0]["reasons"] == refused
    admin = staff.post(f"/admin/schedules/schedule/{created['id']}/run-now/", follow=True)
    assert "Nothing was run: job: Job &#x27;log_triage&#x27; is disabled." in admin.content.decode()
    with_params = staff.post(
        f"/admin/schedules/schedule/{created['id']}/run-now-with-params/", {"params": "{}"}
    )
    assert with_params.context["form"].non_field_errors() == ["Job 'log_triage' is disabled."]
    dashboard = staff.post(f"/dashboard/schedules/{created['id']}/run-now")
    assert (dashboard.status_code, dashboard.json()) == (400, {"job": ["Job 'log_triage' is disabled."]})
    assert not ScheduledRun.objects.exists()
    assert not Run.objects.exists()
    assert redis_client.llen("jobs.log_triage") == 0


def test_history__newest_first_paginated_and_filtered(api):
    created = _create(api)
    schedule = Schedule.objects.get(pk=created["id"])
    now = timezone.now().replace(microsecond=0)
    statuses = ["succeeded", "failed", "skipped", "succeeded", "queued"]
    for i, status in enumerate(statuses):
        ScheduledRun.objects.create(
            schedule=schedule, scheduled_for=now + timedelta(minutes=10 * i), status=status
        )

    history = api.get(f"/api/schedules/{schedule.pk}/history").json()
    assert history["count"] == 5
    times = [_dt(r["scheduled_for"]) for r in history["results"]]
    assert times == sorted(times, reverse=True)
    assert [r["status"] for r in history["results"]] == list(reversed(statuses))

    page = api.get(f"/api/schedules/{schedule.pk}/history/?page=2&page_size=2").json()
    assert page["count"] == 5
    assert [r["status"] for r in page["results"]] == ["skipped", "failed"]
    assert page["next"]
    assert page["previous"]

    succeeded = api.get(f"/api/schedules/{schedule.pk}/history?status=succeeded").json()
    assert succeeded["count"] == 2
    assert {r["status"] for r in succeeded["results"]} == {"succeeded"}


def test_history__unknown_status_is_400(api):
    created = _create(api)
    response = api.get(f"/api/schedules/{created['id']}/history?status=exploded")
    assert response.status_code == 400
    assert "status" in response.json()


@pytest.mark.django_db(transaction=True)
def test_history__lists_the_run_now_run(api, redis_client):
    created = _create(api)
    run_now = api.post(f"/api/schedules/{created['id']}/run-now").json()
    history = api.get(f"/api/schedules/{created['id']}/history").json()
    assert [r["id"] for r in history["results"]] == [run_now["id"]]


@pytest.mark.django_db(transaction=True)
def test_delete__204_history_goes_runs_stay(api, redis_client):
    created = _create(api)
    run_now = api.post(f"/api/schedules/{created['id']}/run-now").json()
    assert api.delete(f"/api/schedules/{created['id']}/").status_code == 204
    assert not Schedule.objects.filter(pk=created["id"]).exists()
    assert not ScheduledRun.objects.filter(pk=run_now["id"]).exists()
    assert Run.objects.filter(pk=run_now["run"]).exists()
    assert api.get(f"/api/schedules/{created['id']}/").status_code == 404


# --- Paths and auth -----------------------------------------------------------------------------------

PATHS = [
    ("get", "/api/schedules/"),
    ("post", "/api/schedules/"),
    ("get", "/api/schedules/{id}/"),
    ("patch", "/api/schedules/{id}/"),
    ("delete", "/api/schedules/{id}/"),
    ("post", "/api/schedules/{id}/run-now/"),
    ("post", "/api/schedules/{id}/enable/"),
    ("post", "/api/schedules/{id}/disable/"),
    ("get", "/api/schedules/{id}/history/"),
]


@pytest.mark.parametrize("slash", [True, False], ids=["slash", "no-slash"])
@pytest.mark.parametrize(("method", "path"), PATHS)
def test_every_path__works_with_and_without_trailing_slash(api, method, path, slash):
    created = _create(api)
    url = path.format(id=created["id"])
    url = url if slash else url.rstrip("/")
    body = {**SEED_BODY, "name": "other"} if method == "post" else {"max_global": 2}
    response = getattr(api, method)(url, body if method in ("post", "patch") else None, format="json")
    assert response.status_code in (200, 201, 202, 204), (url, response.status_code, response.content)


@pytest.mark.parametrize(("method", "path"), PATHS)
def test_every_path__401_without_credentials(api, anon, method, path):
    created = _create(api)
    response = getattr(anon, method)(path.format(id=created["id"]), {}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Token")
    assert Schedule.objects.filter(pk=created["id"], enabled=True).exists()


def test_bad_token__401(api):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert client.get("/api/schedules/").status_code == 401


def test_session_auth__works_for_a_logged_in_user(user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.get("/api/schedules/").status_code == 200


# --- Validation: each rule a 400 naming the field, nothing written ---------------------------------------


def _disabled_job():
    job = Job.objects.get(key="sleep")
    job.enabled = False
    job.save()
    return "sleep"


def _directive():
    return Directive.objects.create(key="d1", name="D1", text="do it").key


INVALID = [
    # (case id, body changes, field the 400 must name)
    ("interval-missing-minutes", {"interval_minutes": None}, "interval_minutes"),
    ("interval-zero-minutes", {"interval_minutes": 0}, "interval_minutes"),
    ("interval-negative-minutes", {"interval_minutes": -5}, "interval_minutes"),
    ("interval-over-a-year", {"interval_minutes": 10**7}, "interval_minutes"),
    ("interval-with-cron", {"cron_expr": "0 2 * * *"}, "cron_expr"),
    ("cron-without-expr", {"schedule_type": "cron", "interval_minutes": None}, "cron_expr"),
    ("cron-blank-expr", {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "   "}, "cron_expr"),
    (
        "cron-bad-minute",
        {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "61 * * * *"},
        "cron_expr",
    ),
    (
        "cron-four-fields",
        {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "0 2 * *"},
        "cron_expr",
    ),
    (
        "cron-six-fields",
        {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "0 0 2 * * *"},
        "cron_expr",
    ),
    (
        "cron-never-fires",
        {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "0 0 30 2 *"},
        "cron_expr",
    ),
    ("cron-with-interval", {"schedule_type": "cron", "cron_expr": "0 2 * * *"}, "interval_minutes"),
    ("unknown-timezone", {"timezone": "Mars/Olympus_Mons"}, "timezone"),
    ("path-timezone", {"timezone": "../../etc/passwd"}, "timezone"),
    ("unknown-job", {"job_key": "no_such_job"}, "job_key"),
    ("disabled-job", {"job_key": _disabled_job}, "job_key"),
    ("directive-and-text", {"directive": _directive, "custom_directive_text": "also this"}, "directive"),
    ("unknown-directive-key", {"directive": "nope"}, "directive"),
    ("unknown-directive-id", {"directive": 987654}, "directive"),
    ("huge-directive-id", {"directive": 10**30}, "directive"),
    ("max-global-zero", {"max_global": 0}, "max_global"),
    ("max-per-job-zero", {"max_per_job": 0}, "max_per_job"),
    ("max-per-job-negative", {"max_per_job": -1}, "max_per_job"),
    ("bad-schedule-type", {"schedule_type": "hourly"}, "schedule_type"),
    ("bad-task3-scope", {"task3_scope": "everything"}, "task3_scope"),
    ("bad-misfire-policy", {"misfire_policy": "yolo"}, "misfire_policy"),
    ("bad-overlap-policy", {"overlap_policy": "queue"}, "overlap_policy"),
    ("missing-name", {"name": None, "_drop": "name"}, "name"),
    ("blank-name", {"name": "  "}, "name"),
    ("long-name", {"name": "x" * 201}, "name"),
    ("missing-job-key", {"_drop": "job_key"}, "job_key"),
    ("missing-schedule-type", {"_drop": "schedule_type"}, "schedule_type"),
    ("null-name", {"name": None}, "name"),
    ("null-job-key", {"job_key": None}, "job_key"),
    ("null-schedule-type", {"schedule_type": None}, "schedule_type"),
    ("null-enabled", {"enabled": None}, "enabled"),
    ("null-timezone", {"timezone": None}, "timezone"),
    ("string-minutes", {"interval_minutes": "ten"}, "interval_minutes"),
    ("float-minutes", {"interval_minutes": 1.5}, "interval_minutes"),
    ("list-minutes", {"interval_minutes": [10]}, "interval_minutes"),
    ("bool-minutes", {"interval_minutes": True}, "interval_minutes"),
    ("object-name", {"name": {"a": 1}}, "name"),
    ("string-enabled", {"enabled": "maybe"}, "enabled"),
    ("bool-directive", {"directive": True}, "directive"),
    ("object-job-key", {"job_key": {"key": "log_triage"}}, "job_key"),
    ("unknown-field", {"interval_minute": 10}, "interval_minute"),
    ("read-only-field", {"next_run_at": "2030-01-01T00:00:00Z"}, "next_run_at"),
]


@pytest.mark.parametrize(("changes", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_create__invalid_input_is_400_naming_the_field(api, changes, field):
    body = dict(SEED_BODY)
    for key, value in changes.items():
        if key == "_drop":
            body.pop(value, None)
        else:
            body[key] = value() if callable(value) else value
    response = api.post("/api/schedules/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not Schedule.objects.exists()


def test_create__duplicate_name_is_400_naming_name(api):
    _create(api)
    response = api.post("/api/schedules/", SEED_BODY, format="json")
    assert response.status_code == 400
    assert "name" in response.json()
    assert Schedule.objects.count() == 1


# A PATCH that switches the type clears the other kind's field (tested above), so these set it explicitly.
PATCH_INVALID = [c for c in INVALID if "_drop" not in c[1] and c[0] != "cron-with-interval"] + [
    (
        "cron-with-explicit-interval",
        {"schedule_type": "cron", "cron_expr": "0 2 * * *", "interval_minutes": 10},
        "interval_minutes",
    ),
    ("interval-with-explicit-cron", {"schedule_type": "interval", "cron_expr": "0 2 * * *"}, "cron_expr"),
]


@pytest.mark.parametrize(
    ("changes", "field"), [c[1:] for c in PATCH_INVALID], ids=[c[0] for c in PATCH_INVALID]
)
def test_patch__invalid_input_is_400_naming_the_field(api, changes, field):
    created = _create(api, name="original")
    body = {k: (v() if callable(v) else v) for k, v in changes.items()}
    response = api.patch(f"/api/schedules/{created['id']}/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Schedule.objects.get(pk=created["id"]).updated_at == _dt(created["updated_at"])


def test_patch__duplicate_name_is_400(api):
    _create(api, name="first")
    second = _create(api, name="second")
    response = api.patch(f"/api/schedules/{second['id']}/", {"name": "first"}, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


def test_patch__schedule_of_a_disabled_job_can_still_be_disabled(api):
    created = _create(api)
    Job.objects.filter(key="log_triage").update(enabled=False)
    response = api.post(f"/api/schedules/{created['id']}/disable")
    assert response.status_code == 200


# --- Malformed bodies: a 4xx, never a 500 -------------------------------------------------------------

BAD_BODIES = [
    ("truncated-json", b'{"name": "x", ', "application/json", 400),
    ("not-json", b"name=x&job_key=log_triage", "application/json", 400),
    ("json-list", b"[1, 2, 3]", "application/json", 400),
    ("json-string", b'"hello"', "application/json", 400),
    ("json-null", b"null", "application/json", 400),
    ("nan", b'{"name": "x", "interval_minutes": NaN}', "application/json", 400),
    ("invalid-utf8", b'{"name": "\xff\xfe"}', "application/json", 400),
    ("deeply-nested", b"[" * 100_000 + b"]" * 100_000, "application/json", 400),
    ("form-encoded", b"name=x", "application/x-www-form-urlencoded", 415),
    ("ten-megabytes", json.dumps({**SEED_BODY, "name": "x" * 10_000_000}).encode(), "application/json", 413),
    (
        "ten-megabyte-directive",
        json.dumps({**SEED_BODY, "custom_directive_text": "x" * 10_000_000}).encode(),
        "application/json",
        413,
    ),
]


@pytest.mark.parametrize(
    ("raw", "content_type", "expected"), [b[1:] for b in BAD_BODIES], ids=[b[0] for b in BAD_BODIES]
)
def test_create__malformed_body_is_4xx(api, raw, content_type, expected):
    response = api.generic("POST", "/api/schedules/", raw, content_type=content_type)
    assert response.status_code == expected, response.content[:500]
    assert not Schedule.objects.exists()


def test_patch__ten_megabyte_body_is_413(api):
    created = _create(api)
    raw = json.dumps({"custom_directive_text": "x" * 10_000_000}).encode()
    response = api.generic("PATCH", f"/api/schedules/{created['id']}/", raw, content_type="application/json")
    assert response.status_code == 413
    assert Schedule.objects.get(pk=created["id"]).custom_directive_text == ""


def test_create__directive_text_over_the_limit_is_400(api):
    response = api.post(
        "/api/schedules/", {**SEED_BODY, "custom_directive_text": "x" * 100_001}, format="json"
    )
    assert response.status_code == 400
    assert "custom_directive_text" in response.json()


# --- A race the validation cannot see: the database decides, the client still gets a 400 ----------------


@pytest.mark.django_db(transaction=True)
def test_create__concurrent_duplicate_name_is_400_by_constraint_name(api):
    job_id = Job.objects.get(key="log_triage").pk
    db = connection.settings_dict
    other = psycopg2.connect(
        dbname=db["NAME"],
        user=db["USER"] or "postgres",
        password=db["PASSWORD"] or "",
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
    )
    result = {}

    def create_through_api() -> None:
        from django.db import connection as thread_connection

        try:
            result["response"] = api.post("/api/schedules/", SEED_BODY, format="json")
        finally:
            thread_connection.close()

    try:
        with other.cursor() as cur:
            # An uncommitted row with the same name: invisible to the API's check, but it holds the
            # unique index entry, so the API's INSERT waits on it and then fails.
            cur.execute(
                """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled,
                       schedule_type, interval_minutes, cron_expr, timezone, task3_scope, misfire_policy,
                       overlap_policy, claimed_by, created_at, updated_at)
                   VALUES (%s, %s, '', true, 'interval', 10, '', 'UTC', 'allowlist', 'run_once',
                           'buffer_one', '', now(), now())""",
                (SEED_BODY["name"], job_id),
            )
            thread = threading.Thread(target=create_through_api)
            thread.start()

            def api_insert_is_waiting() -> bool:
                with connection.cursor() as probe:
                    probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"schedules_schedule\"%%'"
                    )
                    return probe.fetchone()[0] > 0

            wait_for(api_insert_is_waiting, timeout=30, what="the API's INSERT to wait on the other row")
        other.commit()
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        other.close()

    response = result["response"]
    assert response.status_code == 400, response.content
    assert "name" in response.json()
    assert Schedule.objects.count() == 1
