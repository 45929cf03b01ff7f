"""Calendars in the slot math (issue 33), by example and by property.

The properties compare the slot math with an oracle written from the words of docs/SCHEDULES.md,
"Calendars": a calendar names a day when a rule says so, read in the calendar's zone, or a minute when
a window (a cron, read by croniter.match) holds it; `exclude_calendars` rules out a slot a calendar
names, `only_calendars` every slot none of them names; `skip` leaves the allowed slots, `next_allowed`
moves a ruled-out slot to the same local time on the next allowed day (the first instant at or after
that wall time when it falls in a DST gap), unless the schedule's next own slot comes first. The
schedule's own slots come from `next_slot` (tested against its own oracle in test_timing.py).
"""

from __future__ import annotations

import calendar as stdlib_calendar
import dataclasses
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schedules import calendars, timing
from schedules.calendars import CalendarSpec, ics_rules, rules_errors, spec_from
from schedules.timing import ScheduleSpec

ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Sydney", "Asia/Kathmandu", "Pacific/Chatham"]
DAY_NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- The oracle ------------------------------------------------------------------------------------------


def oracle_names_day(rules: list[dict], extra: set, day: date) -> bool:
    if day in extra:
        return True
    for rule in rules:
        if "date" in rule and date.fromisoformat(rule["date"]) == day:
            return True
        if "start" in rule and date.fromisoformat(rule["start"]) <= day < date.fromisoformat(rule["end"]):
            return True
        if "yearly" in rule and f"{day.month:02d}-{day.day:02d}" == rule["yearly"]:
            return True
        if "weekdays" in rule and DAY_NAMES[day.weekday()] in rule["weekdays"]:
            return True
        if "nth_weekday" in rule:
            spec = rule["nth_weekday"]
            if day.month != spec["month"]:
                continue
            month_days = stdlib_calendar.monthrange(day.year, day.month)[1]
            same = [
                date(day.year, day.month, d)
                for d in range(1, month_days + 1)
                if DAY_NAMES[date(day.year, day.month, d).weekday()] == spec["weekday"]
            ]
            n = spec["n"]
            if (n > 0 and len(same) >= n and same[n - 1] == day) or (
                n < 0 and len(same) >= -n and same[n] == day
            ):
                return True
    return False


def oracle_names(calendar: dict, instant: datetime) -> bool:
    local = instant.astimezone(ZoneInfo(calendar["timezone"]))
    if oracle_names_day(calendar["rules"], calendar.get("extra", set()), local.date()):
        return True
    wall = local.replace(tzinfo=None, second=0, microsecond=0)
    return any("cron" in rule and croniter.match(rule["cron"], wall) for rule in calendar["rules"])


def oracle_allowed(exclude: list[dict], only: list[dict], instant: datetime) -> bool:
    if any(oracle_names(c, instant) for c in exclude):
        return False
    return not only or any(oracle_names(c, instant) for c in only)


def oracle_wall_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The first instant whose local time is at or after `wall` (the wall time itself when it exists)."""
    guess = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if guess.astimezone(zone).replace(tzinfo=None) == wall:
        return guess
    probe = guess - timedelta(hours=3)
    while probe.astimezone(zone).replace(tzinfo=None) < wall:
        probe += timedelta(minutes=1)
    # The first minute past the gap; the transition itself lies within that minute or on it.
    while (probe - timedelta(seconds=1)).astimezone(zone).replace(tzinfo=None) >= wall:
        probe -= timedelta(seconds=1)
    return probe


def oracle_runs(
    spec: ScheduleSpec, exclude: list[dict], only: list[dict], *, start: datetime, end: datetime
) -> list[datetime]:
    """The run times in (start, end], from the schedule's own slots after `start`."""
    base = timing.ScheduleSpec(spec.schedule_type, spec.interval_minutes, spec.cron_expr, spec.timezone)
    slots = []
    slot = timing.next_slot(base, after=start)
    if spec.schedule_type == "interval" and spec.calendar_policy == "next_allowed":
        # With next_allowed an interval keeps to its grid from the Unix epoch (no start_at here).
        step = timedelta(minutes=spec.interval_minutes)
        epoch = utc(1970, 1, 1)
        slot = epoch + step * ((start - epoch) // step + 1)
    while slot is not None and slot <= end + timedelta(days=60):
        slots.append(slot)
        slot = timing.next_slot(base, after=slot)
    runs = []
    zone = ZoneInfo(spec.timezone)
    for index, slot in enumerate(slots[:-1]):
        if oracle_allowed(exclude, only, slot):
            runs.append(slot)
            continue
        if spec.calendar_policy != "next_allowed":
            continue
        wall = slot.astimezone(zone).replace(tzinfo=None)
        for days in range(1, 400):
            moved = oracle_wall_instant(wall + timedelta(days=days), zone)
            if moved >= slots[index + 1]:
                break
            if oracle_allowed(exclude, only, moved):
                runs.append(moved)
                break
    return sorted(t for t in set(runs) if t <= end)


def implementation_runs(spec: ScheduleSpec, *, start: datetime, end: datetime) -> list[datetime]:
    runs = []
    current = timing.first_run(spec, now=start)
    if not spec.moves:
        current = timing.next_allowed_slot(spec, current)
    while current is not None and current <= end:
        runs.append(current)
        if spec.moves:
            current = timing.next_run_time(spec, after=current)
        else:
            current = timing.next_allowed_slot(spec, timing.next_slot(spec, after=current))
    return runs


# --- Strategies ------------------------------------------------------------------------------------------

CRONS = ["0 9 * * *", "30 2 * * *", "0 * * * *", "30 9 * * 6", "15 1,13 * * *", "0 23 * * 1-5", "45 0 * * 0"]
INTERVALS = [60, 90, 720, 1440, 2880]
WINDOWS = ["* 22-23,0-1 * * *", "* 0-6 * * *", "* 12 * * 3", "* * * * 6", "0-29 * * * *"]


@st.composite
def rule_sets(draw: st.DrawFn, *, around: date) -> list[dict]:
    kinds = draw(
        st.lists(
            st.sampled_from(["date", "range", "yearly", "nth", "weekdays", "cron"]), min_size=1, max_size=3
        )
    )
    rules: list[dict] = []
    for kind in kinds:
        offset = draw(st.integers(-3, 20))
        day = around + timedelta(days=offset)
        if kind == "date":
            rules.append({"date": day.isoformat()})
        elif kind == "range":
            rules.append(
                {"start": day.isoformat(), "end": (day + timedelta(days=draw(st.integers(1, 9)))).isoformat()}
            )
        elif kind == "yearly":
            rules.append(
                {"yearly": draw(st.sampled_from(["02-29", day.strftime("%m-%d"), "12-25", "01-01"]))}
            )
        elif kind == "nth":
            n = draw(st.sampled_from([1, 2, 4, -1]))
            rules.append(
                {"nth_weekday": {"month": day.month, "weekday": draw(st.sampled_from(DAY_NAMES)), "n": n}}
            )
        elif kind == "weekdays":
            rules.append(
                {"weekdays": draw(st.lists(st.sampled_from(DAY_NAMES), min_size=1, max_size=3, unique=True))}
            )
        else:
            rules.append({"cron": draw(st.sampled_from(WINDOWS))})
    return rules


# Around DST changes in both hemispheres, and a leap day.
STARTS = [
    utc(2026, 3, 7, 12),
    utc(2026, 10, 24, 6),
    utc(2026, 4, 3, 12),
    utc(2028, 2, 20, 12),
    utc(2026, 12, 20, 3),
]


@st.composite
def scenarios(draw: st.DrawFn):
    start = draw(st.sampled_from(STARTS)) + timedelta(minutes=draw(st.integers(0, 3000)))
    around = start.date()
    exclude = [
        {"name": f"x{i}", "timezone": draw(st.sampled_from(ZONES)), "rules": draw(rule_sets(around=around))}
        for i in range(draw(st.integers(0, 2)))
    ]
    only = [
        {"name": f"o{i}", "timezone": draw(st.sampled_from(ZONES)), "rules": draw(rule_sets(around=around))}
        for i in range(draw(st.integers(0 if exclude else 1, 1)))
    ]
    timing_fields = draw(
        st.sampled_from(CRONS).map(lambda expr: {"schedule_type": "cron", "cron_expr": expr})
        | st.sampled_from(INTERVALS).map(
            lambda minutes: {"schedule_type": "interval", "interval_minutes": minutes}
        )
    )
    spec = ScheduleSpec(
        **timing_fields,
        timezone=draw(st.sampled_from(ZONES)),
        exclude=tuple(spec_from(c["name"], c["timezone"], c["rules"], None) for c in exclude),
        only=tuple(spec_from(c["name"], c["timezone"], c["rules"], None) for c in only),
        calendar_policy=draw(st.sampled_from(["skip", "next_allowed"])),
    )
    return spec, exclude, only, start


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios())
def test_run_times_with_calendars__match_the_oracle(scenario) -> None:
    spec, exclude, only, start = scenario
    end = start + timedelta(days=21)
    assert implementation_runs(spec, start=start, end=end) == oracle_runs(
        spec, exclude, only, start=start, end=end
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    zone=st.sampled_from(ZONES),
    policy=st.sampled_from(["skip", "next_allowed"]),
    year=st.integers(2025, 2040),
)
def test_a_yearly_rule_on_feb_29__rules_out_leap_days_only(zone: str, policy: str, year: int) -> None:
    leap = spec_from("leap-day", zone, [{"yearly": "02-29"}], None)
    spec = ScheduleSpec(schedule_type="cron", cron_expr="0 9 * 2,3 *", timezone=zone, exclude=(leap,),
                        calendar_policy=policy)  # fmt: skip
    start, end = utc(year, 2, 20), utc(year, 3, 5)
    runs = implementation_runs(spec, start=start, end=end)
    assert runs == oracle_runs(
        spec, [{"timezone": zone, "rules": [{"yearly": "02-29"}]}], [], start=start, end=end
    )
    leap_year = stdlib_calendar.isleap(year)
    local_days = [t.astimezone(ZoneInfo(zone)).date() for t in runs]
    if leap_year:
        assert date(year, 2, 29) not in local_days
    assert len(runs) == len(set(local_days))  # one run a day: a moved run merges into the next day's


def test_next_allowed__moves_a_weekly_run_to_the_next_allowed_day_across_dst() -> None:
    # Saturdays 02:30 in New York; 2027-03-13 is excluded and the next day's 02:30 does not exist
    # (spring forward): the run moves to 03:00 EDT, the first instant after the gap.
    holiday = spec_from("closed", "America/New_York", [{"date": "2027-03-13"}], None)
    spec = ScheduleSpec(schedule_type="cron", cron_expr="30 2 * * 6", timezone="America/New_York",
                        exclude=(holiday,), calendar_policy="next_allowed")  # fmt: skip
    assert timing.first_run(spec, now=utc(2027, 3, 10)) == utc(2027, 3, 14, 7, 0)  # 03:00 EDT
    skip = dataclasses.replace(spec, calendar_policy="skip")
    assert timing.first_run(skip, now=utc(2027, 3, 10)) == utc(2027, 3, 13, 7, 30)  # still the slot
    assert timing.calendar_verdict(skip, utc(2027, 3, 13, 7, 30)) == "excluded by calendar 'closed'"
    assert timing.calendar_runs(skip, start=utc(2027, 3, 13, 7, 30), limit=1) == [utc(2027, 3, 20, 6, 30)]


def test_a_window_spanning_midnight__is_read_in_the_calendars_zone() -> None:
    night = spec_from("night", "Europe/Berlin", [{"cron": "* 22-23,0-5 * * *"}], None)
    spec = ScheduleSpec(schedule_type="cron", cron_expr="0 * * * *", timezone="UTC", exclude=(night,))
    runs = timing.calendar_runs(spec, start=utc(2027, 1, 4, 20), limit=3)
    # 21:00 UTC is 22:00 in Berlin: ruled out until 05:00 UTC (06:00 Berlin).
    assert runs == [utc(2027, 1, 4, 20), utc(2027, 1, 5, 5), utc(2027, 1, 5, 6)]


def test_a_calendar_ruling_out_everything__leaves_no_next_run_without_searching_forever() -> None:
    everything = spec_from("all", "UTC", [{"cron": "* * * * *"}], None)
    nights = spec_from("minutes", "UTC", [{"cron": "0-59 0-23 * * *"}], None)
    for calendar in (everything, nights):
        spec = ScheduleSpec(schedule_type="cron", cron_expr="*/5 * * * *", exclude=(calendar,),
                            calendar_policy="next_allowed")  # fmt: skip
        assert timing.first_run(spec, now=utc(2027, 1, 1)) is None
        skipping = dataclasses.replace(spec, calendar_policy="skip")
        assert timing.calendar_runs(skipping, start=utc(2027, 1, 1, 0, 5), limit=5) == []
    weekdays = spec_from("weekdays", "UTC", [{"weekdays": ["mon", "tue", "wed", "thu", "fri"]}], None)
    never = ScheduleSpec(
        schedule_type="cron", cron_expr="0 9 * * 6", only=(weekdays,), calendar_policy="skip"
    )
    assert timing.calendar_runs(never, start=utc(2027, 1, 2, 9), limit=5) == []


def test_only_calendars__keep_business_days_and_interval_schedules_stay_on_their_grid() -> None:
    business = spec_from(
        "business", "America/New_York", [{"weekdays": ["mon", "tue", "wed", "thu", "fri"]}], None
    )
    holidays = spec_from("nyse", "America/New_York", [{"date": "2027-01-18"}], None)
    spec = ScheduleSpec(schedule_type="interval", interval_minutes=720, only=(business,), exclude=(holidays,),
                        calendar_policy="next_allowed", start_at=utc(2027, 1, 1))  # fmt: skip
    runs = timing.calendar_runs(spec, start=timing.first_run(spec, now=utc(2027, 1, 15, 13)), limit=3)
    # 2027-01-16 00:00 UTC is Friday 19:00 in New York: allowed. Saturday to Monday (MLK day) are ruled
    # out, and each of their slots' moved run comes after the schedule's next slot: they merge into
    # Tuesday's runs, 07:00 and 19:00 New York time (12:00 and 00:00 UTC), each once.
    assert runs == [utc(2027, 1, 16, 0), utc(2027, 1, 19, 12), utc(2027, 1, 20, 0)]


# --- Rules, holidays, iCalendar --------------------------------------------------------------------------


def test_rules__name_their_days() -> None:
    rules = [
        {"date": "2026-12-24"},
        {"start": "2026-12-28", "end": "2026-12-30"},
        {"yearly": "12-25"},
        {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}},
        {"nth_weekday": {"month": 5, "weekday": "mon", "n": -1}},
        {"weekdays": ["sun"]},
    ]
    cal = CalendarSpec(name="c", rules=calendars.freeze(rules))
    assert cal.days_between(date(2026, 11, 1), date(2027, 1, 1)) == [
        date(2026, 11, 1), date(2026, 11, 8), date(2026, 11, 15), date(2026, 11, 22), date(2026, 11, 26),
        date(2026, 11, 29), date(2026, 12, 6), date(2026, 12, 13), date(2026, 12, 20), date(2026, 12, 24),
        date(2026, 12, 25), date(2026, 12, 27), date(2026, 12, 28), date(2026, 12, 29),
    ]  # fmt: skip
    assert cal.day_matches(date(2027, 5, 31))  # the last Monday of May 2027
    assert not cal.day_matches(date(2027, 5, 24))


def test_rules_errors__name_the_rule_and_key() -> None:
    bad_n = {"nth_weekday": {"month": 11, "weekday": "thu", "n": 0}}
    assert rules_errors([{"date": "2026-12-25"}, {"weekdays": ["sat"]}, bad_n]) == {
        "rules[2].nth_weekday.n": ["Must be 1 to 5 (the nth), or -1 to -5 (-1: the last)."]
    }
    assert set(rules_errors([{"start": "2026-12-25", "end": "2026-12-25"}])) == {"rules[0].end"}
    assert set(rules_errors([{"yearly": "02-30"}])) == {"rules[0].yearly"}
    assert set(rules_errors([{"weekdays": ["sat", "funday"]}])) == {"rules[0].weekdays[1]"}
    assert set(rules_errors([{"cron": "61 * * * *"}])) == {"rules[0].cron"}
    assert set(rules_errors([{"date": "2026-12-25", "yearly": "12-25"}])) == {"rules[0]"}
    assert set(rules_errors("weekends")) == {"rules"}
    assert rules_errors([{"yearly": "02-29"}, {"cron": "@daily"}]) == {}


def test_holidays__come_from_the_holidays_package() -> None:
    nyse = spec_from("nyse", "America/New_York", [], {"market": "NYSE", "years": [2027]})
    assert nyse.day_matches(date(2027, 11, 25))  # Thanksgiving
    assert nyse.day_matches(date(2027, 3, 26))  # Good Friday: a market holiday, not a federal one
    assert not nyse.day_matches(date(2027, 3, 29))
    errors = calendars.holidays_errors({"country": "XX", "years": [2027]})
    assert set(errors) == {"holidays.country"}
    assert set(calendars.holidays_errors({"country": "US", "market": "NYSE", "years": [2027]})) == {
        "holidays"
    }
    assert set(calendars.holidays_errors({"country": "US", "subdiv": "ZZ", "years": [2027]})) == {
        "holidays.subdiv"
    }
    assert set(calendars.holidays_errors({"market": "NYSE", "years": []})) == {"holidays.years"}


ICS = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//test//EN
BEGIN:VEVENT
UID:1
DTSTART;VALUE=DATE:20271224
DTEND;VALUE=DATE:20271227
SUMMARY:Christmas break
END:VEVENT
BEGIN:VEVENT
UID:2
DTSTART;VALUE=DATE:20270704
SUMMARY:Independence Day
RRULE:FREQ=YEARLY
END:VEVENT
BEGIN:VEVENT
UID:3
DTSTART:20270301T230000Z
DTEND:20270302T010000Z
SUMMARY:Maintenance
END:VEVENT
END:VCALENDAR
"""


def test_ics_rules__turn_events_into_days() -> None:
    assert ics_rules(ICS, timezone="Europe/Berlin") == [
        {"start": "2027-12-24", "end": "2027-12-27"},
        {"yearly": "07-04"},
        {"date": "2027-03-02"},
    ]
    # In New York the maintenance touches 1 March only (18:00 to 20:00 local).
    assert ics_rules(ICS, timezone="America/New_York")[2] == {"date": "2027-03-01"}
    with pytest.raises(calendars.IcsError):
        ics_rules("not a calendar", timezone="UTC")


def test_window_matches__agrees_with_croniter() -> None:
    start = datetime(2027, 1, 1)
    for expr in [*WINDOWS, "0 9 L * *", "* * * * 1#2", "*/5 * 1-5 * 7", "* * 13 * 5"]:
        for minutes in range(0, 60 * 24 * 400, 97):
            wall = start + timedelta(minutes=minutes)
            assert calendars.window_matches(expr, wall) == croniter.match(expr, wall), (expr, wall)


def test_plan_slots__decide_run_times_with_next_allowed_and_skips_naming_the_calendar() -> None:
    from schedules.slots import plan_slots

    weekend = spec_from("weekend", "UTC", [{"weekdays": ["sat", "sun"]}], None)
    moving = ScheduleSpec(schedule_type="cron", cron_expr="0 9 * * *", exclude=(weekend,),
                          calendar_policy="next_allowed")  # fmt: skip
    friday, monday = utc(2027, 1, 8, 9), utc(2027, 1, 11, 9)
    common = {"overlap_policy": "allow", "unfinished": 0, "grace": timedelta(days=5), "last_run_at": None,
              "now": monday + timedelta(seconds=30)}  # fmt: skip
    plan = plan_slots(moving, next_run_at=friday, misfire_policy="run_all",
                      **common)  # fmt: skip
    assert [(d.slot, d.dispatch) for d in plan.decisions] == [(friday, True), (monday, True)]
    assert plan.next_run_at == utc(2027, 1, 12, 9)
    cut = plan_slots(moving, next_run_at=friday, misfire_policy="run_all",
                     max_slots=1, **common)  # fmt: skip
    assert [d.slot for d in cut.decisions] == [friday]
    assert cut.next_run_at == monday  # the next run time, not Saturday's ruled-out slot
    skipping = dataclasses.replace(moving, calendar_policy="skip")
    plan = plan_slots(skipping, next_run_at=friday, misfire_policy="run_all",
                      **common)  # fmt: skip
    assert [(d.slot.day, d.dispatch, d.reason) for d in plan.decisions] == [
        (8, True, ""),
        (9, False, "excluded by calendar 'weekend'"),
        (10, False, "excluded by calendar 'weekend'"),
        (11, True, ""),
    ]
