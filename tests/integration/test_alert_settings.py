"""A schedule's alert settings through the API: validated, its webhook URL written but never read back,
and kept out of the change history (the URL carries its token)."""

from __future__ import annotations

import pytest

from schedules.models import Schedule, ScheduleChange

pytestmark = pytest.mark.django_db

BODY = {
    "name": "alerting",
    "job_key": "log_triage",
    "schedule_type": "interval",
    "interval_minutes": 10,
    "timezone": "UTC",
}
HOOK = "https://hooks.example.test/services/T000/B000/s3cr3t-token"


def test_alert_settings__set_through_the_api_the_webhook_never_read_back(api):
    response = api.post(
        "/api/schedules/",
        {**BODY, "alert_after_failures": 3, "alert_after_seconds": 600, "alert_webhook_url": HOOK},
        format="json",
    )
    assert response.status_code == 201, response.data
    body = response.json()
    assert body["alert_after_failures"] == 3
    assert body["alert_after_seconds"] == 600
    assert body["alert_webhook_set"] is True
    assert "alert_webhook_url" not in body
    schedule = Schedule.objects.get(pk=body["id"])
    assert schedule.alert_webhook_url == HOOK
    listed = api.get(f"/api/schedules/{schedule.pk}/").content.decode()
    assert "s3cr3t" not in listed

    response = api.patch(f"/api/schedules/{schedule.pk}/", {"alert_webhook_url": ""}, format="json")
    assert response.status_code == 200, response.data
    assert response.json()["alert_webhook_set"] is False
    changes = ScheduleChange.objects.filter(schedule_id=schedule.pk)
    history = " ".join(str(change.changes) for change in changes)
    assert "alert_webhook_url" in history  # the change is recorded...
    assert "s3cr3t" not in history  # ...but not the secret


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"alert_after_seconds": 0}, "alert_after_seconds"),
        ({"alert_after_failures": -1}, "alert_after_failures"),
        ({"alert_webhook_url": "not a url"}, "alert_webhook_url"),
        ({"alert_webhook_url": "http://169.254.169.254/latest"}, "alert_webhook_url"),
        ({"alert_webhook_url": "ftp://hooks.example.test/x"}, "alert_webhook_url"),
    ],
)
def test_alert_settings__bad_values_are_400_naming_the_field_and_nothing_written(
    api, settings, fields, field
):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = []  # internal addresses refused (see test_webhook_guard.py)
    response = api.post("/api/schedules/", {**BODY, **fields}, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not Schedule.objects.filter(name=BODY["name"]).exists()
