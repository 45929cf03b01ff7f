"""The dashboard's calendar view (issue 33.5): upcoming runs per hour (week) or day (month) in the viewer's
zone equal a brute-force enumeration of `upcoming_runs`, a calendar's excluded day is left out and named,
past runs are counted by status, the label and job filters apply, bad parameters are a 400 naming them, and
only staff and viewers see it."""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.utils import timezone

from orchestrator.models import Job
from schedules import calendar_service, services
from schedules.labels import parse_selector
from schedules.models import Schedule, ScheduledRun

pytestmark = pytest.mark.django_db

CELL = re.compile(
    r'<div class="calcell[^"]*" data-cell="([^"]+)" data-total="(\d+)"(?: data-plus)?>(.*?)</div>', re.S
)
BADGE = re.compile(r'data-status="(\w+)" title="[^"]*">(\d+)<')


def cells(html: str) -> dict[str, tuple[int, dict[str, int]]]:
    return {
        key: (int(total), {status: int(n) for status, n in BADGE.findall(body)})
        for key, total, body in CELL.findall(html)
    }


def upcoming_totals(html: str) -> dict[str, int]:
    return {key: total for key, (total, _) in cells(html).items() if total}


def oracle(schedules, start: datetime, end: datetime, zone: str, hourly: bool) -> dict[str, int]:
    """Every run time upcoming_runs gives, bucketed by local hour or day: the view's answer, slot by slot."""
    tz, now, out = ZoneInfo(zone), timezone.now(), Counter()
    for schedule in schedules:
        n = 64
        while len(times := services.upcoming_runs(schedule, n)) == n and times[-1] < end:
            n *= 4  # until past the window's end
        for t in times:
            if max(start, now) <= t < end:
                local = t.astimezone(tz)
                out[f"{local:%Y-%m-%dT%H}" if hourly else f"{local:%Y-%m-%d}"] += 1
    return dict(out)


def next_monday(weeks: int = 1) -> date:
    today = timezone.now().date()
    return today - timedelta(days=today.weekday()) + timedelta(weeks=weeks)


@pytest.fixture
def fleet():
    sleep, triage = Job.objects.get(key="sleep"), Job.objects.get(key="log_triage")
    offsite = next_monday() + timedelta(days=2)
    calendar = calendar_service.create_calendar(
        name="team-offsite", timezone="Europe/Berlin", rules=[{"date": offsite.isoformat()}]
    )
    made = [
        services.create_schedule(
            name="pay-every-30", job=sleep, schedule_type="interval", interval_minutes=30,
            labels={"team": "payments"}, exclude_calendars=[calendar],
        ),
        services.create_schedule(
            name="pay-0915-berlin", job=triage, schedule_type="cron", cron_expr="15 9 * * 1-5",
            timezone="Europe/Berlin", labels={"team": "payments"}, exclude_calendars=[calendar],
        ),
        services.create_schedule(
            name="risk-odd-hours", job=triage, schedule_type="cron", cron_expr="45 1-23/2 * * *",
            timezone="America/New_York", labels={"team": "risk"},
        ),
        services.create_schedule(
            name="risk-every-7", job=sleep, schedule_type="interval", interval_minutes=7,
            labels={"team": "risk"},
        ),
    ]  # fmt: skip
    return {"calendar": calendar, "offsite": offsite, "schedules": made}


def window(first: date, days: int, zone: str) -> tuple[datetime, datetime]:
    tz = ZoneInfo(zone)
    return (
        datetime.combine(first, datetime.min.time(), tzinfo=tz).astimezone(UTC),
        datetime.combine(first + timedelta(days=days), datetime.min.time(), tzinfo=tz).astimezone(UTC),
    )


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
def test_week__counts_per_hour_equal_upcoming_runs_and_the_excluded_day_is_named(staff, fleet, zone):
    monday = next_monday()
    response = staff.get("/dashboard/calendar", {"view": "week", "start": monday.isoformat(), "tz": zone})
    assert response.status_code == 200
    html = response.content.decode()
    start, end = window(monday, 7, zone)
    expected = oracle(Schedule.objects.all(), start, end, zone, hourly=True)
    assert upcoming_totals(html) == expected
    assert sum(expected.values()) > 1500  # every 7 minutes over a week, and the others
    offsite = fleet["offsite"].isoformat()
    assert f'data-day="{offsite}">' in html
    assert re.search(
        rf'data-day="{offsite}">[^<]*<br><span class="excluded" data-excluded="team-offsite"', html
    )
    # The offsite day (in Berlin) has none of the payments runs: every-30 would have 48.
    berlin = ZoneInfo("Europe/Berlin")
    pay = Schedule.objects.get(name="pay-every-30")
    times = services.upcoming_runs(pay, 1000)
    assert not [t for t in times if t.astimezone(berlin).date() == fleet["offsite"]]


def test_month__counts_per_day_with_label_and_job_filters(staff, fleet):
    first = (timezone.now().date().replace(day=1) + timedelta(days=32)).replace(day=1)  # next month
    days = ((first + timedelta(days=32)).replace(day=1) - first).days
    start, end = window(first, days, "Europe/Berlin")
    base = {"view": "month", "start": first.isoformat(), "tz": "Europe/Berlin"}
    everything = upcoming_totals(staff.get("/dashboard/calendar", base).content.decode())
    assert everything == oracle(Schedule.objects.all(), start, end, "Europe/Berlin", hourly=False)

    payments = staff.get("/dashboard/calendar", {**base, "label": "team=payments"}).content.decode()
    chosen = Schedule.objects.filter(parse_selector(["team=payments"]))
    assert {s.name for s in chosen} == {"pay-every-30", "pay-0915-berlin"}
    assert upcoming_totals(payments) == oracle(chosen, start, end, "Europe/Berlin", hourly=False)
    triage_risk = staff.get("/dashboard/calendar", {**base, "label": "team!=payments", "job": "log_triage"})
    assert upcoming_totals(triage_risk.content.decode()) == oracle(
        Schedule.objects.filter(name="risk-odd-hours"), start, end, "Europe/Berlin", hourly=False
    )


def test_past_runs__counted_by_status_per_hour_in_the_viewers_zone_and_filtered(staff, fleet):
    pay, risk = fleet["schedules"][0], fleet["schedules"][2]
    monday = next_monday(weeks=-1)
    paris = ZoneInfo("Europe/Paris")
    at = datetime.combine(monday + timedelta(days=1), datetime.min.time(), tzinfo=paris).replace(hour=10)
    for minute, status, schedule in [
        (0, "succeeded", pay), (10, "succeeded", pay), (20, "failed", pay), (30, "skipped", pay),
        (40, "succeeded", risk), (59, "failed", risk),
    ]:  # fmt: skip
        ScheduledRun.objects.create(
            schedule=schedule, scheduled_for=at + timedelta(minutes=minute), status=status
        )
    ScheduledRun.objects.create(schedule=pay, scheduled_for=at + timedelta(hours=1), status="succeeded")
    params = {"view": "week", "start": monday.isoformat(), "tz": "Europe/Paris"}
    html = staff.get("/dashboard/calendar", params).content.decode()
    key = f"{at:%Y-%m-%dT}10"
    assert cells(html)[key] == (0, {"succeeded": 3, "failed": 2, "skipped": 1})
    assert cells(html)[f"{at:%Y-%m-%dT}11"][1] == {"succeeded": 1}
    # Read in UTC the same runs fall an hour (winter) or two (summer) earlier.
    utc_hour = at.astimezone(UTC).hour
    in_utc = cells(staff.get("/dashboard/calendar", {**params, "tz": "UTC"}).content.decode())
    assert in_utc[f"{at.astimezone(UTC):%Y-%m-%dT}{utc_hour:02d}"][1] == {
        "succeeded": 3,
        "failed": 2,
        "skipped": 1,
    }
    risk_only = cells(staff.get("/dashboard/calendar", {**params, "label": "team=risk"}).content.decode())
    assert risk_only[key][1] == {"succeeded": 1, "failed": 1}
    sleep_only = cells(staff.get("/dashboard/calendar", {**params, "job": "sleep"}).content.decode())
    assert sleep_only[key][1] == {"succeeded": 2, "failed": 1, "skipped": 1}
    month = cells(
        staff.get(
            "/dashboard/calendar", {**params, "view": "month", "start": f"{at:%Y-%m-%d}"}
        ).content.decode()
    )
    assert month[f"{at:%Y-%m-%d}"][1] == {"succeeded": 4, "failed": 2, "skipped": 1}


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"view": "year"}, "view must be week or month"),
        ({"start": "2026-13-01"}, "start must be a date"),
        ({"start": "0001-01-01"}, "start must lie between"),
        ({"tz": "Mars/Olympus"}, "tz: unknown timezone"),
        ({"label": "=x"}, "label:"),
        ({"label": "Bad Key=x"}, "label:"),
        ({"job": "no-such-job"}, "job: no job"),
    ],
)
def test_bad_parameters__a_400_naming_the_parameter(staff, params, named):
    response = staff.get("/dashboard/calendar", params)
    assert response.status_code == 400
    assert named in response.content.decode()


def test_only_staff_and_viewers(client, django_user_model):
    response = client.get("/dashboard/calendar")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    user = django_user_model.objects.create_user("plain", password="pw-plain-123")
    client.force_login(user)
    assert client.get("/dashboard/calendar").status_code == 403


def test_group_by__a_cell_breaks_its_count_down_by_job_or_by_a_labels_value(staff, fleet):
    tuesday = next_monday() + timedelta(days=1)
    params = {"view": "month", "start": tuesday.isoformat(), "tz": "UTC"}
    start, end = window(tuesday, 1, "UTC")
    group = re.compile(r'data-group="([^"]+)" data-n="(\d+)"')

    def breakdown(html: str) -> dict[str, int]:
        body = re.search(rf'data-cell="{tuesday:%Y-%m-%d}"[^>]*>(.*?)</div>', html, re.S)[1]
        return {name: int(n) for name, n in group.findall(body)}

    def expected(**filters) -> int:
        return sum(oracle(Schedule.objects.filter(**filters), start, end, "UTC", hourly=False).values())

    by_job = breakdown(staff.get("/dashboard/calendar", params).content.decode())
    assert by_job == {"log_triage": expected(job__key="log_triage"), "sleep": expected(job__key="sleep")}
    by_team = breakdown(
        staff.get("/dashboard/calendar", {**params, "group_by": "label:team"}).content.decode()
    )
    assert by_team == {"payments": expected(labels__team="payments"), "risk": expected(labels__team="risk")}
    assert staff.get("/dashboard/calendar", {**params, "group_by": "team"}).status_code == 400


def test_week__schedules_counted_together_and_one_by_one_equal_upcoming_runs(staff):
    """At scale most schedules are counted in groups (one GROUP BY row per timing, calendars and job);
    the rest one by one. Both kinds side by side, read in UTC and in New York, give `upcoming_runs`'
    counts: intervals sharing a length with different next runs, a cron shared by two jobs and one with
    `H`, calendars, and every case that goes one by one (jitter, max_runs, an end inside the week, a start
    days ahead, next_allowed, a calendar window)."""
    from monitoring import calendar_view
    from schedules import runcounts

    sleep, triage = Job.objects.get(key="sleep"), Job.objects.get(key="log_triage")
    weekend = calendar_service.create_calendar(name="weekend", rules=[{"weekdays": ["sat", "sun"]}])
    nights = calendar_service.create_calendar(name="nights", rules=[{"cron": "* 0-5 * * *"}])
    monday = next_monday()
    soon, later = timezone.now() + timedelta(days=3), timezone.now() + timedelta(days=10)
    together = []
    for index, minutes in enumerate([10, 10, 10, 25, 25, 60]):
        together.append(
            dict(schedule_type="interval", interval_minutes=minutes, job=sleep if index % 2 else triage)
        )
    together += [
        dict(schedule_type="interval", interval_minutes=25, exclude_calendars=[weekend], job=sleep),
        dict(schedule_type="cron", cron_expr="*/15 9-17 * * 1-5", timezone="America/New_York", job=sleep),
        dict(schedule_type="cron", cron_expr="*/15 9-17 * * 1-5", timezone="America/New_York", job=triage),
        dict(schedule_type="cron", cron_expr="H */2 * * *", job=triage),
        dict(
            schedule_type="cron",
            cron_expr="30 1 * * *",
            timezone="Europe/Berlin",
            exclude_calendars=[weekend],
        ),
        dict(schedule_type="interval", interval_minutes=60, end_at=later, job=triage),
    ]
    alone = [
        dict(schedule_type="interval", interval_minutes=30, jitter_seconds=600),
        dict(schedule_type="cron", cron_expr="0 * * * *", max_runs=40),
        dict(schedule_type="interval", interval_minutes=45, end_at=soon),
        dict(schedule_type="interval", interval_minutes=20, start_at=soon),
        dict(
            schedule_type="cron",
            cron_expr="0 12 * * *",
            exclude_calendars=[weekend],
            calendar_policy="next_allowed",
        ),
        dict(schedule_type="interval", interval_minutes=40, exclude_calendars=[nights]),
    ]
    for index, fields in enumerate(together + alone):
        services.create_schedule(name=f"mix-{index}", **{"job": sleep, **fields})
    # Two of the 10-minute ones run next at different phases; one is overdue by a few minutes.
    Schedule.objects.filter(name="mix-1").update(
        next_run_at=timezone.now() + timedelta(minutes=7, seconds=13)
    )
    Schedule.objects.filter(name="mix-2").update(next_run_at=timezone.now() - timedelta(minutes=4))

    for zone in ("UTC", "America/New_York"):
        window_ = runcounts.buckets(zone, monday, 7, hourly=True)
        items, shared, _ = calendar_view.load(
            Schedule.objects.all(), "job", window_, runcounts.since(window_, timezone.now())
        )
        assert len(items) == len(alone)
        assert sum(len(group.values) for group in shared) == len(together)
        html = staff.get("/dashboard/calendar", {"view": "week", "start": monday.isoformat(), "tz": zone})
        start, end = window(monday, 7, zone)
        assert upcoming_totals(html.content.decode()) == oracle(
            Schedule.objects.all(), start, end, zone, True
        )


def test_days_outside_an_only_calendar_are_named_and_have_no_runs(staff):
    """A schedule that runs only on a calendar's days: the days the calendar does not name carry
    `outside: <name>` in their heading (week) or cell (month), and count none of its runs."""
    sleep = Job.objects.get(key="sleep")
    weekdays = [{"weekdays": ["mon", "tue", "wed", "thu", "fri"]}]
    business = calendar_service.create_calendar(name="business", rules=weekdays)
    services.create_schedule(
        name="weekdays-only",
        job=sleep,
        schedule_type="interval",
        interval_minutes=60,
        only_calendars=[business],
    )
    monday = next_monday()
    html = staff.get("/dashboard/calendar", {"view": "week", "start": monday.isoformat()}).content.decode()
    heading = re.compile(r'data-day="([\d-]+)">[^<]*(?:<br><span class="excluded" [^>]*>[^<]*</span>)*')
    outside = {
        match.group(1) for match in heading.finditer(html) if 'data-outside="business"' in match.group(0)
    }
    weekend = {(monday + timedelta(days=5)).isoformat(), (monday + timedelta(days=6)).isoformat()}
    assert outside == weekend
    per_day = Counter()
    for key, total in upcoming_totals(html).items():
        per_day[key[:10]] += total
    assert len(per_day) == 5
    assert not set(per_day) & weekend
    first = (timezone.now().date().replace(day=1) + timedelta(days=32)).replace(day=1)
    month = staff.get("/dashboard/calendar", {"view": "month", "start": first.isoformat()}).content.decode()
    cell = re.compile(r'data-day="([\d-]+)">\d+ <span class="excluded" data-outside="business"')
    marked = {date.fromisoformat(day) for day in cell.findall(month)}
    days = [first + timedelta(days=i) for i in range(31) if (first + timedelta(days=i)).month == first.month]
    assert marked == {day for day in days if day.weekday() >= 5}


def test_past__a_slot_counts_once_when_it_settles_and_stays_counted_after_compaction_and_pruning(staff):
    """The past comes from SlotCount, kept by triggers: a slot shows as queued, then running, then once
    as succeeded (not also as running); a slot inserted settled (skipped) counts at once; compaction
    folds the rows and changes no count; deleting the history rows (retention) leaves the counts, as
    /metrics' totals; the label filter reads the labels the schedule had when its slot settled."""
    from monitoring.metrics import compact_totals
    from monitoring.models import SlotCount

    sleep = Job.objects.get(key="sleep")
    schedule = services.create_schedule(
        name="hourly", job=sleep, schedule_type="interval", interval_minutes=60, labels={"team": "ops"}
    )
    monday = next_monday(weeks=-1)
    at = datetime.combine(monday + timedelta(days=2), datetime.min.time(), tzinfo=UTC).replace(hour=5)
    params = {"view": "week", "start": monday.isoformat(), "tz": "UTC"}
    key = f"{at:%Y-%m-%dT%H}"

    def statuses(**extra) -> dict:
        return cells(staff.get("/dashboard/calendar", {**params, **extra}).content.decode())[key][1]

    slots = [
        ScheduledRun.objects.create(
            schedule=schedule, scheduled_for=at + timedelta(minutes=m), status="queued"
        )
        for m in (0, 5, 20, 40)
    ]
    ScheduledRun.objects.create(schedule=schedule, scheduled_for=at + timedelta(minutes=50), status="skipped")
    assert statuses() == {"queued": 4, "skipped": 1}
    for slot in slots:
        ScheduledRun.objects.filter(pk=slot.pk).update(status="running")
    assert statuses() == {"running": 4, "skipped": 1}
    for slot in slots[:2]:  # one quarter hour: two rows of one key, for compaction to fold
        ScheduledRun.objects.filter(pk=slot.pk).update(status="succeeded")
    ScheduledRun.objects.filter(pk=slots[2].pk).update(status="failed")
    ScheduledRun.objects.filter(pk=slots[2].pk).update(error_summary="a later edit counts nothing")
    assert statuses() == {"succeeded": 2, "failed": 1, "running": 1, "skipped": 1}
    Schedule.objects.filter(pk=schedule.pk).update(labels={"team": "payments"})
    ScheduledRun.objects.filter(pk=slots[3].pk).update(status="succeeded")
    assert statuses() == {"succeeded": 3, "failed": 1, "skipped": 1}
    assert statuses(label="team=ops") == {"succeeded": 2, "failed": 1, "skipped": 1}
    assert statuses(label="team=payments") == {"succeeded": 1}

    rows = SlotCount.objects.count()
    compact_totals()
    assert SlotCount.objects.count() == rows - 1
    assert statuses() == {"succeeded": 3, "failed": 1, "skipped": 1}
    ScheduledRun.objects.filter(schedule=schedule).delete()
    assert statuses() == {"succeeded": 3, "failed": 1, "skipped": 1}


def test_slot_counts_older_than_the_history_age_rule_are_pruned(settings):
    """The slot counts carry their quarter hour, so they would grow for ever: after compaction, those
    older than HISTORY_KEEP_DAYS go (in batches), newer ones stay; HISTORY_KEEP_DAYS=0 keeps all."""
    from monitoring import metrics
    from monitoring.models import SlotCount

    now = timezone.now()
    for days in (45, 31, 29, 1):
        SlotCount.objects.create(
            quarter=now - timedelta(days=days), job_id=1, labels={}, status="failed", slots=2
        )
    settings.HISTORY_KEEP_DAYS = 0
    assert metrics.prune_slot_counts() == 0
    settings.HISTORY_KEEP_DAYS = 30
    assert metrics.prune_slot_counts() == 2
    left = sorted((now - row.quarter).days for row in SlotCount.objects.all())
    assert left == [1, 29]
