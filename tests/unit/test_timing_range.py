"""The slot math at the ends of datetime's range (issue 31.2): no OverflowError reaches a caller.

A slot (with its jitter) that would pass the end of year 9999 does not exist: the schedule has no next
run. The dates a client gives are bounded to timing.EARLIEST .. timing.LATEST.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schedules import slots, timing
from schedules.timing import ScheduleSpec

# Zones at the ends of the offsets (UTC+14, UTC-12), with DST, and with an odd offset.
ZONES = [
    "UTC",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
]
CRONS = ["0 2 * * *", "*/5 * * * *", "0 0 29 2 *", "30 2 * * 0", "H H * * *", "0 0 L * *", "0 * * * *"]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_the_issues_dates_give_no_next_slot_instead_of_an_overflow():
    daily = ScheduleSpec("cron", None, "0 2 * * *", "America/New_York")
    assert timing.next_slot(daily, after=utc(9999, 12, 31)) is None
    assert timing.upcoming(daily, after=utc(9999, 12, 31), n=5) == []
    assert timing.first_slot(daily, now=utc(9999, 12, 31)) is None
    # From the first instant datetime holds, in a zone behind UTC: the first slot is a real one.
    assert timing.next_slot(daily, after=datetime.min.replace(tzinfo=UTC)) == utc(
        1, 1, 3, 6, 56, 2
    )  # 02:00 local mean time, -4:56:02
    assert timing.prev_slot(daily, at_or_before=utc(1, 1, 1)) is None
    hourly = ScheduleSpec("interval", 60)
    assert timing.upcoming(hourly, after=utc(9999, 12, 29, 21), n=5) == [
        utc(9999, 12, 29, 22),
        utc(9999, 12, 29, 23),
        utc(9999, 12, 30),  # the last instant a slot may take
    ]


def test_a_slot_whose_jitter_would_pass_the_range_does_not_exist():
    spec = ScheduleSpec("interval", 60, jitter_seconds=86_400, key="j")
    assert timing.next_slot(spec, after=utc(9999, 12, 28, 23)) == utc(9999, 12, 29)
    assert timing.dispatch_at(spec, utc(9999, 12, 29)) < utc(9999, 12, 31)
    assert timing.next_slot(spec, after=utc(9999, 12, 29)) is None


def test_a_schedule_past_the_range_has_no_next_run_after_its_last_dispatch():
    spec = ScheduleSpec("interval", 60 * 24)
    last = utc(9999, 12, 29, 12)
    plan = slots.plan_slots(
        spec,
        next_run_at=last,
        last_run_at=None,
        now=last + timedelta(minutes=1),
        misfire_policy="run_once",
        overlap_policy="allow",
        unfinished=0,
        grace=timedelta(minutes=1),
    )
    assert [d.slot for d in plan.decisions] == [last]
    assert plan.next_run_at is None


def test_date_range_error_names_the_range():
    assert timing.date_range_error(timing.EARLIEST) is None
    assert timing.date_range_error(timing.LATEST) is None
    message = timing.date_range_error(timing.LATEST + timedelta(seconds=1))
    assert message == "Must be between 1970-01-01T00:00:00Z and 9000-01-01T00:00:00Z."
    assert timing.date_range_error(timing.EARLIEST - timedelta(seconds=1)) == message


def _schedule(spec: ScheduleSpec, **fields) -> SimpleNamespace:
    return SimpleNamespace(
        schedule_type=spec.schedule_type,
        interval_minutes=spec.interval_minutes,
        cron_expr=spec.cron_expr,
        timezone=spec.timezone,
        jitter_seconds=spec.jitter_seconds,
        start_at=None,
        end_at=None,
        name=spec.key,
        **{"enabled": True, "max_runs": None, "scheduled_run_count": 0, **fields},
    )


def test_upcoming_runs_starts_at_next_run_at_and_keeps_to_jitter_max_runs_and_enabled():
    spec = ScheduleSpec("interval", 60, jitter_seconds=600, key="campaign")
    first = timing.dispatch_at(spec, utc(2030, 1, 1, 8))
    times = timing.upcoming_runs(_schedule(spec, next_run_at=first), n=3)
    assert times == [timing.dispatch_at(spec, utc(2030, 1, 1, hour)) for hour in (8, 9, 10)]
    assert times[0] == first
    assert timing.upcoming_runs(
        _schedule(spec, next_run_at=first, max_runs=5, scheduled_run_count=4), n=3
    ) == [first]
    assert timing.upcoming_runs(_schedule(spec, next_run_at=first, enabled=False), n=3) == []
    assert timing.upcoming_runs(_schedule(spec, next_run_at=None), n=3) == []


# Any instant datetime can hold, in UTC or a zone at an end of the offsets.
INSTANTS = st.datetimes(timezones=st.just(UTC)) | st.sampled_from(
    [datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC), utc(9999, 12, 30), utc(1, 1, 3)]
)
SPECS = st.one_of(
    st.builds(
        ScheduleSpec,
        st.just("interval"),
        st.sampled_from([1, 60, 525_600, 2**31 - 1]),
        jitter_seconds=st.sampled_from([0, 59, 86_400]),
        key=st.just("k"),
    ),
    st.builds(
        ScheduleSpec,
        st.just("cron"),
        st.none(),
        st.sampled_from(CRONS),
        st.sampled_from(ZONES),
        jitter_seconds=st.sampled_from([0, 59]),
        key=st.just("k"),
    ),
)


# The database's clock, which decides what is due: not near either end of the range.
NOWS = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=SPECS, at=INSTANTS, other=INSTANTS, now=NOWS)
def test_the_slot_math_never_overflows(spec, at, other, now):
    """Every public function of the slot math, from any instant (a hand-set next_run_at, say): a slot or
    None, never an exception."""
    nxt = timing.next_slot(spec, after=at)
    assert nxt is None or nxt > at
    timing.upcoming(spec, after=at, n=3)
    timing.first_slot(spec, now=at)
    timing.slot_of(spec, at)
    timing.run_times(spec, next_run_at=at, n=3)
    start, end = sorted([at, other])
    timing.slots_between(spec, start=start, end=end, anchor=at, limit=3)
    timing.missed_slots(spec, first=start, now=end, limit=3)
    timing.split_due(spec, first=start, now=end, missed_before=start, limit=3)
    if spec.schedule_type == "cron":
        prev = timing.prev_slot(spec, at_or_before=at)
        assert prev is None or prev <= at
    slots.plan_slots(
        spec,
        next_run_at=at,
        last_run_at=None,
        now=now,
        misfire_policy="run_all",
        overlap_policy="allow",
        unfinished=0,
        grace=timedelta(seconds=60),
        max_slots=5,
    )


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("expr", CRONS)
def test_every_cron_and_zone_stops_cleanly_at_the_end_of_the_range(zone, expr):
    spec = ScheduleSpec("cron", None, expr, zone, key="k")
    times = timing.upcoming(spec, after=utc(9999, 12, 25), n=100_000)
    assert times == sorted(times)
    assert all(t <= utc(9999, 12, 30) for t in times)
