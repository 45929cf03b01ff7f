"""Read-only access (issue 17.5): a `viewers` user (create_api_token USER --viewer) reads every endpoint
the URL resolver knows and every write answers 403, writing nothing; the dashboard's pages open for
viewers and staff, its buttons only for staff."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from monitoring import metrics
from monitoring.permissions import VIEWERS_GROUP
from orchestrator.models import Run
from schedules.models import ScheduledRun
from tests.integration.test_security import call, protected_endpoints, row_counts
from tests.integration.test_security import path_values as security_path_values  # noqa: F401

pytestmark = pytest.mark.django_db

UNSAFE = ("post", "put", "patch", "delete")


@pytest.fixture
def path_values(security_path_values) -> dict[str, str]:  # noqa: F811
    """test_security's objects for the path parameters (a schedule, a run, a directive, a job)."""
    return security_path_values


def viewer_token(username: str = "vera") -> str:
    out = io.StringIO()
    call_command("create_api_token", username, "--viewer", stdout=out, stderr=io.StringIO())
    return out.getvalue().strip()


def test_the_migration_creates_the_viewers_group():
    assert Group.objects.filter(name=VIEWERS_GROUP).exists()


def test_create_api_token_viewer_puts_the_user_in_the_group(django_user_model):
    viewer_token("vic")
    assert django_user_model.objects.get(username="vic").groups.filter(name=VIEWERS_GROUP).exists()


def test_a_viewer_reads_every_endpoint_and_every_write_is_a_403(path_values, redis_client):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {viewer_token()}")
    before = row_counts()
    wrong = []
    for endpoint in protected_endpoints():
        path = endpoint.path(path_values)
        for method in endpoint.methods:
            status = call(client, method, path).status_code
            expected = 403 if method in UNSAFE else 200
            if status != expected:
                wrong.append(f"{method.upper()} {path} -> {status} (expected {expected})")
    assert not wrong, "\n".join(wrong)
    assert row_counts() == before, "a viewer's request wrote to the database"
    # The only key: GET /metrics' cached exposition (monitoring/metrics.py), no message, no lease.
    keys = {key.decode() for key in redis_client.keys("*")}
    assert keys <= {metrics.EXPOSITION_KEY}, f"a viewer's request queued something: {keys}"
    assert len(protected_endpoints()) >= 15  # /api/alerts/ and /metrics are among them


def test_the_same_writes_succeed_for_a_user_outside_the_group(api, path_values, redis_client):
    """The 403s above come from the group, not from the endpoints refusing everyone."""
    schedule = path_values["schedules"]
    assert api.post(f"/api/schedules/{schedule}/disable").status_code == 200
    response = api.post(f"/api/schedules/{schedule}/run-now")
    assert response.status_code == 202, response.content


@pytest.fixture
def dashboard_paths(path_values) -> dict[str, list[str]]:
    schedule, run = path_values["schedules"], path_values["runs"]
    return {
        "pages": [
            reverse("dashboard:index"),
            reverse("dashboard:state") + f"?ids={schedule}",
            reverse("dashboard:schedule", args=[schedule]),
            reverse("dashboard:run", args=[run]),
            reverse("dashboard:calendar") + "?view=month",
        ],
        "buttons": [
            *(reverse(f"dashboard:{name}", args=[schedule]) for name in ("run-now", "enable", "disable")),
            reverse("dashboard:cancel-run", args=[run]),
        ],
    }


def test_the_dashboard_needs_a_login_and_staff_or_viewer(dashboard_paths, django_user_model):
    anonymous = Client()
    for path in dashboard_paths["pages"]:
        response = anonymous.get(path)
        assert response.status_code == 302, path
        assert response["Location"].startswith("/admin/login/"), path
    nobody = Client()
    nobody.force_login(django_user_model.objects.create_user("nobody", password="pw-nobody-123"))
    for path in dashboard_paths["pages"]:
        assert nobody.get(path).status_code == 403, path


def test_a_viewer_sees_the_dashboard_and_its_buttons_answer_403(
    dashboard_paths, django_user_model, redis_client
):
    viewer_token("vera")
    client = Client(enforce_csrf_checks=False)
    client.force_login(django_user_model.objects.get(username="vera"))
    for path in dashboard_paths["pages"]:
        assert client.get(path).status_code == 200, path
    assert b"Run now" not in client.get(dashboard_paths["pages"][0]).content
    before = row_counts()
    for path in dashboard_paths["buttons"]:
        assert client.post(path, {"note": "x"}).status_code == 403, path
    for path in dashboard_paths["pages"]:
        assert client.post(path).status_code == 405, path
    assert row_counts() == before
    assert redis_client.dbsize() == 0


def test_staff_press_the_buttons_with_a_csrf_token(dashboard_paths, django_user_model, path_values):
    staff = django_user_model.objects.create_user("stella", password="pw-stella-123", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    run_now = dashboard_paths["buttons"][0]
    assert client.post(run_now).status_code == 403, "no CSRF token: refused"
    page = client.get(reverse("dashboard:index"))
    token = page.cookies["csrftoken"].value
    before = ScheduledRun.objects.count()
    response = client.post(run_now, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 202, response.content
    assert ScheduledRun.objects.count() == before + 1
    assert Run.objects.filter(pk=response.json()["scheduled_run"]["run_id"]).exists()
