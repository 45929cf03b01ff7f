"""Issue 31: one answer for "when does it run next", no 500s on dates, a backfill's own overlap policy.

The API's `upcoming`, the admin's "next 5 runs", the dashboard's "Next runs" and `/preview` are compared
for the same schedules; dates outside the documented range (docs/SCHEDULES.md, "Dates") are a 400 naming
the field everywhere a client gives one. Real PostgreSQL; the dispatch is the scheduler's own.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.utils.dateparse import parse_datetime

from orchestrator.models import Run
from schedules.dispatch import dispatch_claimed
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import db_now, make_schedule, sql

pytestmark = pytest.mark.django_db

ME = "me:1"
NO_NEXT_RUNS = "Next runs (UTC)</th><td>\u2013</td>"  # the dashboard's schedule page, with none


def _next_transition(zone: str, after: datetime, forward: bool) -> datetime:
    """Local midnight two days before the zone's next spring-forward (forward) or fall-back at least two
    days after `after`, in UTC: the first slots of a daily cron starting then straddle the change."""
    tz = ZoneInfo(zone)
    day = (after + timedelta(days=2)).astimezone(tz).replace(hour=12, minute=0, second=0, microsecond=0)
    for _ in range(800):
        nxt = day + timedelta(days=1)
        shift = nxt.utcoffset() - day.utcoffset()
        if shift and (shift > timedelta(0)) == forward:
            return (day - timedelta(days=1)).replace(hour=0).astimezone(UTC)
        day = nxt
    raise AssertionError(f"{zone} has no transition ahead")


def _cases(now: datetime) -> dict[str, dict]:
    start = (now + timedelta(hours=1)).replace(microsecond=0)
    return {
        # The issue's `campaign`: hourly; the dashboard showed each time 59 minutes late.
        "interval": {"schedule_type": "interval", "interval_minutes": 60},
        "interval-jitter": {"schedule_type": "interval", "interval_minutes": 10, "jitter_seconds": 120},
        # 02:30 does not exist on spring-forward day: that slot runs at 03:00 EDT.
        "cron-dst-gap": {
            "schedule_type": "cron",
            "cron_expr": "30 2 * * *",
            "timezone": "America/New_York",
            "start_at": _next_transition("America/New_York", now, forward=True).isoformat(),
        },
        # 01:30 happens twice on fall-back day: it runs once.
        "cron-dst-fold": {
            "schedule_type": "cron",
            "cron_expr": "30 1 * * *",
            "timezone": "Europe/London",
            "start_at": _next_transition("Europe/London", now, forward=False).isoformat(),
        },
        "cron-jitter": {
            "schedule_type": "cron",
            "cron_expr": "*/5 * * * *",
            "timezone": "Europe/Berlin",
            "jitter_seconds": 90,
        },
        "cron-hashed": {"schedule_type": "cron", "cron_expr": "H H/6 * * *", "timezone": "Asia/Kathmandu"},
        "bounds": {
            "schedule_type": "interval",
            "interval_minutes": 10,
            "start_at": start.isoformat(),
            "end_at": (start + timedelta(minutes=25)).isoformat(),
        },
        "max-runs": {"schedule_type": "interval", "interval_minutes": 10, "max_runs": 3},
    }


CASES = list(_cases(datetime(2026, 1, 1, tzinfo=UTC)))


def _times(values) -> list[datetime]:
    return [parse_datetime(v) for v in values]


@pytest.mark.parametrize("case", CASES)
def test_api_admin_dashboard_and_preview_give_the_same_next_runs(api, staff, case):
    now = db_now()  # the test's transaction: the instant create anchors the schedule on
    fields = {"name": f"same-{case}", **_cases(now)[case]}
    created = api.post("/api/schedules/", {**fields, "job_key": "log_triage"}, format="json")
    assert created.status_code == 201, created.content
    body = api.get(f"/api/schedules/{created.json()['id']}").json()
    upcoming = _times(body["upcoming"])

    # The API: next_run_at itself first, then the runs after it.
    assert upcoming, body
    assert upcoming[0] == parse_datetime(body["next_run_at"])
    assert upcoming == sorted(set(upcoming))
    expected = {"bounds": 3, "max-runs": 3}.get(case, 5)
    assert len(upcoming) == expected

    # /preview, as if saved at the same instant.
    preview = api.post(
        "/api/schedules/preview", {**fields, "after": now.isoformat(), "count": 5}, format="json"
    )
    assert preview.status_code == 200, preview.content
    assert _times(preview.json()["times"]) == upcoming

    # The admin's change page and the dashboard's schedule page and index (three runs).
    shown = ", ".join(t.strftime("%Y-%m-%d %H:%M:%S") for t in upcoming)
    admin_page = staff.get(f"/admin/schedules/schedule/{body['id']}/change/").content.decode()
    assert shown in admin_page
    dashboard_page = staff.get(f"/dashboard/schedules/{body['id']}/").content.decode()
    assert shown in dashboard_page
    index = staff.get("/dashboard/", {"q": fields["name"]}).content.decode()
    assert "<br>".join(t.strftime("%Y-%m-%d %H:%M:%S") for t in upcoming[:3]) in index


def test_the_dst_cases_show_the_gap_and_the_fold(api):
    now = db_now()
    cases = _cases(now)
    gap = api.post(
        "/api/schedules/preview",
        {**cases["cron-dst-gap"], "after": now.isoformat(), "count": 4},
        format="json",
    ).json()["times"]
    local = [t.astimezone(ZoneInfo("America/New_York")).strftime("%H:%M %Z") for t in _times(gap)]
    assert local == ["02:30 EST", "02:30 EST", "03:00 EDT", "02:30 EDT"]
    fold = api.post(
        "/api/schedules/preview",
        {**cases["cron-dst-fold"], "after": now.isoformat(), "count": 4},
        format="json",
    ).json()["times"]
    local = [t.astimezone(ZoneInfo("Europe/London")).strftime("%H:%M %Z") for t in _times(fold)]
    assert local == ["01:30 BST", "01:30 BST", "01:30 BST", "01:30 GMT"]


def test_hourly_next_runs_are_on_the_hour_everywhere(api, staff):
    """The issue's `campaign`: the API said 08:00, 09:00, 10:00; the dashboard 08:59, 09:59, 10:59."""
    s = make_schedule("campaign", interval_minutes=60, next_run_at=datetime(2030, 1, 1, 8, tzinfo=UTC))
    assert _times(api.get(f"/api/schedules/{s.pk}").json()["upcoming"])[:3] == [
        datetime(2030, 1, 1, hour, tzinfo=UTC) for hour in (8, 9, 10)
    ]
    index = staff.get("/dashboard/", {"q": "campaign"}).content.decode()
    assert "2030-01-01 08:00:00<br>2030-01-01 09:00:00<br>2030-01-01 10:00:00" in index


def test_a_disabled_schedule_has_no_next_runs_anywhere(api, staff):
    s = make_schedule("paused", next_run_at=db_now() + timedelta(minutes=5), enabled=False)
    assert api.get(f"/api/schedules/{s.pk}").json()["upcoming"] == []
    assert NO_NEXT_RUNS in staff.get(f"/dashboard/schedules/{s.pk}/").content.decode()


def test_max_runs_completed_by_a_real_dispatch_clears_next_run_at(api, staff):
    now = db_now()
    s = make_schedule("twice", next_run_at=now - timedelta(minutes=15), misfire_policy="run_all", max_runs=2)
    sql(
        "UPDATE schedules_schedule SET claimed_by = %s, claimed_until = now() + interval '60 seconds'"
        " WHERE id = %s",
        [ME, s.pk],
    )

    assert dispatch_claimed([s.pk], claimant=ME, grace=timedelta(seconds=60), ttl=60.0).dispatched == 2

    s.refresh_from_db()
    assert (s.enabled, s.scheduled_run_count, s.next_run_at) == (False, 2, None)
    body = api.get(f"/api/schedules/{s.pk}").json()
    assert (body["next_run_at"], body["upcoming"], body["runs_remaining"]) == (None, [], 0)
    assert body["next_run_note"].startswith("completed")
    assert NO_NEXT_RUNS in staff.get(f"/dashboard/schedules/{s.pk}/").content.decode()
    # Raising max_runs and enabling gives it a next run again, from now.
    again = api.patch(f"/api/schedules/{s.pk}", {"max_runs": 5, "enabled": True}, format="json").json()
    assert parse_datetime(again["next_run_at"]) > now
    assert len(again["upcoming"]) == 3


def test_max_runs_completed_by_a_backfill_clears_next_run_at(api):
    s = make_schedule("backfill-completes", next_run_at=db_now() + timedelta(minutes=5), max_runs=3)
    body = {
        "start": (s.next_run_at - timedelta(minutes=35)).isoformat(),
        "end": (s.next_run_at - timedelta(minutes=5)).isoformat(),
    }
    assert api.post(f"/api/schedules/{s.pk}/backfill", body, format="json").json()["created"] == 3
    s.refresh_from_db()
    assert (s.enabled, s.next_run_at) == (False, None)


# --- dates -------------------------------------------------------------------------------------------

CRON = {"schedule_type": "cron", "cron_expr": "0 2 * * *"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**CRON, "after": "9999-12-31T00:00:00Z"}, "after"),
        ({**CRON, "timezone": "America/New_York", "after": "0001-01-01T00:00:00Z"}, "after"),
        ({**CRON, "timezone": "Pacific/Kiritimati", "after": "0001-01-01T00:00:00+05:00"}, "after"),
        ({**CRON, "after": "9999-12-31T23:59:59-05:00"}, "after"),
        ({**CRON, "after": "1969-12-31T23:59:59Z"}, "after"),
        ({**CRON, "start_at": "9999-12-31T00:00:00Z"}, "start_at"),
        ({**CRON, "timezone": "Etc/GMT+12", "end_at": "0001-01-01T00:00:00Z"}, "end_at"),
        ({"schedule_type": "interval", "interval_minutes": 60, "after": "9999-12-31T00:00:00Z"}, "after"),
    ],
)
def test_preview__a_date_out_of_range_is_a_400_naming_it(api, body, field):
    response = api.post("/api/schedules/preview", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({**CRON, "start_at": "9999-12-31T00:00:00Z"}, "start_at"),
        ({**CRON, "timezone": "Asia/Tokyo", "start_at": "0001-01-01T00:00:00Z"}, "start_at"),
        ({**CRON, "end_at": "9000-01-01T00:00:01Z"}, "end_at"),
        ({"schedule_type": "interval", "interval_minutes": 10, "end_at": "1969-07-20T20:17:00Z"}, "end_at"),
    ],
)
def test_create_and_patch__a_date_out_of_range_is_a_400_naming_it(api, fields, field):
    created = api.post("/api/schedules/", {"name": "far", "job_key": "log_triage", **fields}, format="json")
    assert created.status_code == 400, created.content
    assert field in created.json()
    assert not Schedule.objects.exists()

    s = make_schedule("patched", next_run_at=db_now() + timedelta(minutes=5))
    patched = api.patch(f"/api/schedules/{s.pk}", fields, format="json")
    assert patched.status_code == 400, patched.content
    assert field in patched.json()


def test_the_range_ends_are_accepted_and_the_slot_math_fits_after_them(api):
    first = api.post(
        "/api/schedules/preview", {**CRON, "after": "1970-01-01T00:00:00Z", "count": 1}, format="json"
    )
    assert first.json()["times"] == ["1970-01-01T02:00:00Z"]
    # The rarest cron (29 February), 100 runs from the last instant a client may give, in UTC+14.
    body = {
        "schedule_type": "cron",
        "cron_expr": "0 0 29 2 *",
        "timezone": "Pacific/Kiritimati",
        "after": "9000-01-01T00:00:00Z",
        "count": 100,
    }
    response = api.post("/api/schedules/preview", body, format="json")
    assert response.status_code == 200, response.content
    assert len(response.json()["times"]) == 100
    created = api.post(
        "/api/schedules/",
        {"name": "last", "job_key": "log_triage", **CRON, "start_at": "9000-01-01T00:00:00Z"},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["next_run_at"] == "9000-01-01T02:00:00Z"


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("0001-01-01T00:00:00Z", "2026-01-01T00:00:00Z", "start"),
        ("1969-12-31T00:00:00Z", "2026-01-01T00:00:00Z", "start"),
        ("2026-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "end"),
    ],
)
def test_backfill__a_date_out_of_range_is_a_400_naming_it(api, start, end, field):
    s = make_schedule("backfill-range", next_run_at=db_now() + timedelta(minutes=5))
    runs = Run.objects.count()
    response = api.post(f"/api/schedules/{s.pk}/backfill", {"start": start, "end": end}, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert Run.objects.count() == runs


def _admin_form(**overrides) -> dict:
    from orchestrator.models import Job

    data = {
        "name": "admin-far",
        "job": Job.objects.get(key="log_triage").pk,
        "enabled": "on",
        "schedule_type": "cron",
        "cron_expr": "0 2 * * *",
        "timezone": "UTC",
        "task3_scope": "allowlist",
        "misfire_policy": "run_once",
        "overlap_policy": "buffer_one",
        "_save": "Save",
    }
    return {**data, **overrides}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"start_at_0": "9999-12-31", "start_at_1": "00:00:00"}, "start_at"),
        ({"end_at_0": "0001-01-01", "end_at_1": "00:00:00", "timezone": "America/New_York"}, "end_at"),
    ],
)
def test_admin_add__a_date_out_of_range_is_a_form_error_on_the_field(staff, overrides, field):
    response = staff.post("/admin/schedules/schedule/add/", _admin_form(**overrides))
    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert "1970-01-01T00:00:00Z" in str(response.context["adminform"].form.errors[field])
    assert not Schedule.objects.exists()


def test_admin_backfill__a_date_out_of_range_is_a_form_error(staff):
    s = make_schedule("admin-backfill-range", next_run_at=db_now() + timedelta(minutes=5))
    body = {
        "action": "backfill",
        "_selected_action": [s.pk],
        "apply": "1",
        "start": "0001-01-01 00:00:00",
        "end": "2026-01-01 00:00:00",
    }
    response = staff.post("/admin/schedules/schedule/", body)
    assert response.status_code == 200
    assert "start" in response.context["form"].errors
    assert not ScheduledRun.objects.filter(schedule=s).exists()


# --- backfill's own overlap policy -------------------------------------------------------------------


def _six_slots(s) -> dict:
    return {
        "start": (s.next_run_at - timedelta(minutes=65)).isoformat(),
        "end": (s.next_run_at - timedelta(minutes=5)).isoformat(),
    }


def test_backfill__allows_every_slot_by_default_whatever_the_schedules_policy(api):
    s = make_schedule(
        "backfill-default", next_run_at=db_now() + timedelta(minutes=5), overlap_policy="buffer_one"
    )
    result = api.post(f"/api/schedules/{s.pk}/backfill", _six_slots(s), format="json").json()
    assert result == {"created": 6, "skipped": 0, "overlap_skipped": 0, "slots": 6}


def test_backfill__takes_its_own_overlap_policy(api):
    s = make_schedule("backfill-own", next_run_at=db_now() + timedelta(minutes=5), overlap_policy="allow")
    body = {**_six_slots(s), "overlap_policy": "buffer_one"}
    result = api.post(f"/api/schedules/{s.pk}/backfill", body, format="json").json()
    assert result == {"created": 2, "skipped": 0, "overlap_skipped": 4, "slots": 6}


def test_backfill__an_unknown_overlap_policy_is_a_400_naming_it(api):
    s = make_schedule("backfill-bad-policy", next_run_at=db_now() + timedelta(minutes=5))
    response = api.post(
        f"/api/schedules/{s.pk}/backfill", {**_six_slots(s), "overlap_policy": "x"}, format="json"
    )
    assert response.status_code == 400
    assert "overlap_policy" in response.json()
