"""Slot math: when a schedule fires. Pure and clock-free: every function takes the time it reasons from.

Interval schedules are anchored: the slot after `s` is `s + interval`, computed in UTC, so they never
drift and DST does not touch them. Cron schedules are read in the schedule's timezone with these rules
(docs/ARCHITECTURE.md, guarantee 3), for a cron whose hour field is fixed (a number, list or range) versus
one whose hour
field is `*` or a step:

* A local time that does not exist (the spring-forward gap): a fixed-hour cron fires once, at the first
  valid instant after it (the transition itself, e.g. 02:30 -> 03:00 EDT); a wildcard-hour cron skips it,
  since it fires at every real instant and that one is not real.
* A local time that occurs twice (the fall-back fold): a fixed-hour cron fires once, on the first
  occurrence; a wildcard-hour cron fires at both, since both are real instants.

croniter walks naive wall-clock times; this module maps each to the instants above. The same rules
hold for croniter's richer syntax, which is accepted as it is: `L` (last day of the month, or `L5` the
last Friday), `#` (`1#2`, the second Monday), `H` (a minute or hour hashed from the schedule's name, as
Jenkins does) and the aliases `@hourly` ... `@yearly`, which are expanded to their five fields first.

Beyond the grid (issue 16): `jitter_seconds` delays each slot's dispatch by a deterministic offset in
[0, jitter) hashed from (schedule name, slot), so every scheduler instance computes the same time and a
run stays keyed on its slot; `start_at`/`end_at` bound the slots. `next_run_at` holds the *dispatch* time
of the next slot (so the due query needs no change); `slot_of` recovers the slot from it.

Range (issue 31): every date a client gives (start_at, end_at, a preview's `after`, a backfill's window)
lies in [EARLIEST, LATEST] (`date_range_error`), and the slot math itself never leaves what a datetime
can hold: a slot (with its jitter) that would pass the end of year 9999 does not exist, so a schedule
whose next slot lies there has no next run (`next_slot` returns None) instead of an OverflowError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cron_descriptor import FormatException as CronFormatError
from cron_descriptor import MissingFieldException as CronMissingFieldError
from cron_descriptor import WrongArgumentException as CronArgumentError
from cron_descriptor import get_description as get_cron_description
from croniter import CroniterError, croniter

from schedules.calendars import CalendarSpec

# No real zone moves its clock by more than two hours; a window of three hours around a naive time
# holds every instant that could share or swap order with it.
_SHIFT_BOUND = timedelta(hours=3)


@dataclass(frozen=True)
class ScheduleSpec:
    schedule_type: str  # "interval" | "cron"
    interval_minutes: int | None = None
    cron_expr: str = ""
    timezone: str = "UTC"
    jitter_seconds: int = 0
    start_at: datetime | None = None  # no slot before it
    end_at: datetime | None = None  # no slot after it
    # What `H` fields and the jitter hash: the schedule's name (unique, and known before it is saved,
    # so a preview shows the very times the saved schedule keeps).
    key: str = ""
    # Calendars (issue 33): slots on a day or in a window of an `exclude` calendar are ruled out, and
    # with `only` calendars every slot none of them names. `calendar_policy` says what a ruled-out
    # slot becomes: "skip" (recorded skipped) or "next_allowed" (moved; see `next_run_time`).
    exclude: tuple[CalendarSpec, ...] = ()
    only: tuple[CalendarSpec, ...] = ()
    calendar_policy: str = "skip"

    @property
    def calendared(self) -> bool:
        return bool(self.exclude or self.only)

    @property
    def moves(self) -> bool:
        """Ruled-out slots move to the next allowed day (calendar_policy next_allowed)."""
        return self.calendared and self.calendar_policy == "next_allowed"


# The aliases croniter documents, as the five fields they stand for.
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# Interval schedules with jitter keep their slots on a grid (from start_at, else the Unix epoch) so a
# slot can be told from its jittered dispatch time; see `slot_of`.
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The dates a client may give (docs/SCHEDULES.md, "Dates"): far enough either side of any real schedule,
# and far enough inside datetime's range that a preview of 100 runs of the rarest cron (29 February,
# every 4 to 8 years) from the latest of them still fits.
EARLIEST = _EPOCH
LATEST = datetime(9000, 1, 1, tzinfo=UTC)

# The slot math's own range: inside datetime's, with room for a zone's offset and the DST window
# (_SHIFT_BOUND) on either side. No slot lies outside it (see `_in_range`).
_FLOOR = datetime(1, 1, 3, tzinfo=UTC)
_CEILING = datetime(9999, 12, 30, tzinfo=UTC)
# Naive wall times beyond these cannot be mapped to instants (a zone's offset, the DST window) without
# leaving datetime's range; every instant they could map to lies outside the slot math's range anyway.
_FIRST_WALL = datetime(1, 1, 2)  # noqa: DTZ001 - a naive wall time on purpose
_LAST_WALL = datetime(9999, 12, 31)  # noqa: DTZ001


def date_range_error(value: datetime) -> str | None:
    """Why `value` (an aware datetime a client gave) is refused, or None when it lies in the range."""
    if EARLIEST <= value <= LATEST:
        return None
    return f"Must be between {EARLIEST:%Y-%m-%dT%H:%M:%SZ} and {LATEST:%Y-%m-%dT%H:%M:%SZ}."


@lru_cache(maxsize=4096)
def expand_cron(expr: str) -> str:
    """The five-field form of `expr` (an alias expanded, spacing canonical)."""
    expr = " ".join(expr.split())
    return CRON_ALIASES.get(expr.lower(), expr)


@lru_cache(maxsize=4096)
def _hashed(expr: str) -> bool:
    return "h" in expr.lower()


def _walls(expr: str, start: datetime, key: str) -> croniter:
    """croniter over naive wall times; `H` fields hash `key` (croniter refuses them without one)."""
    if _hashed(expr):
        return croniter(expr, start, hash_id=key.encode() or b"-")
    return croniter(expr, start)


def _step(walls: croniter, *, forward: bool) -> datetime | None:
    """The next (or previous) wall time, or None when there is none datetime can hold: croniter raises
    OverflowError or ValueError ("year 10000 is out of range") at the ends of the range, and
    CroniterBadDateError (a ValueError) when no date matches. A bad expression fails earlier, when the
    croniter is built, so it still raises."""
    try:
        return walls.get_next(datetime) if forward else walls.get_prev(datetime)
    except (OverflowError, ValueError):
        return None


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


@lru_cache(maxsize=4096)
def _hour_is_wildcard(expr: str) -> bool:
    # `H` alone is one hashed hour (fixed); `H/2` is a step.
    hour_field = expand_cron(expr).split()[1]
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


def _next_cron(expr: str, zone: ZoneInfo, after: datetime, key: str = "") -> datetime | None:
    expr = expand_cron(expr)
    wildcard_hour = _hour_is_wildcard(expr)
    local = after.astimezone(zone).replace(tzinfo=None)
    # Fast path: away from any transition, the next wall time is the next instant.
    if _steady(after, zone):
        wall = _step(_walls(expr, local, key), forward=True)
        if wall is None or wall > _LAST_WALL:
            return None
        candidate = wall.replace(tzinfo=zone).astimezone(UTC)
        if candidate > after and _steady(candidate, zone):
            return candidate
    # Near a transition, wall order and instant order can differ (a fold's second copy comes after
    # later wall times): collect the instants of every wall time in a window, then take the least.
    walls = _walls(expr, local - _SHIFT_BOUND, key)
    best: datetime | None = None
    horizon: datetime | None = None
    while True:
        wall = _step(walls, forward=True)
        if wall is None or wall > _LAST_WALL or (horizon is not None and wall > horizon):
            return best
        for instant in _instants(wall, zone, wildcard_hour):
            if instant > after and (best is None or instant < best):
                best = instant
                horizon = wall + _SHIFT_BOUND


def _in_range(spec: ScheduleSpec, slot: datetime | None) -> datetime | None:
    """`slot` when it and its dispatch time (up to `jitter_seconds` later) lie in the slot math's range,
    else None: such a slot does not exist."""
    if slot is None or slot < _FLOOR or slot > _CEILING - timedelta(seconds=spec.jitter_seconds):
        return None
    return slot


def next_slot(spec: ScheduleSpec, *, after: datetime) -> datetime | None:
    """The first slot strictly after `after` (an aware datetime), in UTC; None when there is none before
    the end of the range datetime holds (year 9999)."""
    if after.tzinfo is None:
        raise ValueError("next_slot needs an aware datetime")
    after = max(after.astimezone(UTC), _FLOOR)
    if after >= _CEILING or spec.schedule_type == "none":  # none: only after its upstreams (run_after)
        return None
    if spec.schedule_type == "interval":
        try:
            slot = after + timedelta(minutes=spec.interval_minutes)
        except OverflowError:
            return None
        return _in_range(spec, slot)
    return _in_range(spec, _next_cron(spec.cron_expr, _zone(spec.timezone), after, spec.key))


def upcoming(spec: ScheduleSpec, *, after: datetime, n: int = 5) -> list[datetime]:
    """The next `n` slots strictly after `after`, ascending (fewer near the end of the range)."""
    slots: list[datetime] = []
    for _ in range(n):
        after = next_slot(spec, after=after)
        if after is None:
            break
        slots.append(after)
    return slots


def _calendar_specs(schedule, field: str) -> tuple[CalendarSpec, ...]:
    """The calendars of a schedule's `field` (a model's many-to-many manager, or a list of Calendar
    rows in validated data) as CalendarSpecs; none for an unsaved model instance."""
    try:
        value = getattr(schedule, field, None)
    except ValueError:  # an unsaved model instance has no many-to-many rows yet
        return ()
    if value is None:
        return ()
    if hasattr(value, "all"):
        value = value.all()
    return tuple(calendar.spec() for calendar in value)


def spec_of(schedule) -> ScheduleSpec:
    """The slot-math view of anything with the Schedule fields (a model instance or validated data)."""
    return ScheduleSpec(
        exclude=_calendar_specs(schedule, "exclude_calendars"),
        only=_calendar_specs(schedule, "only_calendars"),
        calendar_policy=getattr(schedule, "calendar_policy", None) or "skip",
        schedule_type=schedule.schedule_type,
        interval_minutes=schedule.interval_minutes,
        cron_expr=schedule.cron_expr or "",
        timezone=schedule.timezone or "UTC",
        jitter_seconds=getattr(schedule, "jitter_seconds", 0) or 0,
        start_at=getattr(schedule, "start_at", None),
        end_at=getattr(schedule, "end_at", None),
        key=getattr(schedule, "name", "") or "",
    )


def _on_grid(spec: ScheduleSpec) -> bool:
    """Interval slots lie on a fixed grid (from start_at, else the epoch) rather than one interval from
    when the schedule was saved: with start_at (slots are start_at + k * interval), and with jitter (a
    slot must be recoverable from its dispatch time)."""
    return spec.schedule_type == "interval" and (
        spec.start_at is not None or spec.jitter_seconds > 0 or spec.moves
    )


def _grid_floor(spec: ScheduleSpec, at: datetime) -> datetime:
    """The latest grid slot at or before `at` (interval schedules on a grid)."""
    anchor = spec.start_at or _EPOCH
    step = timedelta(minutes=spec.interval_minutes)
    return (anchor + step * ((at - anchor) // step)).astimezone(UTC)


def first_slot(spec: ScheduleSpec, *, now: datetime) -> datetime | None:
    """The first slot of a schedule created or enabled at `now`: one interval ahead (or the next grid
    point), or the next cron time; never before `start_at`. None when it would lie after `end_at`."""
    if spec.schedule_type == "none":
        return None
    if _on_grid(spec):
        anchor = spec.start_at or _EPOCH
        slot = _in_range(spec, anchor.astimezone(UTC)) if anchor > now else _grid_next(spec, now)
    elif spec.start_at is not None and spec.start_at > now:
        slot = next_slot(spec, after=spec.start_at - _TICK)
    else:
        slot = next_slot(spec, after=now)
    return slot if slot is not None and within_bounds(spec, slot) else None


def _grid_next(spec: ScheduleSpec, at: datetime) -> datetime | None:
    """The first grid slot after `at` (interval schedules on a grid); None past the range."""
    try:
        return _in_range(spec, _grid_floor(spec, at) + timedelta(minutes=spec.interval_minutes))
    except OverflowError:
        return None


def within_bounds(spec: ScheduleSpec, slot: datetime) -> bool:
    """No slot before start_at or after end_at."""
    if spec.start_at is None and spec.end_at is None:
        return True
    return (spec.start_at is None or slot >= spec.start_at) and (spec.end_at is None or slot <= spec.end_at)


# --- Jitter: a slot's dispatch time ---------------------------------------------------------------------


def jitter_offset(spec: ScheduleSpec, slot: datetime) -> timedelta:
    """The deterministic delay in [0, jitter_seconds) of `slot`: a hash of (schedule name, slot), so
    every scheduler instance, the API's `upcoming` and a preview all compute the same time. Whole
    seconds, like the slots."""
    if spec.jitter_seconds <= 0:
        return timedelta(0)
    material = f"{spec.key}|{slot.astimezone(UTC).isoformat()}".encode()
    digest = hashlib.blake2b(material, digest_size=8).digest()
    return timedelta(seconds=int.from_bytes(digest, "big") % spec.jitter_seconds)


def dispatch_at(spec: ScheduleSpec, slot: datetime) -> datetime:
    """When `slot` is dispatched: the slot plus its jitter offset."""
    return slot + jitter_offset(spec, slot) if spec.jitter_seconds > 0 else slot


def slot_of(spec: ScheduleSpec, next_run_at: datetime) -> datetime | None:
    """The slot whose dispatch time is `next_run_at` (the inverse of `dispatch_at`).

    Jitter is validated to be at most the shortest gap between slots, so the slot is the latest grid
    slot at or before the dispatch time; the offset check confirms it. A `next_run_at` set off the grid
    by hand (or with a stale offset, after a rename) maps to the first grid slot at or after it, whose
    own dispatch time the scheduler then waits for. Without jitter a slot is its dispatch time. None when
    no slot is left in the range.
    """
    if spec.jitter_seconds <= 0:
        return next_run_at
    if spec.schedule_type == "interval":
        anchor = spec.start_at or _EPOCH
        candidate = _in_range(spec, _grid_floor(spec, next_run_at)) if next_run_at >= anchor else None
    else:
        candidate = prev_slot(spec, at_or_before=next_run_at)
    if candidate is not None and dispatch_at(spec, candidate) == next_run_at:
        return candidate
    before = max(next_run_at, _FLOOR) - _TICK
    if spec.schedule_type == "interval":
        return first_slot(dataclasses.replace(spec, end_at=None), now=before)
    return next_slot(spec, after=before)


def next_dispatch(spec: ScheduleSpec, slot: datetime | None) -> datetime | None:
    """The dispatch time of `slot`, or None when there is no slot or it lies past `end_at` (the schedule
    has ended)."""
    return dispatch_at(spec, slot) if slot is not None and within_bounds(spec, slot) else None


def run_times(
    spec: ScheduleSpec, *, next_run_at: datetime | None, n: int, runs_left: int | None = None
) -> list[datetime]:
    """The next `n` dispatch times (jitter applied) from `next_run_at`, within the bounds and at most
    `runs_left` of them (max_runs): what `upcoming` and a preview show."""
    if next_run_at is None:
        return []
    limit = n if runs_left is None else max(0, min(n, runs_left))
    times: list[datetime] = []
    slot = slot_of(spec, next_run_at)
    if spec.calendared and slot is not None:
        return [dispatch_at(spec, t) for t in calendar_runs(spec, start=slot, limit=limit)]
    while slot is not None and len(times) < limit and within_bounds(spec, slot):
        times.append(dispatch_at(spec, slot))
        slot = next_slot(spec, after=slot)
    return times


def upcoming_runs(schedule, *, n: int) -> list[datetime]:
    """The next `n` run times of a schedule (a model instance, or anything with its fields): the one
    answer the API's `upcoming`, the admin, the dashboard and a preview give (issue 31).

    They are the times the scheduler dispatches: `next_run_at` (the dispatch time of the next slot,
    never the slot before it) and the slots after it, jitter applied, within start_at/end_at, at most
    the runs max_runs leaves. A disabled schedule, or one with no next run (ended, max_runs completed,
    past the range), has none: enabling computes its next run from then.
    """
    if not schedule.enabled or schedule.next_run_at is None:
        return []
    max_runs = getattr(schedule, "max_runs", None)
    runs_left = None if max_runs is None else max(0, max_runs - (schedule.scheduled_run_count or 0))
    return run_times(spec_of(schedule), next_run_at=schedule.next_run_at, n=n, runs_left=runs_left)


def slots_between(
    spec: ScheduleSpec, *, start: datetime, end: datetime, anchor: datetime | None, limit: int
) -> list[datetime]:
    """The slots in [start, end) within the bounds, ascending, at most `limit` of them (a backfill).

    Interval slots continue the schedule's chain through `anchor` (a slot of it: its last or next
    one) in both directions; on a grid (start_at or jitter) they are the grid's.
    """
    # Clip to the bounds first, so a range far outside them costs nothing.
    if spec.start_at is not None:
        start = max(start, spec.start_at)
    if spec.end_at is not None:
        end = min(end, spec.end_at + _TICK)
    if spec.moves:
        # The run times (moved ones included) in [start, end).
        times: list[datetime] = []
        current = next_run_time(spec, after=max(start, _FLOOR) - _TICK)
        while current is not None and current < end and len(times) < limit:
            times.append(current)
            current = next_run_time(spec, after=current)
        return times
    if spec.schedule_type == "interval":
        step = timedelta(minutes=spec.interval_minutes)
        if _on_grid(spec) or anchor is None:
            anchor = spec.start_at or _EPOCH
        try:  # the first chain slot at or after start (None when past the range)
            slot = _in_range(spec, anchor + step * -((anchor - start) // step))
        except OverflowError:
            slot = None
    else:
        slot = next_slot(spec, after=max(start, _FLOOR) - _TICK)
    slots: list[datetime] = []
    while slot is not None and slot < end and len(slots) < limit:
        if within_bounds(spec, slot):
            slots.append(slot.astimezone(UTC))
        elif spec.end_at is not None and slot > spec.end_at:
            break
        slot = next_slot(spec, after=slot)
    if spec.calendared:  # calendar_policy skip: a ruled-out slot is not backfilled
        return [slot for slot in slots if calendar_verdict(spec, slot) is None]
    return slots


def shortest_gap(spec: ScheduleSpec, *, after: datetime, n: int = 100) -> timedelta:
    """The shortest gap between the next `n` slots after `after` (the most jitter a schedule takes)."""
    if spec.schedule_type == "interval":
        return timedelta(minutes=spec.interval_minutes)
    slots = upcoming(spec, after=after, n=n)
    if len(slots) < 2:
        raise ValueError("fewer than two slots left before the end of the range")
    return min(b - a for a, b in itertools.pairwise(slots))


def _prev_cron(expr: str, zone: ZoneInfo, at: datetime, key: str = "") -> datetime | None:
    """The latest slot at or before `at` (UTC): the mirror image of `_next_cron`, same DST rules."""
    expr = expand_cron(expr)
    wildcard_hour = _hour_is_wildcard(expr)
    local = at.astimezone(zone).replace(tzinfo=None)
    # Fast path: away from any transition, the latest wall time at or before the local time is the
    # latest instant (croniter's get_prev is strict, hence the microsecond).
    if _steady(at, zone):
        wall = _step(_walls(expr, local + timedelta(microseconds=1), key), forward=False)
        if wall is None or wall < _FIRST_WALL:
            return None
        candidate = wall.replace(tzinfo=zone).astimezone(UTC)
        if candidate <= at and _steady(candidate, zone):
            return candidate
    # Near a transition: walk wall times back from beyond the shift bound, map each to its instants
    # (none, one or two) and keep the greatest at or before `at`; walls more than the bound below the
    # best one cannot beat it.
    walls = _walls(expr, local + _SHIFT_BOUND, key)
    best: datetime | None = None
    horizon: datetime | None = None
    while True:
        wall = _step(walls, forward=False)
        if wall is None or wall < _FIRST_WALL or (horizon is not None and wall < horizon):
            return best
        for instant in _instants(wall, zone, wildcard_hour):
            if instant <= at and (best is None or instant > best):
                best = instant
                horizon = wall - _SHIFT_BOUND


def prev_slot(spec: ScheduleSpec, *, at_or_before: datetime) -> datetime | None:
    """The latest cron slot at or before `at_or_before` (aware), in UTC: the inverse of `next_slot`, so
    `prev_slot(at_or_before=t) <= t < next_slot(prev_slot(at_or_before=t))`; None when there is none
    after the start of the range datetime holds (year 1). Interval schedules have no grid without an
    anchor: see `missed_slots`."""
    if at_or_before.tzinfo is None:
        raise ValueError("prev_slot needs an aware datetime")
    if spec.schedule_type != "cron":
        raise ValueError("prev_slot is for cron schedules")
    at = min(at_or_before.astimezone(UTC), _CEILING - timedelta(seconds=spec.jitter_seconds))
    if at < _FLOOR:
        return None
    return _in_range(spec, _prev_cron(spec.cron_expr, _zone(spec.timezone), at, spec.key))


def _slots_back(spec: ScheduleSpec, *, first: datetime, now: datetime) -> Iterator[datetime]:
    """Slots from the latest at or before `now` down to `first` (a slot by contract, even one set off
    the grid by hand), newest first. Each costs one step, whatever the time since `first`."""
    now = min(now, _CEILING - timedelta(seconds=spec.jitter_seconds))  # no slot lies beyond
    if first > now:
        return
    if spec.schedule_type == "interval":
        step = timedelta(minutes=spec.interval_minutes)
        k = (now - first) // step  # counted down, never stepped below `first` (nor below year 1)
        while k >= 0:
            yield (first + step * k).astimezone(UTC)
            k -= 1
        return
    slot = prev_slot(spec, at_or_before=now)
    while slot is not None and slot > first:
        yield slot
        slot = prev_slot(spec, at_or_before=slot - _TICK)
    yield first.astimezone(UTC)


# Strictly before a slot, for walking back: slots are whole seconds, so a microsecond earlier lies
# between a slot and the one before it.
_TICK = timedelta(microseconds=1)


def missed_slots(
    spec: ScheduleSpec, *, first: datetime, now: datetime, limit: int
) -> tuple[list[datetime], datetime | None]:
    """Slots from `first` (itself a slot) up to and including `now`: the latest `limit` of them,
    ascending, and the first slot after `now` (None: none is left in the range).

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
    following: datetime | None  # the first slot after `now`; None: none is left in the range


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


# --- Calendars (issue 33): slots ruled out, and moved to the next allowed day ---------------------------

# How far ahead a search for an allowed slot or day looks, and how many of the schedule's own slots it
# examines: eight years holds the rarest day (29 February, 2096 to 2104); a schedule whose calendars
# leave nothing within them has no next run (and says so), instead of searching forever.
MAX_CALENDAR_DAYS = 366 * 8 + 2
MAX_CALENDAR_SLOTS = 5000


def calendar_verdict(spec: ScheduleSpec, instant: datetime) -> str | None:
    """Why the calendars rule out a slot at `instant`, naming the calendar; None when it is allowed."""
    for calendar in spec.exclude:
        if calendar.matches(instant):
            return f"excluded by calendar {calendar.name!r}"
    if spec.only and not any(calendar.matches(instant) for calendar in spec.only):
        names = ", ".join(repr(calendar.name) for calendar in spec.only)
        return f"not on a day of calendar {names} (only_calendars)"
    return None


def _horizon(instant: datetime) -> datetime:
    """How far a search from `instant` looks: MAX_CALENDAR_DAYS on, or the end of the slot math's range."""
    return (
        instant + timedelta(days=MAX_CALENDAR_DAYS)
        if instant < _CEILING - timedelta(days=MAX_CALENDAR_DAYS)
        else _CEILING
    )


def _excluded_span_end(calendar: CalendarSpec, instant: datetime) -> datetime:
    """The start of the first day after `instant`'s that `calendar` does not name by a day rule, when it
    names `instant`'s day (every instant before it is excluded by the calendar); else `instant`."""
    day = calendar.local_date(instant)
    if not calendar.day_matches(day):
        return instant
    try:
        for _ in range(MAX_CALENDAR_DAYS):
            day += timedelta(days=1)
            if not calendar.day_matches(day):
                break
        return max(instant, calendar.day_start(day))
    except OverflowError:  # past the end of what a date holds: nothing is allowed before it
        return _CEILING


def _named_day_start(calendar: CalendarSpec, instant: datetime) -> datetime:
    """The first instant at or after `instant` that `calendar` could name: `instant` itself when its day
    is named or the calendar has windows, else the start of the next named day."""
    day = calendar.local_date(instant)
    if calendar.has_windows() or calendar.day_matches(day):
        return instant
    try:
        for _ in range(MAX_CALENDAR_DAYS):
            day += timedelta(days=1)
            if calendar.day_matches(day):
                break
        return max(instant, calendar.day_start(day))
    except OverflowError:
        return _CEILING


def _blocked_until(spec: ScheduleSpec, instant: datetime) -> datetime:
    """An instant before which nothing from `instant` on is allowed (day rules let a search jump whole
    days; windows do not)."""
    bound = instant
    for calendar in spec.exclude:
        bound = max(bound, _excluded_span_end(calendar, instant))
    if spec.only:
        bound = max(bound, min(_named_day_start(calendar, instant) for calendar in spec.only))
    return bound


def _base_after(spec: ScheduleSpec, slot: datetime) -> datetime | None:
    """The schedule's own slot after `slot` (itself a slot, or any instant on a grid)."""
    return _grid_next(spec, slot) if _on_grid(spec) else next_slot(spec, after=slot)


def _base_at_or_before(spec: ScheduleSpec, at: datetime) -> datetime | None:
    """The schedule's latest own slot at or before `at` (cron, or an interval on a grid)."""
    if spec.schedule_type == "cron":
        return prev_slot(spec, at_or_before=at)
    if not _on_grid(spec) or (spec.start_at is not None and at < spec.start_at):
        return None
    return _in_range(spec, _grid_floor(spec, at))


def _base_at_or_after(spec: ScheduleSpec, slot: datetime, bound: datetime) -> datetime | None:
    """The first of the schedule's own slots at or after `bound`, continuing the chain through `slot`."""
    if spec.schedule_type == "interval":
        step = timedelta(minutes=spec.interval_minutes)
        try:
            return _in_range(spec, slot + step * -((slot - bound) // step))
        except OverflowError:
            return None
    return next_slot(spec, after=bound - _TICK)


def _wall_instant(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a local wall time, as a fixed-hour cron reads it: the first of a fold, the
    transition for a time in a gap."""
    return _instants(wall, zone, False)[0]


def moved_time(spec: ScheduleSpec, slot: datetime, *, before: datetime | None) -> datetime | None:
    """Where calendar_policy next_allowed moves a ruled-out `slot`: the same local time (in the
    schedule's zone, DST-exact) on the next day it is allowed, if that comes before `before` (the
    schedule's next own slot: a run that would come later merges into the schedule's own runs) and
    within MAX_CALENDAR_DAYS and end_at; else None."""
    zone = _zone(spec.timezone)
    wall = slot.astimezone(zone).replace(tzinfo=None)
    for days in range(1, MAX_CALENDAR_DAYS + 1):
        try:
            instant = _wall_instant(wall + timedelta(days=days), zone)
        except OverflowError:
            return None
        if (before is not None and instant >= before) or instant > _CEILING:
            return None
        if spec.end_at is not None and instant > spec.end_at:
            return None
        if calendar_verdict(spec, instant) is None:
            return instant
    return None


def next_allowed_slot(spec: ScheduleSpec, slot: datetime | None) -> datetime | None:
    """The first of the schedule's own slots at or after `slot` (a slot) that the calendars allow; None
    when none lies within MAX_CALENDAR_DAYS / MAX_CALENDAR_SLOTS (or before end_at)."""
    if slot is None or not spec.calendared:
        return slot
    horizon = _horizon(slot)
    for _ in range(MAX_CALENDAR_SLOTS):
        if slot is None or slot > horizon or not within_bounds(spec, slot):
            return None
        if calendar_verdict(spec, slot) is None:
            return slot
        bound = _blocked_until(spec, slot)
        slot = _base_at_or_after(spec, slot, bound) if bound > slot else _base_after(spec, slot)
    return None


def next_run_time(spec: ScheduleSpec, *, after: datetime, since: datetime | None = None) -> datetime | None:
    """calendar_policy next_allowed: the first run time strictly after `after`.

    The run times are the schedule's own slots that the calendars allow, and for each ruled-out slot
    its `moved_time`: the same local time on the next allowed day, unless the schedule's next own slot
    comes first (then the run merges into the schedule's own). Each moved time lies between its slot
    and the next, so the run times keep the slots' order. `since`: only slots after it count (a
    schedule created at `since` has no earlier slot to move). None: no run within the search bounds.
    """
    prev = _base_at_or_before(spec, after)
    if prev is not None and (since is None or prev > since) and calendar_verdict(spec, prev) is not None:
        following = _base_after(spec, prev)
        moved = moved_time(spec, prev, before=following)
        if moved is not None and moved > after:
            return moved
    slot = _base_after(spec, after)
    horizon = _horizon(after)
    for _ in range(MAX_CALENDAR_SLOTS):
        if slot is None or slot > horizon or not within_bounds(spec, slot):
            return None
        if calendar_verdict(spec, slot) is None:
            return slot
        bound = _blocked_until(spec, slot)
        if bound > slot:
            # Every slot before `bound` is ruled out, and each one's moved time (allowed, so at or after
            # `bound`) is later than the next slot, except perhaps the last one's: go straight to it.
            last = (
                _base_at_or_before(spec, bound - _TICK)
                if spec.schedule_type == "cron" or _on_grid(spec)
                else None
            )
            if last is not None and last > slot:
                slot = last
        following = _base_after(spec, slot)
        moved = moved_time(spec, slot, before=following)
        if moved is not None:
            return moved
        slot = following
    return None


def first_run(spec: ScheduleSpec, *, now: datetime) -> datetime | None:
    """The first slot of a schedule saved at `now` (`first_slot`), or with next_allowed its first run
    time; with calendar_policy skip a ruled-out slot is still the next one (the scheduler records it
    skipped when it comes)."""
    slot = first_slot(spec, now=now)
    if slot is None or not spec.moves or calendar_verdict(spec, slot) is None:
        return slot
    return next_run_time(spec, after=slot - _TICK, since=now)


def calendar_runs(spec: ScheduleSpec, *, start: datetime, limit: int) -> list[datetime]:
    """Up to `limit` run times from the slot (or, with next_allowed, the run time) `start` on, the
    calendars applied: the allowed slots, or the run times."""
    times: list[datetime] = []
    current: datetime | None = start
    if not spec.moves:
        current = next_allowed_slot(spec, current)
    while current is not None and len(times) < limit and within_bounds(spec, current):
        times.append(current)
        if spec.moves:
            current = next_run_time(spec, after=current)
        else:
            current = next_allowed_slot(spec, _base_after(spec, current))
    return times


def excluded_between(
    spec: ScheduleSpec, *, start: datetime, end: datetime, limit: int
) -> list[tuple[datetime, str]]:
    """The schedule's own slots in [start, end] the calendars rule out, with why (at most `limit`)."""
    out: list[tuple[datetime, str]] = []
    slot: datetime | None = start
    for _ in range(MAX_CALENDAR_SLOTS):
        if slot is None or slot > end or len(out) >= limit:
            break
        if (reason := calendar_verdict(spec, slot)) is not None:
            out.append((slot, reason))
        slot = _base_after(spec, slot)
    return out


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


# Each cron field and what it takes, for messages that say which field is wrong.
_CRON_FIELDS = (
    ("minute", "0-59, or H"),
    ("hour", "0-23, or H"),
    ("day-of-month", "1-31, or L for the last day"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-7 or SUN-SAT (0 and 7 are Sunday), n#k for the k-th, Ln for the last"),
)


def _parse_error(expr: str) -> str | None:
    """croniter's complaint about `expr` (five fields), or None when it parses."""
    try:
        _walls(expr, datetime(2000, 1, 1), "validate")  # noqa: DTZ001 - naive on purpose
    except Exception as exc:  # croniter raises assorted errors on odd input; all mean "invalid"
        return str(exc) or type(exc).__name__
    return None


def validate_cron_expr(expr: str) -> None:
    """Raise ValueError unless `expr` is a valid 5-field cron expression or alias; the message says
    which field is wrong and why (`61 * * * *`: the minute field is out of range)."""
    shape = "expected 5 fields (minute hour day-of-month month day-of-week) like '0 2 * * *', or @daily"
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"invalid cron expression {expr!r}: {shape}")
    expanded = expand_cron(expr)
    if expanded.startswith("@"):
        aliases = ", ".join(sorted(CRON_ALIASES))
        raise ValueError(f"invalid cron expression {expr!r}: unknown alias; use one of {aliases}")
    fields = expanded.split()
    if len(fields) != 5:
        raise ValueError(f"invalid cron expression {expr!r}: {shape}; got {len(fields)} fields")
    for index, (name, takes) in enumerate(_CRON_FIELDS):
        probe = ["*"] * 5
        probe[index] = fields[index]
        problem = _parse_error(" ".join(probe))
        if problem is not None:
            what = "out of range" if "out of range" in problem or "Invalid" in problem else "not valid"
            raise ValueError(
                f"invalid cron expression {expr!r}: the {name} field {fields[index]!r} is {what}"
                f" (it takes {takes})"
            )
    dom, dow = fields[2], fields[4]
    if dom != "*" and ("#" in dow or "l" in dow.lower()):
        # croniter finds no date for these (it cannot OR a day of the month with an nth weekday).
        raise ValueError(
            f"invalid cron expression {expr!r}: a day-of-month ({dom!r}) cannot be combined with # or L in"
            f" the day-of-week field ({dow!r}); use '*' for one of them"
        )
    if (problem := _parse_error(expanded)) is not None:
        raise ValueError(f"invalid cron expression {expr!r}: {problem}")
    try:
        _walls(expanded, datetime(2000, 1, 1), "validate").get_next(datetime)  # noqa: DTZ001
    except Exception as exc:  # e.g. "0 0 31 2 *" never fires
        raise ValueError(f"cron expression {expr!r} never fires") from exc


def _unhashed(expr: str, key: str) -> str:
    """`expr` with each `H` field replaced by the values it hashes to for `key` (what the schedule
    keeps), written as plain cron: one value, a stepped range, or a list."""
    fields = expr.split()
    expanded = croniter.expand(expr, hash_id=key.encode() or b"-")[0]
    for index, field in enumerate(fields):
        if "h" in field.lower():
            values = sorted(expanded[index])
            steps = {b - a for a, b in itertools.pairwise(values)}
            if len(values) > 2 and len(steps) == 1:
                fields[index] = f"{values[0]}-{values[-1]}/{steps.pop()}"
            else:
                fields[index] = ",".join(str(v) for v in values)
    return " ".join(fields)


def describe(spec: ScheduleSpec) -> str:
    """Human-readable timing for the API, admin and dashboard: 'every 10 minutes', 'every 2 hours',
    'At 02:00 AM, Europe/London', 'At 02:30 AM, Monday through Friday, America/New_York'. Crons are
    phrased by cron-descriptor, `H` fields as the values they hash to; a cron it cannot phrase, or one
    restricting both day fields (cron fires on either, cron-descriptor's phrase reads as both), is shown
    as written: 'cron 0 0 1 * 1 (UTC)'."""
    if spec.schedule_type == "none":
        return "no timing of its own: runs only after its upstreams (run_after)"
    if spec.schedule_type == "interval":
        n = spec.interval_minutes or 0
        for unit, size in (("day", 1440), ("hour", 60), ("minute", 1)):
            if n and n % size == 0:
                count = n // size
                return f"every {unit}" if count == 1 else f"every {count} {unit}s"
        return f"every {n} minutes"

    fallback = f"cron {spec.cron_expr} ({spec.timezone})"
    expr = expand_cron(spec.cron_expr)
    fields = expr.split()
    if len(fields) != 5 or (fields[2] != "*" and fields[4] != "*"):
        return fallback
    try:
        if _hashed(expr):
            expr = _unhashed(expr, spec.key)
        text = get_cron_description(expr)
    except (CronFormatError, CronMissingFieldError, CronArgumentError, CroniterError):
        return fallback
    return f"{text}, {spec.timezone}"
