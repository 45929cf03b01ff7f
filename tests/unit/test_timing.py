"""Slot math against docs/ARCHITECTURE.md, guarantee 3, by example and by property.

The properties compare `next_slot` with a brute-force oracle that walks every UTC minute and decides
from first principles whether the schedule fires there. The two share nothing but the cron fields: the
oracle reads `L`, `#`, the aliases and the day-field rule itself (the plain numbers and ranges of each
field come from croniter's parser).
"""

from __future__ import annotations

import calendar
import itertools
from collections import deque
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schedules.timing import (
    ScheduleSpec,
    describe,
    dispatch_at,
    first_slot,
    jitter_offset,
    missed_slots,
    next_slot,
    prev_slot,
    run_times,
    slot_of,
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
    assert describe(ScheduleSpec("cron", None, "@daily", "Asia/Tokyo")) == "At 12:00 AM, Asia/Tokyo"
    assert describe(ScheduleSpec("cron", None, "0 9 * * 1#2", "UTC")) == (
        "At 09:00 AM, on the second Monday of the month, UTC"
    )


def test_describe__says_the_times_an_h_field_hashes_to():
    """`H` is this project's (and croniter's) notation: the description names the values the
    schedule's key hashes to, the very times next_slot gives."""
    spec = ScheduleSpec("cron", None, "H H * * *", "UTC", key="nightly-report")
    first = next_slot(spec, after=datetime(2030, 1, 1, tzinfo=UTC))
    assert describe(spec) == f"At {first.strftime('%I:%M %p')}, UTC"
    stepped = ScheduleSpec("cron", None, "H/15 * * * *", "UTC", key="nightly-report")
    minutes = sorted({slot.minute for slot in upcoming(stepped, after=datetime(2030, 1, 1, tzinfo=UTC), n=4)})
    assert describe(stepped) == (
        f"Every 15 minutes, minutes {minutes[0]} through {minutes[-1]} past the hour, UTC"
    )


def test_describe__shows_as_written_what_it_cannot_phrase():
    # Both day fields restricted: cron fires on either (cron-descriptor's phrase would read as both).
    assert describe(ScheduleSpec("cron", None, "0 0 1 * 1", "UTC")) == "cron 0 0 1 * 1 (UTC)"


# --- The oracle ----------------------------------------------------------------------------------


# The aliases, as cron(8) and croniter's documentation define them.
ORACLE_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@lru_cache(maxsize=1024)
def _plain_values(field: str, position: int) -> frozenset[int] | None:
    """A field of plain numbers, ranges and steps, through croniter's parser in that position alone."""
    if field == "*":
        return None
    probe = ["*"] * 5
    probe[position] = field
    values = croniter.expand(" ".join(probe))[0][position]
    return frozenset(int(v) % 7 if position == 4 else int(v) for v in values)


def _day_of_month_matches(field: str, wall: datetime) -> bool:
    last_day = calendar.monthrange(wall.year, wall.month)[1]
    for token in field.split(","):
        if token.upper() == "L":
            if wall.day == last_day:
                return True
        elif wall.day in _plain_values(token, 2):
            return True
    return False


def _day_of_week_matches(field: str, wall: datetime) -> bool:
    weekday = wall.isoweekday() % 7  # Sunday 0
    last_day = calendar.monthrange(wall.year, wall.month)[1]
    for token in field.split(","):
        if "#" in token:  # n#k: the k-th weekday n of the month
            day, nth = token.split("#")
            if weekday == int(day) % 7 and (wall.day - 1) // 7 + 1 == int(nth):
                return True
        elif token[:1].upper() == "L":  # Ln: the last weekday n of the month
            if weekday == int(token[1:]) % 7 and wall.day + 7 > last_day:
                return True
        elif weekday in _plain_values(token, 4):
            return True
    return False


def _wall_matches(expr: str, wall: datetime) -> bool:
    minute, hour, dom, month, dow = expr.split()
    minutes, hours, months = _plain_values(minute, 0), _plain_values(hour, 1), _plain_values(month, 3)
    if not (
        (minutes is None or wall.minute in minutes)
        and (hours is None or wall.hour in hours)
        and (months is None or wall.month in months)
    ):
        return False
    # cron(5): when both day fields are restricted, a day matching either one fires.
    if dom != "*" and dow != "*":
        return _day_of_month_matches(dom, wall) or _day_of_week_matches(dow, wall)
    return (dom == "*" or _day_of_month_matches(dom, wall)) and (
        dow == "*" or _day_of_week_matches(dow, wall)
    )


def oracle_next(spec: ScheduleSpec, after: datetime, horizon: timedelta = timedelta(days=8)) -> datetime:
    """Walk every UTC minute after `after` and return the first at which the schedule fires."""
    zone = ZoneInfo(spec.timezone)
    expr = ORACLE_ALIASES.get(spec.cron_expr, spec.cron_expr)
    hour_field = expr.split()[1]
    # docs/ARCHITECTURE.md, guarantee 3, in its words: "a cron whose hour field is `*` or a step fires at
    # every real instant,
    # in both copies of a repeated hour"; any other hour field is fixed.
    wildcard_hour = hour_field == "*" or "/" in hour_field
    fields = expr
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


# --- Richer cron: L, #, aliases, H (issue 16.7) -------------------------------------------------------

DOM_RICH = st.sampled_from(["*", "L", "1", "15,L"])
# 0#2 is the second Sunday (US spring-forward day), 0#1 the first (US fall-back), L0 the last Sunday
# (the EU and UK change day), 1#2 the second Monday, L5 the last Friday.
DOW_RICH = st.sampled_from(["*", "0#2", "0#1", "L0", "1#2", "L5", "1-5"])
# Something rich in each; a day-of-month with # or L in the day of week is refused (croniter cannot do
# it: see test_validate_cron_expr__says_which_field_is_wrong), so both restricted means dom with 1-5.
RICH_CRONS = st.builds(
    lambda m, h, dom, dow: f"{m} {h} {dom} * {dow}", MINUTES, HOURS, DOM_RICH, DOW_RICH
).filter(
    lambda e: (
        (e.split()[2] != "*" or e.split()[4] not in ("*", "1-5"))
        and (e.split()[2] == "*" or e.split()[4] in ("*", "1-5"))
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    offset_minutes=st.integers(min_value=-26 * 60, max_value=6 * 60),
    expr=RICH_CRONS,
)
def test_next_slot__l_and_hash_match_the_oracle_around_every_transition(point, offset_minutes, expr):
    zone, transition = point
    spec = cron(expr, zone)
    after = transition + timedelta(minutes=offset_minutes)
    assert next_slot(spec, after=after) == oracle_next(spec, after, horizon=timedelta(days=40))


@pytest.mark.parametrize("alias", sorted(ORACLE_ALIASES))
@pytest.mark.parametrize("zone", ["America/New_York", "Europe/London", "Australia/Lord_Howe"])
def test_aliases__fire_as_their_five_fields_across_a_year_of_transitions(alias, zone):
    after = utc(2026, 1, 1)
    n = {"@hourly": 24 * 14, "@daily": 400, "@midnight": 40, "@weekly": 60}.get(alias, 14)
    assert upcoming(cron(alias, zone), after=after, n=n) == upcoming(
        cron(ORACLE_ALIASES[alias], zone), after=after, n=n
    )


@pytest.mark.parametrize(
    ("expr", "zone", "after", "expected"),
    [
        # 02:30 on the second Sunday of March 2026 does not exist in New York: the transition, 03:00 EDT.
        ("30 2 * * 0#2", "America/New_York", utc(2026, 3, 1), utc(2026, 3, 8, 7, 0)),
        # 01:30 on the first Sunday of November happens twice: a fixed hour fires on the first one.
        ("30 1 * * 0#1", "America/New_York", utc(2026, 10, 20), utc(2026, 11, 1, 5, 30)),
        # 01:30 on the last Sunday of March does not exist in London: 02:00 BST = 01:00Z.
        ("30 1 * * L0", "Europe/London", utc(2026, 3, 20), utc(2026, 3, 29, 1, 0)),
        ("0 9 L * *", "UTC", utc(2026, 2, 1), utc(2026, 2, 28, 9, 0)),
        ("0 9 L * *", "UTC", utc(2028, 2, 1), utc(2028, 2, 29, 9, 0)),
        ("0 9 * * 1#2", "UTC", utc(2026, 1, 1), utc(2026, 1, 12, 9, 0)),
    ],
)
def test_l_and_hash__examples(expr, zone, after, expected):
    assert next_slot(cron(expr, zone), after=after) == expected


def test_h__hashes_the_schedules_name_stably_and_two_names_spread():
    a = ScheduleSpec("cron", None, "H H * * *", "UTC", key="nightly-a")
    assert upcoming(a, after=utc(2026, 1, 1), n=3) == upcoming(a, after=utc(2026, 1, 1), n=3)
    firsts = {
        upcoming(ScheduleSpec("cron", None, "H H * * *", "UTC", key=f"s{i}"), after=utc(2026, 1, 1), n=1)[0]
        for i in range(20)
    }
    assert len(firsts) > 10
    validate_cron_expr("H(0-29)/10 H * * *")


@pytest.mark.parametrize(
    ("expr", "words"),
    [
        ("61 * * * *", "the minute field '61' is out of range"),
        ("* 24 * * *", "the hour field '24' is out of range"),
        ("0 0 32 * *", "the day-of-month field '32' is out of range"),
        ("0 0 * 13 *", "the month field '13' is out of range"),
        ("0 0 * * 1#6", "the day-of-week field '1#6'"),
        ("* * * *", "expected 5 fields"),
        ("@sometimes", "unknown alias"),
        ("0 0 1 * 0#2", "cannot be combined with # or L"),
    ],
)
def test_validate_cron_expr__says_which_field_is_wrong(expr, words):
    with pytest.raises(ValueError, match="cron expression") as caught:
        validate_cron_expr(expr)
    assert words in str(caught.value)


# --- Jitter and bounds (issue 16.1, 16.2) -------------------------------------------------------------

SLOTS = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(second=0, microsecond=0))


@settings(max_examples=200, deadline=None)
@given(slot=SLOTS, jitter=st.integers(1, 3600), name=st.text(min_size=1, max_size=20))
def test_jitter_offset__deterministic_whole_seconds_in_range(slot, jitter, name):
    spec = ScheduleSpec("interval", 60, jitter_seconds=jitter, key=name)
    offset = jitter_offset(spec, slot)
    assert offset == jitter_offset(ScheduleSpec("interval", 60, jitter_seconds=jitter, key=name), slot)
    assert timedelta(0) <= offset < timedelta(seconds=jitter)
    assert offset.microseconds == 0


def test_jitter_offset__spreads_over_the_window():
    spec = ScheduleSpec("interval", 10, jitter_seconds=600, key="spread")
    offsets = [
        jitter_offset(spec, utc(2026, 1, 1) + timedelta(minutes=10 * i)).total_seconds() for i in range(1000)
    ]
    buckets = {int(o // 60) for o in offsets}
    assert buckets == set(range(10))
    assert 250 < sum(offsets) / len(offsets) < 350


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    point=st.sampled_from(TRANSITION_POINTS),
    offset_minutes=st.integers(min_value=-26 * 60, max_value=6 * 60),
    expr=CRONS,
    fraction=st.floats(min_value=0.01, max_value=1.0),
)
def test_slot_of__recovers_the_slot_from_its_dispatch_time_around_every_transition(
    point, offset_minutes, expr, fraction
):
    zone, transition = point
    base = cron(expr, zone)
    after = transition + timedelta(minutes=offset_minutes)
    gap = min(b - a for a, b in itertools.pairwise(upcoming(base, after=after - timedelta(days=2), n=200)))
    jitter = max(1, int(gap.total_seconds() * fraction))
    spec = ScheduleSpec("cron", None, expr, zone, jitter_seconds=jitter, key="recover")
    for slot in upcoming(spec, after=after, n=5):
        assert slot_of(spec, dispatch_at(spec, slot)) == slot


@settings(max_examples=100, deadline=None)
@given(
    slot_index=st.integers(-10_000, 10_000), minutes=st.integers(1, 1440), jitter_part=st.floats(0.01, 1.0)
)
def test_slot_of__interval_grid_round_trips(slot_index, minutes, jitter_part):
    jitter = max(1, int(minutes * 60 * jitter_part))
    spec = ScheduleSpec("interval", minutes, jitter_seconds=jitter, key="grid")
    slot = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(minutes=minutes) * (
        28_000_000 // minutes + slot_index
    )
    assert slot_of(spec, dispatch_at(spec, slot)) == slot


def test_bounds__interval_starts_at_start_at_and_stops_at_end_at():
    start, end = utc(2030, 1, 1, 8), utc(2030, 1, 1, 9)
    spec = ScheduleSpec("interval", 25, start_at=start, end_at=end)
    first = first_slot(spec, now=utc(2026, 1, 1))
    assert first == start
    assert run_times(spec, next_run_at=first, n=10) == [
        start,
        start + timedelta(minutes=25),
        start + timedelta(minutes=50),
    ]
    # Enabled later, it stays on start_at's grid.
    assert first_slot(spec, now=start + timedelta(minutes=30)) == start + timedelta(minutes=50)
    assert first_slot(spec, now=end) is None


def test_bounds__cron_first_slot_at_or_after_start_at_and_max_runs_caps_the_times():
    spec = ScheduleSpec("cron", None, "0 * * * *", "UTC", start_at=utc(2030, 1, 1, 8, 30))
    first = first_slot(spec, now=utc(2026, 1, 1))
    assert first == utc(2030, 1, 1, 9)
    assert len(run_times(spec, next_run_at=first, n=10, runs_left=3)) == 3


def test_run_times__are_the_slots_plus_their_offsets_within_end_at():
    spec = ScheduleSpec("interval", 10, jitter_seconds=120, end_at=utc(2026, 1, 1, 1, 0), key="r")
    first = first_slot(spec, now=utc(2026, 1, 1, 0, 5))
    times = run_times(spec, next_run_at=first, n=100)
    slots = [utc(2026, 1, 1, 0, 10) + timedelta(minutes=10 * i) for i in range(6)]
    assert times == [dispatch_at(spec, slot) for slot in slots]
