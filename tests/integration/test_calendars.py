"""Calendars (issue 33) through the API, the admin's service and the dispatch, against PostgreSQL: CRUD,
400s naming the rule, days, iCalendar import, schedules that exclude or keep to calendars, preview,
backfill, the recompute of next runs on a calendar edit, and a skipped slot naming its calendar.
"""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils.dateparse import parse_datetime

from schedules import timing
from schedules.dispatch import dispatch_claimed
from schedules.models import Calendar, Schedule, ScheduleChange, ScheduledRun
from tests.scheduler_support import db_now, sql

pytestmark = pytest.mark.django_db

ME = "me:1"
THURSDAY = {"month": 11, "weekday": "thu"}
EVERY_DAY = [{"weekdays": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}]


def make_calendar(api, **fields) -> dict:
    response = api.post("/api/calendars/", {"name": "cal", "timezone": "UTC", **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def make(api, **fields) -> dict:
    body = {"name": "s", "job_key": "log_triage", "schedule_type": "cron", "cron_expr": "0 9 * * *", **fields}
    response = api.post("/api/schedules/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def test_calendar_crud__round_trips_and_lists_its_schedules(api):
    cal = make_calendar(
        api,
        name="us-holidays",
        timezone="America/New_York",
        rules=[{"yearly": "12-25"}, {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}}],
        holidays={"country": "US", "subdiv": "NY", "years": [2027]},
    )
    assert cal["rules"][1] == {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}}
    schedule = make(api, exclude_calendars=[cal["id"]])
    assert schedule["exclude_calendars"] == [cal["id"]]
    assert schedule["calendar_policy"] == "skip"
    assert api.get(f"/api/calendars/{cal['id']}/").json()["schedules"] == [schedule["id"]]
    patched = api.patch(f"/api/calendars/{cal['id']}", {"rules": [{"date": "2027-01-02"}]}, format="json")
    assert patched.status_code == 200
    assert patched.json()["rules"] == [{"date": "2027-01-02"}]
    # In use: refused, naming the schedule; free again once the schedule drops it.
    refused = api.delete(f"/api/calendars/{cal['id']}/")
    assert refused.status_code == 409
    assert "'s'" in refused.json()["calendar"][0]
    api.patch(f"/api/schedules/{schedule['id']}/", {"exclude_calendars": []}, format="json")
    assert api.delete(f"/api/calendars/{cal['id']}/").status_code == 204
    assert not Calendar.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"rules": [{"date": "2027-01-01"}, {"weekdays": ["sat"]}, {"nth_weekday": {**THURSDAY, "n": 0}}]},
         "rules[2].nth_weekday.n"),
        ({"rules": [{"start": "2027-01-05", "end": "2027-01-01"}]}, "rules[0].end"),
        ({"rules": [{"cron": "* 25 * * *"}]}, "rules[0].cron"),
        ({"rules": [{"holiday": "xmas"}]}, "rules[0]"),
        ({"rules": {"date": "2027-01-01"}}, "rules"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"holidays": {"country": "US", "market": "NYSE", "years": [2027]}}, "holidays"),
        ({"holidays": {"market": "NYSE", "years": [1000]}}, "holidays.years"),
        ({"name": ""}, "name"),
    ],
)  # fmt: skip
def test_calendar_create__bad_input_is_a_400_naming_the_field(api, body, field):
    response = api.post("/api/calendars/", {"name": "bad", **body}, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not Calendar.objects.exists()


def test_days__lists_the_named_days_of_a_bounded_range(api):
    cal = make_calendar(api, rules=[{"weekdays": ["sat", "sun"]}, {"date": "2027-01-06"}])
    response = api.get(f"/api/calendars/{cal['id']}/days?start=2027-01-01&end=2027-01-11")
    assert response.status_code == 200
    assert response.json()["days"] == ["2027-01-02", "2027-01-03", "2027-01-06", "2027-01-09", "2027-01-10"]
    year = api.get(f"/api/calendars/{cal['id']}/days?start=2027-01-01").json()
    assert (year["end"], len(year["days"])) == ("2028-01-02", 106)  # 366 days: 52 weekends, 6 Jan, 1 Jan 2028
    assert api.get(f"/api/calendars/{cal['id']}/days").status_code == 200  # from today, in its zone
    for query, field in [
        ("start=2027-01-01&end=soon", "end"),
        ("start=2027-01-05&end=2027-01-01", "end"),
        ("start=2027-01-01&end=2040-01-01", "end"),
        ("start=tomorrow&end=2027-01-01", "start"),
    ]:
        response = api.get(f"/api/calendars/{cal['id']}/days?{query}")
        assert response.status_code == 400, (query, response.content)
        assert field in response.json(), (query, response.content)


ICS = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\n"
    "BEGIN:VEVENT\r\nUID:a\r\nDTSTART;VALUE=DATE:20271224\r\nDTEND;VALUE=DATE:20271226\r\nEND:VEVENT\r\n"
    "BEGIN:VEVENT\r\nUID:b\r\nDTSTART;VALUE=DATE:20270101\r\nRRULE:FREQ=YEARLY\r\nEND:VEVENT\r\n"
    "END:VCALENDAR\r\n"
)


def test_import__adds_an_ics_files_days_through_the_api_and_the_command(api, tmp_path):
    cal = make_calendar(api)
    response = api.post(f"/api/calendars/{cal['id']}/import", {"ics": ICS}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["added"] == 2
    assert response.json()["calendar"]["rules"] == [
        {"start": "2027-12-24", "end": "2027-12-26"},
        {"yearly": "01-01"},
    ]
    upload = io.BytesIO(ICS.encode())
    upload.name = "holidays.ics"
    again = api.post(f"/api/calendars/{cal['id']}/import", {"file": upload}, format="multipart")
    assert again.status_code == 200
    assert again.json()["added"] == 0
    bad = api.post(f"/api/calendars/{cal['id']}/import", {"ics": "BEGIN:NOTHING"}, format="json")
    assert bad.status_code == 400
    assert "file" in bad.json()

    path = tmp_path / "h.ics"
    path.write_text(ICS)
    out = io.StringIO()
    call_command("import_calendar", "from-file", str(path), "--timezone", "Europe/Berlin", stdout=out)
    made = Calendar.objects.get(name="from-file")
    assert made.timezone == "Europe/Berlin"
    assert len(made.rules) == 2
    assert "2 rules added" in out.getvalue()


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("start=9999-12-01", "start"),  # its default end, a year on, was past what a date holds: a 500
        ("start=9999-12-31", "start"),
        ("start=0001-01-01&end=0002-01-01", "start"),
        ("start=2027-01-01&end=9999-12-31", "end"),
        ("start=1969-12-31&end=1970-01-02", "start"),
    ],
)
def test_days__dates_outside_the_documented_range_are_a_400_naming_them(api, query, field):
    cal = make_calendar(api, rules=[{"start": "0001-01-01", "end": "9999-12-31"}])
    response = api.get(f"/api/calendars/{cal['id']}/days?{query}")
    assert response.status_code == 400, (query, response.content)
    assert field in response.json(), (query, response.content)


def test_days__the_default_end_stops_at_the_end_of_the_range(api):
    cal = make_calendar(api, rules=[{"start": "0001-01-01", "end": "9999-12-31"}])
    body = api.get(f"/api/calendars/{cal['id']}/days?start=8999-12-30").json()
    assert (body["end"], body["days"]) == ("9000-01-01", ["8999-12-30", "8999-12-31"])
    first = api.get(f"/api/calendars/{cal['id']}/days?start=1970-01-01&end=1970-01-03").json()
    assert first["days"] == ["1970-01-01", "1970-01-02"]


def _ics(event: str) -> str:
    return (
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\n"
        f"BEGIN:VEVENT\r\nUID:x\r\n{event}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )


@pytest.mark.parametrize(
    "event",
    [
        "DTSTART;VALUE=DATE:99991231",  # an all-day event ends the day after
        "DTSTART;VALUE=DATE:99991231\r\nDURATION:P2D",
        "DTSTART:99991231T230000Z\r\nDTEND:99991231T235959Z",
        "DTSTART;TZID=Asia/Tokyo:00010101T000000\r\nDURATION:PT1H",
        "DTSTART;VALUE=DATE:20271231\r\nDURATION:P99999999D",
    ],
)
def test_import__an_event_past_what_a_date_holds_is_a_400_naming_the_file(api, event):
    cal = make_calendar(api, timezone="Pacific/Kiritimati", rules=[{"date": "2027-01-06"}])
    response = api.post(f"/api/calendars/{cal['id']}/import", {"ics": _ics(event)}, format="json")
    assert response.status_code == 400, response.content
    assert response.json() == {"file": ["An event's dates run past what a date holds (years 1 to 9999)."]}
    assert Calendar.objects.get(pk=cal["id"]).rules == [{"date": "2027-01-06"}]


def test_schedule_fields__are_validated_and_recorded_in_the_change_history(api):
    cal = make_calendar(api, rules=[{"weekdays": ["sat", "sun"]}])
    assert api.post("/api/schedules/", {"name": "x", "job_key": "log_triage", "schedule_type": "cron",
                                        "cron_expr": "0 9 * * *", "exclude_calendars": [999999]},
                    format="json").status_code == 400  # fmt: skip
    response = api.post(
        "/api/schedules/",
        {"name": "x", "job_key": "log_triage", "schedule_type": "cron", "cron_expr": "0 9 * * *",
         "calendar_policy": "sometimes"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400
    assert "calendar_policy" in response.json()
    response = api.post(
        "/api/schedules/",
        {"name": "x", "job_key": "log_triage", "schedule_type": "cron", "cron_expr": "0 9 * * *",
         "jitter_seconds": 60, "calendar_policy": "next_allowed", "exclude_calendars": [cal["id"]]},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400
    assert "calendar_policy" in response.json()
    schedule = make(api, only_calendars=[cal["id"]], calendar_policy="next_allowed")
    changes = ScheduleChange.objects.filter(schedule_id=schedule["id"]).order_by("id")
    assert changes[0].changes["only_calendars"] == {"old": None, "new": ["cal"]}
    api.patch(f"/api/schedules/{schedule['id']}/", {"only_calendars": [], "exclude_calendars": [cal["id"]]},
              format="json")  # fmt: skip
    last = ScheduleChange.objects.filter(schedule_id=schedule["id"]).latest("id").changes
    assert last["only_calendars"] == {"old": ["cal"], "new": []}
    assert last["exclude_calendars"] == {"old": [], "new": ["cal"]}


def test_upcoming_and_preview__leave_out_excluded_days_and_say_why(api):
    weekend = make_calendar(api, name="weekend", rules=[{"weekdays": ["sat", "sun"]}])
    body = {"schedule_type": "cron", "cron_expr": "0 9 * * *", "after": "2027-01-01T10:00:00Z", "count": 3,
            "exclude_calendars": [weekend["id"]]}  # fmt: skip
    response = api.post("/api/schedules/preview", body, format="json")
    assert response.status_code == 200, response.content
    result = response.json()
    # Friday 2027-01-01: the weekend's slots are left out and named.
    assert result["times"] == ["2027-01-04T09:00:00Z", "2027-01-05T09:00:00Z", "2027-01-06T09:00:00Z"]
    assert result["excluded"] == [
        {"time": "2027-01-02T09:00:00Z", "reason": "excluded by calendar 'weekend'"},
        {"time": "2027-01-03T09:00:00Z", "reason": "excluded by calendar 'weekend'"},
    ]
    weekly = api.post(
        "/api/schedules/preview",
        {**body, "cron_expr": "0 9 * * 6", "calendar_policy": "next_allowed", "count": 2},
        format="json",
    ).json()
    assert weekly["times"] == ["2027-01-04T09:00:00Z", "2027-01-11T09:00:00Z"]  # Saturday's run, on Monday
    assert (
        api.post("/api/schedules/preview", {**body, "only_calendars": [424242]}, format="json").status_code
        == 400
    )
    schedule = make(api, exclude_calendars=[weekend["id"]])
    assert all(parse_datetime(t).weekday() < 5 for t in schedule["upcoming"])
    everything = make_calendar(api, name="everything", rules=EVERY_DAY)
    blocked = make(api, name="blocked", exclude_calendars=[everything["id"]], calendar_policy="next_allowed")
    assert blocked["next_run_at"] is None
    assert blocked["upcoming"] == []
    assert "calendars" in blocked["next_run_note"]


def test_a_calendar_edit__recomputes_next_runs_and_records_a_change_for_each_schedule(api):
    now = db_now()
    tomorrow = (now + timedelta(days=1)).date()
    cal = make_calendar(api, name="closures", rules=[])
    cron = f"{now.minute} {now.hour} * * *"  # the next slot is tomorrow at this time
    moving = make(
        api, name="moving", cron_expr=cron, exclude_calendars=[cal["id"]], calendar_policy="next_allowed"
    )
    skipping = make(api, name="skipping", cron_expr=cron, exclude_calendars=[cal["id"]])
    other = make(api, name="other", cron_expr=cron)
    before = {s.name: s.next_run_at for s in Schedule.objects.all()}
    response = api.patch(
        f"/api/calendars/{cal['id']}/", {"rules": [{"date": tomorrow.isoformat()}]}, format="json"
    )
    assert response.status_code == 200
    after = {s.name: s.next_run_at for s in Schedule.objects.all()}
    assert after["moving"] == before["moving"] + timedelta(days=1)  # moved to the day after
    assert after["skipping"] == before["skipping"]  # still the slot: recorded skipped when it comes
    assert after["other"] == before["other"]
    records = ScheduleChange.objects.filter(action="calendar")
    assert sorted(r.schedule_id for r in records) == sorted([moving["id"], skipping["id"]])
    moved = records.get(schedule_id=moving["id"]).changes
    assert moved["next_run_at"]["new"] == after["moving"].isoformat()
    assert "closures" in moved["calendar"]["new"]
    assert other["id"] not in {r.schedule_id for r in records}


def test_dispatch__records_an_excluded_slot_skipped_with_the_calendars_name(api):
    cal = make_calendar(api, name="closed-today", rules=EVERY_DAY)
    schedule = make(api, name="daily", schedule_type="interval", interval_minutes=60, cron_expr="",
                    exclude_calendars=[cal["id"]])  # fmt: skip
    sql(
        "UPDATE schedules_schedule SET next_run_at = date_trunc('second', now()) - interval '5 seconds',"
        " claimed_by = %s, claimed_until = now() + interval '60 seconds' WHERE id = %s",
        [ME, schedule["id"]],
    )
    result = dispatch_claimed([schedule["id"]], claimant=ME, grace=timedelta(seconds=60), ttl=60.0)
    assert (result.dispatched, result.skipped) == (0, 1)
    run = ScheduledRun.objects.get(schedule_id=schedule["id"])
    assert run.status == "skipped"
    assert run.run_id is None
    assert run.error_summary == "excluded by calendar 'closed-today'"
    row = Schedule.objects.get(pk=schedule["id"])
    assert row.last_run_at == run.scheduled_for  # the high-water mark moves past the skipped slot
    assert row.next_run_at == run.scheduled_for + timedelta(hours=1)


def test_backfill__leaves_out_excluded_slots(api):
    cal = make_calendar(api, name="weekend", rules=[{"weekdays": ["sat", "sun"]}])
    schedule = make(api, exclude_calendars=[cal["id"]])
    response = api.post(
        f"/api/schedules/{schedule['id']}/backfill",
        {"start": "2026-01-01T00:00:00Z", "end": "2026-01-08T00:00:00Z"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["created"] == 5  # 1 January 2026 is a Thursday: Thu, Fri, Mon, Tue, Wed
    slots = ScheduledRun.objects.filter(schedule_id=schedule["id"]).values_list("scheduled_for", flat=True)
    assert sorted(s.weekday() for s in slots) == [0, 1, 2, 3, 4]
    assert timing.MAX_CALENDAR_DAYS > 366 * 8


def test_admin__calendars_are_saved_through_the_service_and_schedules_take_them(staff):
    from tests.support import admin_schedule_form

    form = {"name": "admin-cal", "timezone": "UTC", "rules": '[{"yearly": "02-30"}]', "holidays": "null"}
    response = staff.post("/admin/schedules/calendar/add/", form)
    assert response.status_code == 200
    assert "rules[0].yearly" in response.content.decode()
    assert not Calendar.objects.exists()
    response = staff.post(
        "/admin/schedules/calendar/add/", {**form, "rules": '[{"weekdays": ["sat", "sun"]}]'}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    calendar = Calendar.objects.get(name="admin-cal")
    assert calendar.rules == [{"weekdays": ["sat", "sun"]}]
    assert "(none)" not in staff.get(f"/admin/schedules/calendar/{calendar.pk}/change/").content.decode()

    data = admin_schedule_form(exclude_calendars=str(calendar.pk), calendar_policy="next_allowed")
    response = staff.post("/admin/schedules/schedule/add/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    schedule = Schedule.objects.get(name="admin-made")
    assert list(schedule.exclude_calendars.all()) == [calendar]
    assert schedule.calendar_policy == "next_allowed"
    # Editing the calendar through the admin recomputes and records, as through the API.
    response = staff.post(
        f"/admin/schedules/calendar/{calendar.pk}/change/", {**form, "rules": '[{"weekdays": ["mon"]}]'}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    record = ScheduleChange.objects.get(schedule_id=schedule.pk, action="calendar")
    assert record.source == "admin"


def test_a_calendar_edit__recomputes_in_batches_whatever_the_number_of_schedules(
    api, django_assert_max_num_queries, monkeypatch
):
    from schedules import calendar_service, services
    from tests.scheduler_support import sleep_job

    monkeypatch.setattr(calendar_service, "RECOMPUTE_BATCH", 25)
    calendar = calendar_service.create_calendar(name="many", rules=[])
    job = sleep_job()
    for i in range(60):
        services.create_schedule(
            name=f"s{i}", job=job, schedule_type="cron", cron_expr="0 9 * * *",
            exclude_calendars=[calendar], calendar_policy="next_allowed",
        )  # fmt: skip
    first = Schedule.objects.first().next_run_at
    # 3 batches of at most 25 rows: a handful of statements each, not one per schedule.
    with django_assert_max_num_queries(25):
        calendar_service.update_calendar(calendar, {"rules": [{"date": first.date().isoformat()}]})
    assert set(Schedule.objects.values_list("next_run_at", flat=True)) == {first + timedelta(days=1)}
    assert ScheduleChange.objects.filter(action="calendar").count() == 60


def test_backfill_with_next_allowed__creates_the_moved_runs(api):
    cal = make_calendar(api, name="weekend", rules=[{"weekdays": ["sat", "sun"]}])
    schedule = make(api, cron_expr="0 9 * * 6", exclude_calendars=[cal["id"]], calendar_policy="next_allowed")
    response = api.post(
        f"/api/schedules/{schedule['id']}/backfill",
        {"start": "2026-01-01T00:00:00Z", "end": "2026-01-20T00:00:00Z"},
        format="json",
    )
    assert response.status_code == 200, response.content
    slots = sorted(
        ScheduledRun.objects.filter(schedule_id=schedule["id"]).values_list("scheduled_for", flat=True)
    )
    # Saturdays 3, 10 and 17 January 2026, each moved to the Monday after.
    assert [s.isoformat() for s in slots] == [
        "2026-01-05T09:00:00+00:00", "2026-01-12T09:00:00+00:00", "2026-01-19T09:00:00+00:00"
    ]  # fmt: skip
