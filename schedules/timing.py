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

from collections import deque
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


def missed_slots(
    spec: ScheduleSpec, *, first: datetime, now: datetime, limit: int
) -> tuple[list[datetime], datetime]:
    """Slots from `first` (itself a slot) up to and including `now`: the latest `limit` of them,
    ascending, and the first slot after `now`.

    Interval schedules jump straight to the tail, so a year of downtime costs no more than a minute.
    """
    if spec.schedule_type == "interval":
        step = timedelta(minutes=spec.interval_minutes)
        if first > now:
            return [], first
        count = (now - first) // step + 1
        taken = min(count, limit)
        last = first + step * (count - 1)
        due = [last - step * i for i in range(taken - 1, -1, -1)]
        return [slot.astimezone(UTC) for slot in due], (last + step).astimezone(UTC)
    due: deque[datetime] = deque(maxlen=limit)
    slot = first
    while slot <= now:
        due.append(slot)
        slot = next_slot(spec, after=slot)
    return list(due), slot


def validate_timezone(name: str) -> None:
    """Raise ValueError unless `name` is an IANA zone."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"unknown timezone {name!r}")
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
    """Human-readable timing for the admin, e.g. 'every 10 minutes' or 'cron 0 2 * * * (Europe/London)'."""
    if spec.schedule_type == "interval":
        n = spec.interval_minutes
        return "every minute" if n == 1 else f"every {n} minutes"
    return f"cron {spec.cron_expr} ({spec.timezone})"
