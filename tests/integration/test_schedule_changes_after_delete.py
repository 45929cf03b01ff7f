"""Issue 31.7: the change records of a deleted schedule stay readable, in the API and in the admin."""

from __future__ import annotations

import pytest

from schedules.models import ScheduleChange

pytestmark = pytest.mark.django_db


def create_update_delete(api) -> int:
    created = api.post(
        "/api/schedules/",
        {"name": "short-lived", "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 10},
        format="json",
    )
    assert created.status_code == 201, created.content
    schedule_id = created.json()["id"]
    assert (
        api.patch(f"/api/schedules/{schedule_id}/", {"interval_minutes": 30}, format="json").status_code
        == 200
    )
    assert api.delete(f"/api/schedules/{schedule_id}/").status_code == 204
    assert api.get(f"/api/schedules/{schedule_id}/").status_code == 404
    return schedule_id


def test_api__changes_of_a_deleted_schedule_are_readable(api, user):
    schedule_id = create_update_delete(api)

    response = api.get(f"/api/schedules/{schedule_id}/changes")
    assert response.status_code == 200, response.content
    records = response.json()["results"]
    assert [r["action"] for r in records] == ["delete", "update", "create"]
    assert {(r["schedule_id"], r["schedule_name"], r["actor"]) for r in records} == {
        (schedule_id, "short-lived", user.username)
    }
    # The delete keeps every field's last value.
    assert records[0]["changes"]["interval_minutes"] == {"old": 30, "new": None}
    assert records[1]["changes"]["interval_minutes"] == {"old": 10, "new": 30}


def test_api__an_id_that_never_had_a_schedule_is_still_404(api):
    assert api.get("/api/schedules/987654321/changes").status_code == 404


def test_admin__changes_of_a_deleted_schedule_are_listed_and_readable_as_values(api, staff):
    schedule_id = create_update_delete(api)

    listing = staff.get(f"/admin/schedules/schedulechange/?schedule_id={schedule_id}")
    assert listing.status_code == 200
    text = listing.content.decode()
    assert text.count("short-lived") >= 3  # create, update, delete rows

    delete = ScheduleChange.objects.get(schedule_id=schedule_id, action="delete")
    page = staff.get(f"/admin/schedules/schedulechange/{delete.pk}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "deleted" in html
    assert "<td>interval_minutes</td><td>30</td><td>(none)</td>" in html
    assert "<td>name</td><td>short-lived</td><td>(none)</td>" in html
    # Read-only: history is never edited or removed from the admin.
    assert (
        staff.post(f"/admin/schedules/schedulechange/{delete.pk}/delete/", {"post": "yes"}).status_code == 403
    )
    assert ScheduleChange.objects.filter(pk=delete.pk).exists()


def _delete_by_api(api, staff, schedule_id: int) -> None:
    assert api.delete(f"/api/schedules/{schedule_id}/").status_code == 204


def _delete_by_bulk(api, staff, schedule_id: int) -> None:
    response = api.post("/api/schedules/bulk", {"action": "delete", "ids": [schedule_id]}, format="json")
    assert response.status_code == 200, response.content


def _delete_in_the_admin(api, staff, schedule_id: int) -> None:
    response = staff.post(f"/admin/schedules/schedule/{schedule_id}/delete/", {"post": "yes"})
    assert response.status_code == 302, response.content


@pytest.mark.parametrize("delete", [_delete_by_api, _delete_by_bulk, _delete_in_the_admin])
def test_the_delete_record_keeps_run_after_as_create_recorded_it(api, staff, delete):
    """Issue 33's run_after is a field like the others: the delete record gives its last value (the
    upstreams' names, as the create record did), so the history says what the schedule ran after."""
    upstreams = []
    for name in ("nightly-load", "hourly-sync"):
        created = api.post(
            "/api/schedules/",
            {"name": name, "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 60},
            format="json",
        )
        assert created.status_code == 201, created.content
        upstreams.append(created.json()["id"])
    downstream = api.post(
        "/api/schedules/",
        {"name": "report", "job_key": "log_triage", "schedule_type": "none", "run_after": upstreams},
        format="json",
    )
    assert downstream.status_code == 201, downstream.content
    schedule_id = downstream.json()["id"]

    delete(api, staff, schedule_id)

    records = api.get(f"/api/schedules/{schedule_id}/changes").json()["results"]
    assert [r["action"] for r in records] == ["delete", "create"]
    names = ["hourly-sync", "nightly-load"]
    assert records[1]["changes"]["run_after"] == {"old": None, "new": names}
    assert records[0]["changes"]["run_after"] == {"old": names, "new": None}


def test_a_sync_prune_of_an_upstream_and_its_downstream_keeps_run_after_in_the_record(tmp_path, api):
    """Both go in one prune, the upstream first by name: each record is written before either delete."""
    from io import StringIO

    from django.core.management import call_command

    entry = '[[schedules]]\nname = "{}"\njob_key = "log_triage"\nschedule_type = "{}"\n{}\n'
    path = tmp_path / "schedules.toml"
    path.write_text(
        entry.format("keeper", "interval", "interval_minutes = 60")
        + entry.format("a-upstream", "interval", "interval_minutes = 60")
        + entry.format("b-downstream", "none", 'run_after = ["a-upstream"]')
    )
    call_command("sync_schedules", str(path), stdout=StringIO())
    path.write_text(entry.format("keeper", "interval", "interval_minutes = 60"))
    out = StringIO()
    call_command("sync_schedules", str(path), "--prune", stdout=out)
    assert "delete a-upstream" in out.getvalue()
    assert "delete b-downstream" in out.getvalue()

    record = ScheduleChange.objects.get(schedule_name="b-downstream", action="delete")
    assert (record.source, record.changes["run_after"]) == ("sync", {"old": ["a-upstream"], "new": None})
