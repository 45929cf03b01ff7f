"""Slot math against DESIGN.md 6.3, by example and by property.

The properties compare `next_slot` with a brute-force oracle that walks every UTC minute and decides
from first principles whether the schedule fires there. The two share nothing but the cron fields.
"""

from __future__ import annotations

import itertools
from collections import deque
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schedules.timing import (
    ScheduleSpec,
    describe,
    missed_slots,
    next_slot,
    prev_slot,
    split_due,
    upcoming,
    validate_cron_expr,
    validate_timezone,
)

ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Australia/Lord_Howe",  # 30-minute DST shift
    "Australia/Sydney",
    "Asia/Kathmandu",  # +05:45, no DST
    "America/St_Johns",  # -03:30 with DST
    "Pacific/Chatham",  # +12:45 / +13:45
    "America/Santiago",
    "Africa/Casablanca",
]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def cron(expr: str, zone: str = "UTC") -> ScheduleSpec:
    return ScheduleSpec("cron", None, expr, zone)


# --- Examples ------------------------------------------------------------------------------------


def test_daily_0230_new_york__spring_forward_runs_at_the_first_valid_instant():
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT, so 02:30 does not exist; it runs at 03:00 EDT.
    slots = upcoming(cron("30 2 * * *", "America/New_York"), after=utc(2026, 3, 7, 0), n=3)
    assert slots == [utc(2026, 3, 7, 7, 30), utc(2026, 3, 8, 7, 0), utc(2026, 3, 9, 6, 30)]


def test_daily_0230_new_york__fall_back_runs_once():
    # 2026-11-01: 02:00 EDT falls back to 01:00 EST; 02:30 EST happens once, at 07:30Z.
    slots = upcoming(cron("30 2 * * *", "America/New_York"), after=utc(2026, 10, 31, 0), n=3)
    assert slots == [utc(2026, 10, 31, 6, 30), utc(2026, 11, 1, 7, 30), utc(2026, 11, 2, 7, 30)]


def test_fixed_time_in_repeated_hour__runs_once_on_the_first_occurrence():
    slots = upcoming(cron("30 1 * * *", "America/New_York"), after=utc(2026, 10, 31, 12), n=2)
    assert slots == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]


def test_wildcard_hour__fires_in_both_copies_of_the_repeated_hour():
    spec = cron("*/30 * * * *", "America/New_York")
    slots = upcoming(spec, after=utc(2026, 11, 1, 4, 0), n=6)
    # 00:30 EDT, 01:00 EDT, 01:30 EDT, 01:00 EST, 01:30 EST, 02:00 EST
    assert slots == [utc(2026, 11, 1, 4, 30) + timedelta(minutes=30 * i) for i in range(6)]


def test_wildcard_hour__skips_the_missing_hour():
    spec = cron("30 * * * *", "America/New_York")
    slots = upcoming(spec, after=utc(2026, 3, 8, 6, 0), n=2)
    assert slots == [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7, 30)]  # 01:30 EST, 03:30 EDT


def test_lord_howe__half_hour_gap_moves_a_fixed_time_to_the_transition():
    # 2026-10-04 02:00 LHST (+10:30) jumps to 02:30 LHDT (+11:00); 02:15 does not exist.
    slots = upcoming(cron("15 2 * * *", "Australia/Lord_Howe"), after=utc(2026, 10, 2, 0), n=2)
    assert slots[1] == datetime(2026, 10, 4, 2, 30, tzinfo=ZoneInfo("Australia/Lord_Howe"))


def test_cron_in_new_york__upcoming_follows_the_offset_of_each_date():
    slots = upcoming(cron("0 2 * * *", "America/New_York"), after=utc(2026, 10, 30, 12), n=4)
    assert [s.hour for s in slots] == [6, 7, 7, 7]


def test_interval__is_anchored_on_the_slot_not_the_clock():
    spec = ScheduleSpec("interval", 10)
    slot = utc(2026, 3, 8, 6, 55)
    assert upcoming(spec, after=slot, n=3) == [slot + timedelta(minutes=10 * i) for i in (1, 2, 3)]


def test_missed_slots__interval_jumps_to_the_latest_without_walking():
    spec = ScheduleSpec("interval", 1)
    first = utc(2020, 1, 1)
    due, following = missed_slots(spec, first=first, now=utc(2026, 1, 1, 0, 0, 30), limit=2)
    assert due == [utc(2025, 12, 31, 23, 59), utc(2026, 1, 1)]
    assert following == utc(2026, 1, 1, 0, 1)


def test_missed_slots__cron_keeps_the_latest_limit():
    due, following = missed_slots(
        cron("0 * * * *"), first=utc(2026, 1, 1, 0), now=utc(2026, 1, 1, 5, 10), limit=3
    )
    assert due == [utc(2026, 1, 1, 3), utc(2026, 1, 1, 4), utc(2026, 1, 1, 5)]
    assert following == utc(2026, 1, 1, 6)


def test_missed_slots__nothing_due_yet():
    assert missed_slots(ScheduleSpec("interval", 5), first=utc(2026, 1, 2), now=utc(2026, 1, 1), limit=5) == (
        [],
        utc(2026, 1, 2),
    )


def test_next_slot__refuses_naive_datetimes():
    with pytest.raises(ValueError, match="aware"):
        next_slot(ScheduleSpec("interval", 1), after=datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "expr",
    ["", "* * * *", "* * * * * *", "61 * * * *", "* 24 * * *", "0 0 31 2 *", "a b c d e", "*/0 * * * *"],
)
def test_validate_cron_expr__refuses(expr):
    with pytest.raises(ValueError, match="cron expression"):
        validate_cron_expr(expr)


@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 * * * *", "0 9-17 * * 1-5", "30 4 1,15 * *"])
def test_validate_cron_expr__accepts(expr):
    validate_cron_expr(expr)


@pytest.mark.parametrize(
    "name", ["Mars/Olympus", "", " UTC", "../etc/passwd", "UTC\x00", "localtime", "Factory", "posix/UTC"]
)
def test_validate_timezone__refuses(name):
    with pytest.raises(ValueError, match="timezone"):
        validate_timezone(name)


def test_describe__reads_as_english():
    assert describe(ScheduleSpec("interval", 10)) == "every 10 minutes"
    assert describe(ScheduleSpec("interval", 1)) == "every minute"


# --- The oracle ----------------------------------------------------------------------------------


def _field_values(expr: str) -> list[set[int] | None]:
    fields, _ = croniter.expand(expr)
    return [
        None if values == ["*"] else {int(v) % 7 if i == 4 else int(v) for v in values}
        for i, values in enumerate(fields)
    ]


def _wall_matches(fields: list[set[int] | None], wall: datetime) -> bool:
    minute, hour, dom, month, dow = fields
    return (
        (minute is None or wall.minute in minute)
        and (hour is None or wall.hour in hour)
        and (dom is None or wall.day in dom)
        and (month is None or wall.month in month)
        and (dow is None or (wall.isoweekday() % 7) in dow)
    )


def oracle_next(spec: ScheduleSpec, after: datetime, horizon: timedelta = timedelta(days=8)) -> datetime:
    """Walk every UTC minute after `after` and return the first at which the schedule fires."""
    zone = ZoneInfo(spec.timezone)
    fields = _field_values(spec.cron_expr)
    hour_field = spec.cron_expr.split()[1]
    wildcard_hour = "*" in hour_field or "/" in hour_field
    instant = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    end = after + horizon
    while instant <= end:
        local = instant.astimezone(zone)
        wall = local.replace(tzinfo=None)
        if _wall_matches(fields, wall) and (wildcard_hour or local.fold == 0):
            return instant
        if not wildcard_hour:
            # A gap ends at this instant: the wall clock jumped over times that do not exist. A
            # fixed-hour cron that matched one of them fires here, once.
            before = (instant - timedelta(minutes=1)).astimezone(zone).replace(tzinfo=None)
            skipped = before + timedelta(minutes=1)
            while skipped < wall:
                if _wall_matches(fields, skipped):
                    return instant
                skipped += timedelta(minutes=1)
        instant += timedelta(minutes=1)
    raise AssertionError("oracle found no slot within the horizon")


def _transitions(zone_name: str, year: int) -> list[datetime]:
    zone = ZoneInfo(zone_name)
    found = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    offset = t.astimezone(zone).utcoffset()
    while t.year == year:
        nxt = t + timedelta(hours=1)
        if nxt.astimezone(zone).utcoffset() != offset:
            found.append(nxt)
            offset = nxt.astimezone(zone).utcoffset()
        t = nxt
    return found


TRANSITION_POINTS = [(zone, t) for zone in ZONES for t in _transitions(zone, 2026)] + [
    ("Asia/Kathmandu", utc(2026, 6, 1)),
    ("UTC", utc(2026, 12, 31, 23)),
]

MINUTES = st.sampled_from(["0", "30", "15", "45", "*/15", "*/20", "0,30", "5", "59", "*"])
HOURS = st.sampled_from(["*", "*/2", "*/3", "1", "2", "3", "0", "1,2", "2-4", "23", "0-23/4", "12"])
DOW = st.sampled_from(["*", "*", "*", "1-5", "0,6"])
CRONS = st.builds(lambda m, h, d: f"{m} {h} * * {d}", MINUTES, HOURS, DOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    offset_minutes=st.integers(min_value=-26 * 60, max_value=6 * 60),
    expr=CRONS,
)
def test_next_slot__matches_the_oracle_around_every_transition(point, offset_minutes, expr):
    zone, transition = point
    spec = cron(expr, zone)
    after = transition + timedelta(minutes=offset_minutes)
    assert next_slot(spec, after=after) == oracle_next(spec, after)


@settings(max_examples=60, deadline=None)
@given(point=st.sampled_from(TRANSITION_POINTS), expr=CRONS)
def test_upcoming__strictly_increasing_across_transitions(point, expr):
    zone, transition = point
    slots = upcoming(cron(expr, zone), after=transition - timedelta(hours=30), n=40)
    assert all(a < b for a, b in itertools.pairwise(slots))


@settings(max_examples=80, deadline=None)
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
)
def test_fixed_local_time__fires_once_per_local_day(point, minute, hour):
    zone_name, transition = point
    zone = ZoneInfo(zone_name)
    slots = upcoming(cron(f"{minute} {hour} * * *", zone_name), after=transition - timedelta(days=3), n=6)
    days = [slot.astimezone(zone).date() for slot in slots]
    assert len(set(days)) == len(days)
    assert all((b - a).days == 1 for a, b in itertools.pairwise(days))


@pytest.mark.parametrize("zone_name", ZONES)
def test_wildcard_hour__fires_at_every_real_hour(zone_name):
    # "0 * * * *" fires at every real instant whose local minute is 0: over a year that is one firing
    # per hour the zone's clock shows, i.e. every UTC hour unless the zone's offset has minutes.
    zone = ZoneInfo(zone_name)
    start = utc(2026, 1, 1)
    slots = upcoming(cron("0 * * * *", zone_name), after=start, n=24 * 365)
    assert all(a < b for a, b in itertools.pairwise(slots))
    assert all(slot.astimezone(zone).minute == 0 for slot in slots)
    # Every instant between the first and last slot at which the local minute is 0 is a slot.
    expected, t = [], slots[0]
    while t <= slots[-1]:
        if t.astimezone(zone).minute == 0:
            expected.append(t)
        t += timedelta(minutes=15)
    assert slots == expected


# --- Walking back: prev_slot, missed_slots, split_due (issue 15.3) --------------------------------


def walk_latest_at_or_before(spec: ScheduleSpec, at: datetime) -> datetime:
    """The reference for prev_slot: walk next_slot forward from far enough back, keep the last <= at."""
    back = timedelta(hours=1)
    while next_slot(spec, after=at - back) > at:
        back *= 2
    slot = next_slot(spec, after=at - back)
    while (following := next_slot(spec, after=slot)) <= at:
        slot = following
    return slot


def walk_missed(spec: ScheduleSpec, first: datetime, now: datetime, limit: int):
    """The catch-up as it was first written: every slot from `first` walked forward with next_slot."""
    due: deque[datetime] = deque(maxlen=limit)
    slot = first
    while slot <= now:
        due.append(slot)
        slot = next_slot(spec, after=slot)
    return list(due), slot


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    offset_seconds=st.integers(min_value=-30 * 3600, max_value=8 * 3600),
    expr=CRONS,
)
def test_prev_slot__agrees_with_walking_next_slot_around_every_transition(point, offset_seconds, expr):
    zone, transition = point
    spec = cron(expr, zone)
    at = transition + timedelta(seconds=offset_seconds)
    latest = prev_slot(spec, at_or_before=at)
    assert latest == walk_latest_at_or_before(spec, at)
    assert latest <= at < next_slot(spec, after=latest)
    assert prev_slot(spec, at_or_before=latest) == latest  # a slot is at or before itself


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    start_minutes=st.integers(min_value=-30 * 60, max_value=60),
    span_minutes=st.integers(min_value=0, max_value=20 * 60),
    limit=st.integers(min_value=1, max_value=120),
    expr=CRONS,
)
def test_missed_slots__cron_agrees_with_the_forward_walk(point, start_minutes, span_minutes, limit, expr):
    zone, transition = point
    spec = cron(expr, zone)
    first = next_slot(spec, after=transition + timedelta(minutes=start_minutes))
    now = first + timedelta(minutes=span_minutes, seconds=17)
    assert missed_slots(spec, first=first, now=now, limit=limit) == walk_missed(spec, first, now, limit)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    span_minutes=st.integers(min_value=0, max_value=20 * 60),
    cut_minutes=st.integers(min_value=0, max_value=21 * 60),
    expr=CRONS,
)
def test_split_due__is_the_forward_walk_cut_at_the_missed_instant(point, span_minutes, cut_minutes, expr):
    zone, transition = point
    spec = cron(expr, zone)
    first = next_slot(spec, after=transition - timedelta(hours=12))
    now = first + timedelta(minutes=span_minutes, seconds=5)
    cutoff = now - timedelta(minutes=cut_minutes)
    walked, following = walk_missed(spec, first, now, 10_000)
    split = split_due(spec, first=first, now=now, missed_before=cutoff, limit=100)
    assert split.on_time == [slot for slot in walked if slot >= cutoff][-100:]
    missed = [slot for slot in walked if slot < cutoff]
    if len([slot for slot in walked if slot >= cutoff]) < 100:
        assert split.latest_missed == (missed[-1] if missed else None)
    assert split.following == following


def test_missed_slots__cron_off_the_grid_first_slot_is_kept():
    # A next_run_at set by hand between two cron slots is itself a slot, as the forward walk had it.
    spec = cron("0 * * * *")
    first = utc(2026, 1, 1, 0, 20)
    assert missed_slots(spec, first=first, now=utc(2026, 1, 1, 2, 5), limit=10) == walk_missed(
        spec, first, utc(2026, 1, 1, 2, 5), 10
    )
    assert missed_slots(spec, first=first, now=utc(2026, 1, 1, 0, 30), limit=10) == (
        [first],
        utc(2026, 1, 1, 1),
    )


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Australia/Lord_Howe"])
def test_split_due__a_minute_cron_a_month_behind_gives_the_latest_slot_without_the_month(zone):
    spec = cron("* * * * *", zone)
    now = utc(2026, 4, 5, 12, 0, 30)
    first = now.replace(second=0) - timedelta(days=30)  # across the DST change of each of these zones
    split = split_due(spec, first=first, now=now, missed_before=now - timedelta(seconds=60), limit=100)
    assert split.on_time == [utc(2026, 4, 5, 11, 59, 30) + timedelta(seconds=30)]
    assert split.latest_missed == utc(2026, 4, 5, 11, 59)
    assert split.following == utc(2026, 4, 5, 12, 1)
