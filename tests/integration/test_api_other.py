"""Jobs, directives, runs, health, schema/docs and create_api_token (docs/ARCHITECTURE.md, "API
conventions")."""

from __future__ import annotations

import base64
import io
import json
import socket
from unittest import mock

import pytest
from django.core.management import call_command
from django.test import override_settings
from rest_framework.test import APIClient

from orchestrator.models import Directive, Job, Run
from schedules.models import Schedule
from tests.support import wait_for

pytestmark = pytest.mark.django_db


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Jobs ---------------------------------------------------------------------------------------------


def test_jobs__list_and_get_by_key(api):
    listing = api.get("/api/jobs").json()
    keys = [job["key"] for job in listing["results"]]
    assert {"log_triage", "sleep"} <= set(keys)
    job = api.get("/api/jobs/log_triage/").json()
    assert job["queue"] == "jobs.log_triage"
    assert set(job) == {
        "key",
        "name",
        "description",
        "enabled",
        "queue",
        "max_concurrency",
        "timeout_seconds",
        "task3_allowlist",
        "rate_limit",
        "retry_policy",
        "params_schema",
    }
    assert api.get("/api/jobs/no_such_job/").status_code == 404


def test_jobs__patch_editable_settings(api):
    changes = {
        "enabled": False,
        "max_concurrency": 2,
        "timeout_seconds": 90,
        "task3_allowlist": ["alice", "10.0.0.5"],
        "name": "Sleepy",
        "description": "naps",
    }
    response = api.patch("/api/jobs/sleep", changes, format="json")
    assert response.status_code == 200, response.content
    job = Job.objects.get(key="sleep")
    assert (job.enabled, job.max_concurrency, job.timeout_seconds, job.task3_allowlist, job.name) == (
        False,
        2,
        90,
        ["alice", "10.0.0.5"],
        "Sleepy",
    )
    assert (
        api.patch("/api/jobs/sleep/", {"max_concurrency": None}, format="json").json()["max_concurrency"]
        is None
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"key": "renamed"}, "key"),
        ({"queue": "elsewhere"}, "queue"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"timeout_seconds": None}, "timeout_seconds"),
        ({"rate_limit": "10"}, "rate_limit"),
        ({"rate_limit": "0/s"}, "rate_limit"),
        ({"rate_limit": "10/d"}, "rate_limit"),
        ({"rate_limit": "10001/h"}, "rate_limit"),
        ({"rate_limit": 5}, "rate_limit"),
        ({"rate_limit": ["5/s"]}, "rate_limit"),
        ({"task3_allowlist": "alice"}, "task3_allowlist"),
        ({"task3_allowlist": {"a": 1}}, "task3_allowlist"),
        ({"task3_allowlist": [""]}, "task3_allowlist"),
        ({"enabled": None}, "enabled"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_jobs__invalid_patch_is_400_naming_the_field(api, changes, field):
    before = Job.objects.get(key="sleep")
    response = api.patch("/api/jobs/sleep/", changes, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    after = Job.objects.get(key="sleep")
    assert (after.key, after.queue, after.max_concurrency, after.timeout_seconds) == (
        before.key,
        before.queue,
        before.max_concurrency,
        before.timeout_seconds,
    )


def test_jobs__rate_limit_is_stored_canonical_and_cleared_by_null_or_blank(api):
    response = api.patch("/api/jobs/sleep/", {"rate_limit": " 10 / m "}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["rate_limit"] == "10/m"
    assert Job.objects.get(key="sleep").rate_limit == "10/m"
    assert api.patch("/api/jobs/sleep/", {"rate_limit": None}, format="json").json()["rate_limit"] is None
    api.patch("/api/jobs/sleep/", {"rate_limit": "1/h"}, format="json")
    assert api.patch("/api/jobs/sleep/", {"rate_limit": ""}, format="json").json()["rate_limit"] is None
    refused = api.patch("/api/jobs/sleep/", {"rate_limit": "5 per second"}, format="json")
    assert refused.json() == {"rate_limit": [mock.ANY]}
    assert "N/s, N/m or N/h" in refused.json()["rate_limit"][0]


def test_jobs__cannot_be_created_or_deleted(api):
    assert api.post("/api/jobs/", {"key": "x", "name": "x"}, format="json").status_code == 405
    assert api.delete("/api/jobs/sleep/").status_code == 405


# --- Directives ---------------------------------------------------------------------------------------


def test_directives__crud(api):
    created = api.post(
        "/api/directives",
        {"key": "brief", "name": "Brief", "text": "be brief", "job_key": "log_triage"},
        format="json",
    )
    assert created.status_code == 201, created.content
    body = created.json()
    assert (body["key"], body["job_key"]) == ("brief", "log_triage")
    pk = body["id"]
    assert api.get("/api/directives/").json()["count"] == 1
    assert api.get(f"/api/directives/{pk}").json()["text"] == "be brief"
    patched = api.patch(f"/api/directives/{pk}/", {"text": "be briefer", "job_key": None}, format="json")
    assert patched.status_code == 200
    assert (patched.json()["text"], patched.json()["job_key"]) == ("be briefer", None)
    assert api.delete(f"/api/directives/{pk}").status_code == 204
    assert not Directive.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"key": "taken", "name": "n", "text": "t"}, "key"),
        ({"key": "not a slug", "name": "n", "text": "t"}, "key"),
        ({"key": "k", "name": "n"}, "text"),
        ({"key": "k", "name": "n", "text": "t", "job_key": "no_such_job"}, "job_key"),
        ({"key": "k", "name": None, "text": "t"}, "name"),
        ({"key": "k", "name": "n", "text": "t", "id": 5}, "id"),
        ({"key": "k", "name": "n", "text": "x" * 100_001}, "text"),
    ],
)
def test_directives__invalid_create_is_400_naming_the_field(api, body, field):
    Directive.objects.create(key="taken", name="Taken", text="t")
    response = api.post("/api/directives/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert Directive.objects.count() == 1


def test_directives__delete_of_one_a_schedule_uses_is_409(api):
    directive = Directive.objects.create(key="used", name="Used", text="t")
    api.post(
        "/api/schedules/",
        {
            "name": "s",
            "job_key": "sleep",
            "schedule_type": "interval",
            "interval_minutes": 5,
            "directive": "used",
        },
        format="json",
    )
    response = api.delete(f"/api/directives/{directive.pk}/")
    assert response.status_code == 409
    assert "s" in response.json()["detail"]
    assert Directive.objects.filter(pk=directive.pk).exists()


# --- Runs ---------------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_runs__post_launches_a_manual_run_and_publishes_it(api, redis_client):
    Directive.objects.create(key="nap", name="Nap", text="sleep 0")
    response = api.post(
        "/api/runs/", {"job_key": "sleep", "directive": "nap", "task3_scope": "all"}, format="json"
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["job_key"], body["trigger"], body["status"], body["task3_scope"]) == (
        "sleep",
        "manual",
        "queued",
        "all",
    )
    assert response["Location"] == f"/api/runs/{body['id']}/"
    raw = wait_for(lambda: redis_client.lrange("jobs.sleep", 0, -1), timeout=10, what="message on jobs.sleep")
    message = json.loads(raw[0])
    assert message["headers"]["id"] == body["task_id"] == Run.objects.get(pk=body["id"]).task_id
    _args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert kwargs == {"run_id": body["id"], "scheduled_run_id": None, "job_key": "sleep"}


def test_runs__post_with_custom_text_and_default_scope(api):
    response = api.post("/api/runs", {"job_key": "sleep", "custom_directive_text": "2"}, format="json")
    assert response.status_code == 202
    run = Run.objects.get(pk=response.json()["id"])
    assert (run.custom_directive_text, run.directive, run.task3_scope) == ("2", None, "allowlist")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "job_key"),
        ({"job_key": "no_such_job"}, "job_key"),
        ({"job_key": "__disabled__"}, "job_key"),
        ({"job_key": "sleep", "directive": "d", "custom_directive_text": "also"}, "directive"),
        ({"job_key": "sleep", "directive": "missing"}, "directive"),
        ({"job_key": "sleep", "directive": 12345}, "directive"),
        ({"job_key": "sleep", "directive": ["d"]}, "directive"),
        ({"job_key": "sleep", "task3_scope": "everything"}, "task3_scope"),
        ({"job_key": "sleep", "status": "succeeded"}, "status"),
        ({"job_key": "sleep", "custom_directive_text": None}, "custom_directive_text"),
        ({"job_key": 7}, "job_key"),
    ],
)
def test_runs__invalid_launch_is_400_naming_the_field(api, body, field):
    Directive.objects.create(key="d", name="D", text="t")
    if body.get("job_key") == "__disabled__":
        Job.objects.filter(key="sleep").update(enabled=False)
        body = {**body, "job_key": "sleep"}
    response = api.post("/api/runs/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not Run.objects.exists()


def test_runs__list_filter_and_detail(api):
    for _ in range(2):
        api.post("/api/runs/", {"job_key": "sleep"}, format="json")
    last = api.post("/api/runs/", {"job_key": "log_triage"}, format="json").json()
    Run.objects.filter(pk=last["id"]).update(status="succeeded")

    listing = api.get("/api/runs/").json()
    assert listing["count"] == 3
    assert listing["results"][0]["id"] == last["id"]
    assert api.get("/api/runs?status=succeeded").json()["count"] == 1
    assert api.get("/api/runs/?job_key=sleep").json()["count"] == 2
    assert api.get("/api/runs/?trigger=schedule").json()["count"] == 0
    assert api.get("/api/runs/?status=exploded").status_code == 400
    assert api.get(f"/api/runs/{last['id']}").json()["status"] == "succeeded"
    assert api.get("/api/runs/999999/").status_code == 404


def test_runs__cannot_be_edited_or_deleted_through_the_api(api):
    run = api.post("/api/runs/", {"job_key": "sleep"}, format="json").json()
    assert api.patch(f"/api/runs/{run['id']}/", {"status": "succeeded"}, format="json").status_code == 405
    assert api.delete(f"/api/runs/{run['id']}/").status_code == 405


def test_runs__ten_megabyte_body_is_413(api):
    raw = json.dumps({"job_key": "sleep", "custom_directive_text": "x" * 10_000_000}).encode()
    response = api.generic("POST", "/api/runs/", raw, content_type="application/json")
    assert response.status_code == 413
    assert not Run.objects.exists()


# --- Paths and auth -----------------------------------------------------------------------------------

AUTH_PATHS = [
    ("get", "/api/jobs/"),
    ("get", "/api/jobs/sleep/"),
    ("patch", "/api/jobs/sleep/"),
    ("get", "/api/directives/"),
    ("post", "/api/directives/"),
    ("get", "/api/runs/"),
    ("post", "/api/runs/"),
    ("get", "/api/runs/1/"),
]


@pytest.mark.parametrize(("method", "path"), AUTH_PATHS)
def test_every_path__401_without_credentials(anon, method, path):
    response = getattr(anon, method)(path, {}, format="json")
    assert response.status_code == 401
    assert not Run.objects.exists()


@pytest.mark.parametrize(
    "path",
    ["/api/jobs/", "/api/jobs/sleep/", "/api/directives/", "/api/runs/", "/api/health/", "/api/schema/"],
)
@pytest.mark.parametrize("slash", [True, False], ids=["slash", "no-slash"])
def test_every_path__works_with_and_without_trailing_slash(api, path, slash):
    url = path if slash else path.rstrip("/")
    assert api.get(url).status_code == 200, url


def test_browsable_api__renders_for_a_session_user(user, api):
    schedule = api.post(
        "/api/schedules/",
        {"name": "a", "job_key": "sleep", "schedule_type": "interval", "interval_minutes": 5},
        format="json",
    ).json()
    run = api.post("/api/runs/", {"job_key": "sleep"}, format="json").json()
    directive = api.post("/api/directives/", {"key": "k", "name": "n", "text": "t"}, format="json").json()
    browser = APIClient()
    browser.force_login(user)
    for url in [
        "/api/schedules/",
        f"/api/schedules/{schedule['id']}/",
        f"/api/schedules/{schedule['id']}/history",
        "/api/jobs/",
        "/api/jobs/sleep/",
        "/api/runs/",
        f"/api/runs/{run['id']}/",
        "/api/directives/",
        f"/api/directives/{directive['id']}/",
        "/api/health/",
    ]:
        assert browser.get(url, HTTP_ACCEPT="text/html").status_code == 200, url


# --- Health, schema, docs -----------------------------------------------------------------------------


def test_health__200_without_credentials(anon):
    response = anon.get("/api/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "redis": "ok"}


def test_health__ignores_a_bad_token():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token wrong")
    assert client.get("/api/health").status_code == 200


def test_health__503_naming_redis_when_redis_is_unreachable(anon):
    with override_settings(REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0"):
        response = anon.get("/api/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok"
    assert body["redis"].startswith("unreachable")


def test_schema__served_without_credentials_and_lists_the_api(anon):
    response = anon.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = json.loads(response.content)["paths"]
    for path in [
        "/api/schedules/",
        "/api/schedules/{id}/",
        "/api/schedules/{id}/run-now",
        "/api/schedules/{id}/enable",
        "/api/schedules/{id}/disable",
        "/api/schedules/{id}/history",
        "/api/jobs/",
        "/api/jobs/{key}/",
        "/api/directives/",
        "/api/runs/",
        "/api/runs/{id}/",
        "/api/health/",
    ]:
        assert any(p.rstrip("/") == path.rstrip("/") for p in paths), path


def test_schema__generates_without_warnings(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))
    assert (tmp_path / "schema.yaml").stat().st_size > 1000


def test_docs__served_without_credentials(anon):
    response = anon.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()
    assert anon.get("/api/docs").status_code == 200


# --- create_api_token ---------------------------------------------------------------------------------


def _token(*args: str) -> str:
    out = io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


def test_create_api_token__creates_the_user_and_prints_a_working_token(django_user_model):
    token = _token("bob")
    user = django_user_model.objects.get(username="bob")
    assert not user.has_usable_password()
    assert not user.is_staff
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/schedules/").status_code == 200
    assert _token("bob") == token


def test_create_api_token__staff_and_rotate(django_user_model):
    first = _token("carol", "--staff")
    assert django_user_model.objects.get(username="carol").is_staff
    second = _token("carol", "--rotate")
    assert second != first
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {first}")
    assert client.get("/api/schedules/").status_code == 401


def test_create_api_token__for_an_existing_user_keeps_their_password(user):
    _token(user.username)
    user.refresh_from_db()
    assert user.check_password("pw-alice-123")
    assert not Schedule.objects.exists()


def test_docs__swagger_ui_comes_from_our_static_files_not_a_cdn(anon):
    import re

    from django.contrib.staticfiles import finders

    html = anon.get("/api/docs/").content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any("swagger-ui" in src for src in sources), sources
    assert not [src for src in sources if src.startswith(("http:", "https:", "//"))], sources
    for src in sources:
        if src.startswith("/static/"):
            assert finders.find(src.removeprefix("/static/")), src
