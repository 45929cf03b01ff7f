"""The calendar view's counts (schedules.runcounts) equal a brute-force enumeration of timing.run_times,
bucketed by the viewer's local hour or day: intervals, crons across DST, calendars, end_at, jitter."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from schedules import runcounts, timing
from schedules.calendars import CalendarSpec, freeze

WEEKEND = CalendarSpec(name="weekend", timezone="Europe/Berlin", rules=freeze([{"weekdays": ["sat", "sun"]}]))
XMAS = CalendarSpec(name="xmas", timezone="America/New_York", rules=freeze([{"date": "2026-11-03"}]))
BUSINESS = CalendarSpec(
    name="business", timezone="UTC", rules=freeze([{"weekdays": ["mon", "tue", "wed", "thu", "fri"]}])
)
NIGHTS = CalendarSpec(name="nights", timezone="UTC", rules=freeze([{"cron": "* 0-6 * * *"}]))


def oracle(items, window: runcounts.Buckets, now: datetime) -> dict:
    zone = ZoneInfo(window.zone)
    out: dict = {}
    for item in items:
        n = 64
        while True:  # enough of them to pass the window's end
            times = timing.run_times(item.spec, next_run_at=item.next_run_at, n=n, runs_left=item.runs_left)
            if len(times) < n or times[-1] >= window.end:
                break
            n *= 4
        for t in times:
            if max(window.start, now) <= t < window.end:
                key = runcounts.local_key(t, zone, window.hourly)
                out.setdefault(item.group, Counter())[key] += 1
    return out


def counted(items, window, now) -> dict:
    counts = runcounts.count_runs(items, window, now=now)
    assert not counts.capped_from
    out: dict = {}
    for group, row in counts.rows.items():
        for index, n in enumerate(row):
            if n:
                out.setdefault(group, Counter())[window.keys[index]] += n
    return out


def spec(**fields) -> timing.ScheduleSpec:
    fields.setdefault("key", "s")
    return timing.ScheduleSpec(**fields)


NOW = datetime(2026, 10, 24, 9, 17, 30, tzinfo=UTC)
CASES = [
    spec(schedule_type="interval", interval_minutes=1),
    spec(schedule_type="interval", interval_minutes=37),
    spec(schedule_type="interval", interval_minutes=1440 * 3),
    spec(schedule_type="interval", interval_minutes=25, end_at=datetime(2026, 11, 2, 5, 0, tzinfo=UTC)),
    spec(schedule_type="interval", interval_minutes=45, exclude=(WEEKEND, XMAS)),
    spec(schedule_type="interval", interval_minutes=90, only=(BUSINESS,), exclude=(XMAS,)),
    spec(schedule_type="cron", cron_expr="30 2 * * *", timezone="Europe/Berlin"),
    spec(schedule_type="cron", cron_expr="*/20 * * * *", timezone="America/New_York"),
    spec(schedule_type="cron", cron_expr="0 1 * * *", timezone="America/New_York"),
    spec(schedule_type="cron", cron_expr="15 9 1,15 * 1", timezone="Asia/Kolkata"),
    spec(schedule_type="cron", cron_expr="H 3 * * 1-5", timezone="Australia/Lord_Howe", key="hashed"),
    spec(schedule_type="cron", cron_expr="0 9 * * *", timezone="America/New_York", exclude=(WEEKEND, XMAS)),
    spec(schedule_type="cron", cron_expr="0 9 * * *", exclude=(XMAS,), calendar_policy="next_allowed"),
    spec(schedule_type="cron", cron_expr="*/30 * * * *", exclude=(NIGHTS,)),
    spec(schedule_type="cron", cron_expr="0 0 L * *"),
    spec(schedule_type="cron", cron_expr="5 * * * *", jitter_seconds=600),
    spec(
        schedule_type="cron",
        cron_expr="0 9 * * *",
        timezone="Europe/Berlin",
        jitter_seconds=3000,
        exclude=(XMAS,),
    ),
    spec(schedule_type="interval", interval_minutes=13, jitter_seconds=700),
    spec(
        schedule_type="interval",
        interval_minutes=60,
        jitter_seconds=3599,
        start_at=NOW - timedelta(days=3, seconds=7),
    ),
]


@pytest.mark.parametrize(
    ("zone", "hourly"), [("Europe/Berlin", True), ("Asia/Kolkata", True), ("America/New_York", False)]
)
def test_count_runs__equals_the_run_times_bucketed(zone, hourly, monkeypatch):
    # Europe falls back on 25 October 2026, the US on 1 November: the window holds both.
    monkeypatch.setattr(runcounts, "CAP", 5000)  # the slow path's schedules counted whole here
    window = runcounts.buckets(zone, date(2026, 10, 24), 9 if hourly else 16, hourly=hourly)
    items = []
    for index, case in enumerate(CASES):
        first = timing.first_run(case, now=NOW - timedelta(hours=1))
        if first is not None:
            items.append(runcounts.Item(case, timing.dispatch_at(case, first), None, f"g{index % 5}"))
    # Two schedules sharing a cron timing, each cut at its own next run; one with runs left (max_runs).
    shared = CASES[7]
    items.append(runcounts.Item(shared, datetime(2026, 11, 1, 4, 40, tzinfo=UTC), None, "g0"))
    items.append(runcounts.Item(CASES[1], NOW + timedelta(minutes=3), 40, "g1"))
    assert counted(items, window, NOW) == oracle(items, window, NOW)


def test_count_runs__caps_the_slow_path_and_says_so():
    every_minute_with_max_runs = runcounts.Item(
        spec(schedule_type="interval", interval_minutes=1), NOW, 10**5, "a"
    )
    window = runcounts.buckets("UTC", date(2026, 10, 24), 7, hourly=True)
    counts = runcounts.count_runs([every_minute_with_max_runs], window, now=NOW)
    assert sum(counts.rows["a"]) == runcounts.CAP
    assert counts.capped_from["a"] == window.index(int((NOW + timedelta(minutes=runcounts.CAP)).timestamp()))


def test_buckets__a_fall_back_hour_happens_twice_and_a_spring_forward_hour_never():
    autumn = runcounts.buckets("Europe/Berlin", date(2026, 10, 25), 1, hourly=True)
    # 02:00 to 03:00 happens twice: one bucket of two hours under one name.
    assert len(autumn.keys) == 24
    assert autumn.bounds[-1] - autumn.bounds[0] == 25 * 3600
    two = autumn.keys.index((date(2026, 10, 25), 2))
    assert autumn.bounds[two + 1] - autumn.bounds[two] == 2 * 3600
    spring = runcounts.buckets("Europe/Berlin", date(2026, 3, 29), 1, hourly=True)
    assert len(spring.keys) == 23
    assert (date(2026, 3, 29), 2) not in spring.keys


def shared_groups(items, window: runcounts.Buckets, now: datetime):
    """The items that may be counted together, as calendar_view builds them (one group per timing and
    group), and the rest."""
    start, groups, rest = runcounts.since(window, now), {}, []
    for item in items:
        spec, first = item.spec, int(item.next_run_at.timestamp())
        if item.runs_left is not None or spec.jitter_seconds or spec.moves or spec.end_at is not None:
            rest.append(item)
        elif spec.schedule_type == "interval" and first < start + spec.interval_minutes * 60:
            alike = timing.ScheduleSpec(
                "interval", spec.interval_minutes, exclude=spec.exclude, only=spec.only
            )
            groups.setdefault((alike, item.group), []).append(first % (spec.interval_minutes * 60))
        elif spec.schedule_type == "cron" and not any(c.has_windows() for c in spec.exclude + spec.only):
            groups.setdefault((dataclasses.replace(spec, start_at=None), item.group), []).append(first)
        else:
            rest.append(item)
    return [runcounts.Shared(spec, group, sorted(values)) for (spec, group), values in groups.items()], rest


@pytest.mark.parametrize(
    ("zone", "hourly", "start"),
    [("Europe/Berlin", True, date(2026, 10, 24)), ("Asia/Kolkata", False, date(2026, 10, 20))],
)
def test_shared_groups__count_as_their_members_one_by_one(zone, hourly, start, monkeypatch):
    """Groups of alike schedules (the calendar view's path at scale) give the oracle's counts: 80
    intervals of a few lengths with scattered next runs (some overdue, some later in the window), crons
    sharing a timing with different next runs, calendars, and the one-by-one cases beside them."""
    monkeypatch.setattr(runcounts, "CAP", 5000)
    window = runcounts.buckets(zone, start, 8, hourly=hourly)
    rng = random.Random(7)
    items = []
    for index in range(80):
        minutes = rng.choice([20, 45, 60, 1440, 1440 * 3])
        calendars = rng.choice([{}, {"exclude": (WEEKEND,)}, {"only": (BUSINESS,), "exclude": (XMAS,)}])
        case = spec(schedule_type="interval", interval_minutes=minutes, **calendars)
        first = NOW + timedelta(seconds=rng.randrange(-3 * 3600, minutes * 120))
        items.append(runcounts.Item(case, first, None, f"g{index % 3}"))
    for index in range(40):
        case = CASES[rng.choice([6, 7, 8, 9, 10, 11, 13, 14])]
        first = timing.first_run(case, now=NOW + timedelta(minutes=rng.randrange(-90, 3000)))
        items.append(runcounts.Item(case, timing.dispatch_at(case, first), None, f"g{index % 2}"))
    shared, rest = shared_groups(items, window, NOW)
    assert len(shared) >= 20  # most of them counted together
    assert sum(len(g.values) for g in shared) >= 80
    counts = runcounts.count_runs(rest, window, now=NOW, shared=shared)
    out: dict = {}
    for group, row in counts.rows.items():
        for index, n in enumerate(row):
            if n:
                out.setdefault(group, Counter())[window.keys[index]] += n
    assert out == oracle(items, window, NOW)
