"""Slot math: when a schedule fires. Pure and clock-free: every function takes the time it reasons from.

Interval schedules are anchored: the slot after `s` is `s + interval`, computed in UTC, so they never
drift and DST does not touch them. Cron schedules are read in the schedule's timezone with these rules
(DESIGN.md 6.3), for a cron whose hour field is fixed (a number, list or range) versus one whose hour
field is `*` or a step:

* A local time that does not exist (the spring-forward gap): a fixed-hour cron fires once, at the first
  valid instant after it (the transition itself, e.g. 02:30 -> 03:00 EDT); a wildcard-hour cron skips it,
  since it fires at every real instant and that one is not real.
* A local time that occurs twice (the fall-back fold): a fixed-hour cron fires once, on the first
  occurrence; a wildcard-hour cron fires at both, since both are real instants.

croniter walks naive wall-clock times; this module maps each to the instants above.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

# No real zone moves its clock by more than two hours; a window of three hours around a naive time
# holds every instant that could share or swap order with it.
_SHIFT_BOUND = timedelta(hours=3)


@dataclass(frozen=True)
class ScheduleSpec:
    schedule_type: str  # "interval" | "cron"
    interval_minutes: int | None = None
    cron_expr: str = ""
    timezone: str = "UTC"


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=4096)
def _hour_is_wildcard(expr: str) -> bool:
    hour_field = expr.split()[1]
    return "*" in hour_field or "/" in hour_field


def _offset(instant: datetime, zone: ZoneInfo) -> timedelta:
    return instant.astimezone(zone).utcoffset()


def _instants(wall: datetime, zone: ZoneInfo, wildcard_hour: bool) -> list[datetime]:
    """The UTC instants at which the naive local time `wall` fires (zero, one or two of them)."""
    first = wall.replace(tzinfo=zone, fold=0)
    second = wall.replace(tzinfo=zone, fold=1)
    first_utc = first.astimezone(UTC)
    second_utc = second.astimezone(UTC)
    if first_utc == second_utc:
        return [first_utc]
    exists = first_utc.astimezone(zone).replace(tzinfo=None) == wall
    if exists:  # a fold: the wall time happens twice
        return [first_utc, second_utc] if wildcard_hour else [first_utc]
    if wildcard_hour:
        return []
    return [_transition(second_utc, first_utc, zone)]


def _transition(before: datetime, after: datetime, zone: ZoneInfo) -> datetime:
    """The instant in (before, after] where the zone's offset changes (bisection to the second)."""
    start_offset = _offset(before, zone)
    lo, hi = before, after
    while hi - lo > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        mid = mid.replace(microsecond=0)
        if mid <= lo:
            break
        if _offset(mid, zone) == start_offset:
            lo = mid
        else:
            hi = mid
    return hi


def _steady(instant: datetime, zone: ZoneInfo) -> bool:
    """No offset change within the shift bound either side of `instant`."""
    offset = _offset(instant, zone)
    return _offset(instant - _SHIFT_BOUND, zone) == offset == _offset(instant + _SHIFT_BOUND, zone)


def _next_cron(expr: str, zone: ZoneInfo, after: datetime) -> datetime:
    wildcard_hour = _hour_is_wildcard(expr)
    local = after.astimezone(zone).replace(tzinfo=None)
    # Fast path: away from any transition, the next wall time is the next instant.
    if _steady(after, zone):
        wall = croniter(expr, local).get_next(datetime)
        candidate = wall.replace(tzinfo=zone).astimezone(UTC)
        if candidate > after and _steady(candidate, zone):
            return candidate
    # Near a transition, wall order and instant order can differ (a fold's second copy comes after
    # later wall times): collect the instants of every wall time in a window, then take the least.
    walls = croniter(expr, local - _SHIFT_BOUND)
    best: datetime | None = None
    horizon: datetime | None = None
    while True:
        wall = walls.get_next(datetime)
        if horizon is not None and wall > horizon:
            return best
        for instant in _instants(wall, zone, wildcard_hour):
            if instant > after and (best is None or instant < best):
                best = instant
                horizon = wall + _SHIFT_BOUND


def next_slot(spec: ScheduleSpec, *, after: datetime) -> datetime:
    """The first slot strictly after `after` (an aware datetime). Returned in UTC."""
    if after.tzinfo is None:
        raise ValueError("next_slot needs an aware datetime")
    if spec.schedule_type == "interval":
        return (after + timedelta(minutes=spec.interval_minutes)).astimezone(UTC)
    return _next_cron(spec.cron_expr, _zone(spec.timezone), after.astimezone(UTC))


def upcoming(spec: ScheduleSpec, *, after: datetime, n: int = 5) -> list[datetime]:
    """The next `n` slots strictly after `after`, ascending."""
    slots: list[datetime] = []
    for _ in range(n):
        after = next_slot(spec, after=after)
        slots.append(after)
    return slots


def spec_of(schedule) -> ScheduleSpec:
    """The slot-math view of anything with the Schedule fields (a model instance or validated data)."""
    return ScheduleSpec(
        schedule_type=schedule.schedule_type,
        interval_minutes=schedule.interval_minutes,
        cron_expr=schedule.cron_expr or "",
        timezone=schedule.timezone or "UTC",
    )


def first_slot(spec: ScheduleSpec, *, now: datetime) -> datetime:
    """The first slot of a schedule created or enabled at `now`: one interval ahead, or the next cron time."""
    return next_slot(spec, after=now)


def _prev_cron(expr: str, zone: ZoneInfo, at: datetime) -> datetime:
    """The latest slot at or before `at` (UTC): the mirror image of `_next_cron`, same DST rules."""
    wildcard_hour = _hour_is_wildcard(expr)
    local = at.astimezone(zone).replace(tzinfo=None)
    # Fast path: away from any transition, the latest wall time at or before the local time is the
    # latest instant (croniter's get_prev is strict, hence the microsecond).
    if _steady(at, zone):
        walls = croniter(expr, local + timedelta(microseconds=1))
        wall = walls.get_prev(datetime)
        candidate = wall.replace(tzinfo=zone).astimezone(UTC)
        if candidate <= at and _steady(candidate, zone):
            return candidate
    # Near a transition: walk wall times back from beyond the shift bound, map each to its instants
    # (none, one or two) and keep the greatest at or before `at`; walls more than the bound below the
    # best one cannot beat it.
    walls = croniter(expr, local + _SHIFT_BOUND)
    best: datetime | None = None
    horizon: datetime | None = None
    while True:
        wall = walls.get_prev(datetime)
        if horizon is not None and wall < horizon:
            return best
        for instant in _instants(wall, zone, wildcard_hour):
            if instant <= at and (best is None or instant > best):
                best = instant
                horizon = wall - _SHIFT_BOUND


def prev_slot(spec: ScheduleSpec, *, at_or_before: datetime) -> datetime:
    """The latest cron slot at or before `at_or_before` (aware), in UTC: the inverse of `next_slot`, so
    `prev_slot(at_or_before=t) <= t < next_slot(prev_slot(at_or_before=t))`. Interval schedules have no
    grid without an anchor: see `missed_slots`."""
    if at_or_before.tzinfo is None:
        raise ValueError("prev_slot needs an aware datetime")
    if spec.schedule_type != "cron":
        raise ValueError("prev_slot is for cron schedules")
    return _prev_cron(spec.cron_expr, _zone(spec.timezone), at_or_before.astimezone(UTC))


def _slots_back(spec: ScheduleSpec, *, first: datetime, now: datetime) -> Iterator[datetime]:
    """Slots from the latest at or before `now` down to `first` (a slot by contract, even one set off
    the grid by hand), newest first. Each costs one step, whatever the time since `first`."""
    if first > now:
        return
    if spec.schedule_type == "interval":
        step = timedelta(minutes=spec.interval_minutes)
        slot = first + step * ((now - first) // step)
        while slot >= first:
            yield slot.astimezone(UTC)
            slot -= step
        return
    slot = prev_slot(spec, at_or_before=now)
    while slot > first:
        yield slot
        slot = prev_slot(spec, at_or_before=slot - _TICK)
    yield first.astimezone(UTC)


# Strictly before a slot, for walking back: slots are whole seconds, so a microsecond earlier lies
# between a slot and the one before it.
_TICK = timedelta(microseconds=1)


def missed_slots(
    spec: ScheduleSpec, *, first: datetime, now: datetime, limit: int
) -> tuple[list[datetime], datetime]:
    """Slots from `first` (itself a slot) up to and including `now`: the latest `limit` of them,
    ascending, and the first slot after `now`.

    The cost is that of the slots returned, never of the time since `first`: interval schedules are
    computed on their anchored grid, cron ones walk back from the latest slot at or before `now`, so a
    month behind costs no more than a minute (the catch-up runs under row locks; issue 15.3).
    """
    due = list(itertools.islice(_slots_back(spec, first=first, now=now), max(0, limit)))
    if not due:
        return [], first if first > now else next_slot(spec, after=now)
    due.reverse()
    return due, next_slot(spec, after=due[-1])


@dataclass(frozen=True)
class DueSlots:
    """A schedule's due slots split at the instant before which a slot counts as missed."""

    on_time: list[datetime]  # ascending, at most `limit` (the latest ones)
    latest_missed: datetime | None  # None if no slot is missed (or `limit` on-time ones came first)
    following: datetime  # the first slot after `now`


def split_due(
    spec: ScheduleSpec, *, first: datetime, now: datetime, missed_before: datetime, limit: int
) -> DueSlots:
    """The due slots from `first` to `now` that are on time (at or after `missed_before`), and the latest
    missed one: what `run_once` and `skip` need, found by walking back from `now` only through the
    on-time slots plus one, never through a whole downtime."""
    on_time: list[datetime] = []
    latest_missed: datetime | None = None
    for slot in _slots_back(spec, first=first, now=now):
        if slot < missed_before:
            latest_missed = slot
            break
        on_time.append(slot)
        if len(on_time) >= limit:
            break
    on_time.reverse()
    newest = on_time[-1] if on_time else latest_missed
    following = next_slot(spec, after=newest) if newest is not None else first
    return DueSlots(on_time=on_time, latest_missed=latest_missed, following=following)


# Files in the zone database that are not zones: `localtime` is whatever the host is set to (a schedule
# must not change meaning with the machine it is read on), `Factory` a placeholder, the rest aliases.
_NOT_ZONES = {"localtime", "posixrules", "Factory"}


def validate_timezone(name: str) -> None:
    """Raise ValueError unless `name` is an IANA zone."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"unknown timezone {name!r}")
    if name in _NOT_ZONES or name.startswith(("posix/", "right/")):
        raise ValueError(f"unknown timezone {name!r}: name an IANA zone such as 'Europe/Berlin'")
    try:
        _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc


def validate_cron_expr(expr: str) -> None:
    """Raise ValueError unless `expr` is a valid 5-field cron expression."""
    message = f"invalid cron expression {expr!r}: expected 5 fields like '0 2 * * *'"
    if not isinstance(expr, str) or len(expr.split()) != 5:
        raise ValueError(message)
    try:
        valid = croniter.is_valid(expr)
    except Exception:  # croniter raises assorted errors on odd input; all mean "invalid"
        valid = False
    if not valid:
        raise ValueError(message)
    try:
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)  # noqa: DTZ001 - naive on purpose
    except Exception as exc:  # e.g. "0 0 31 2 *" never fires
        raise ValueError(f"cron expression {expr!r} never fires") from exc


def describe(spec: ScheduleSpec) -> str:
    """Human-readable timing for the admin: 'every 10 minutes', 'every 2 hours', 'At 02:00 AM, Europe/London',
    'At 02:30 AM, Monday through Friday, America/New_York', 'Every 15 minutes, UTC'. Crons this does not
    phrase are shown as written, e.g. 'cron 5,35 1-3 * * * (UTC)'."""
    if spec.schedule_type == "interval":
        n = spec.interval_minutes or 0
        for unit, size in (("day", 1440), ("hour", 60), ("minute", 1)):
            if n and n % size == 0:
                count = n // size
                return f"every {unit}" if count == 1 else f"every {count} {unit}s"
        return f"every {n} minutes"

    days = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    months = ["", "January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"]  # fmt: skip
    fallback = f"cron {spec.cron_expr} ({spec.timezone})"
    fields = spec.cron_expr.split()
    if len(fields) != 5:
        return fallback
    minute, hour, dom, month, dow = fields

    def number(field: str, top: int) -> int | None:
        return int(field) if field.isdigit() and int(field) <= top else None

    def day_name(field: str) -> str | None:
        if field.isdigit() and int(field) <= 7:
            return days[int(field)]
        matches = [d for d in days if d[:3].lower() == field.lower()]
        return matches[0] if matches else None

    # When in the day.
    if minute == "*" and hour == "*":
        when = "Every minute"
    elif minute.startswith("*/") and minute[2:].isdigit() and hour == "*":
        when = f"Every {int(minute[2:])} minutes"
    elif number(minute, 59) is not None and hour == "*":
        when = f"At {int(minute)} minutes past every hour"
    elif number(minute, 59) is not None and number(hour, 23) is not None:
        h, m = int(hour), int(minute)
        when = f"At {(h % 12) or 12:02d}:{m:02d} {'AM' if h < 12 else 'PM'}"
    else:
        return fallback

    # Which days. With both day fields set, cron fires when either matches: too subtle for one phrase.
    if dom != "*" and dow != "*":
        return fallback
    parts = [when]
    if dow != "*":
        if "-" in dow and len(dow.split("-")) == 2:
            first, last = (day_name(d) for d in dow.split("-"))
            if first is None or last is None:
                return fallback
            parts.append(f"{first} through {last}")
        else:
            names = [day_name(d) for d in dow.split(",")]
            if None in names:
                return fallback
            parts.append("only on " + ", ".join(names))  # type: ignore[arg-type]
    if dom != "*":
        if number(dom, 31) is None:
            return fallback
        parts.append(f"on day {int(dom)} of the month")
    if month != "*":
        if number(month, 12) is None or int(month) == 0:
            return fallback
        parts.append(f"only in {months[int(month)]}")
    parts.append(spec.timezone)
    return ", ".join(parts)
