"""How many runs schedules have per hour or per day of a window: the dashboard's calendar view (issue 33.5).

Pure and clock-free, like schedules/timing.py, whose answer it counts: the run times `upcoming_runs` gives
(next_run_at on, calendars applied, within end_at), bucketed by the local hour or day of a viewer's zone.
It never lists every slot of every schedule; at 10,000 schedules that would be millions. Instead:

* an **interval** schedule's runs are `next_run_at + k * interval`, so the number before any instant is
  one division: each bucket costs two of them, whatever the interval (an every-minute schedule's 10,080
  runs in a week are counted, not listed);
* a **cron** schedule's slots are listed once per distinct timing (expression, zone, calendars), by day:
  croniter parses the fields, and on a day with no DST change near it each wall time is one subtraction
  of the zone's offset. A day near a change is walked with `timing.next_slot`, which holds the DST rules.
  Schedules sharing a timing share the list, each cut at its own next_run_at;
* **calendars** with `calendar_policy` skip and only day rules (dates, holidays, weekdays, ...) turn into
  the allowed stretches of the window, and a run counts only inside one;
* **jitter** moves each of those slots by its hashed offset, one by one;
* everything else (`max_runs`, `next_allowed`, calendar windows, `L` and `#` crons) asks
  `timing.run_times` for at most CAP runs of that schedule; a bucket from where the cap cut on is a lower
  bound ("N+").

At 100,000 schedules even a few operations per schedule and bucket are too many, so schedules that run
alike come as one `Shared` group (monitoring/calendar_view.py builds them with one GROUP BY): a cron
timing with its members' next runs, or an interval length with its members' phases. The runs all members of
an interval group have before any instant are then a sum over the group, found with one bisection of the
phases (see `_count_phases`): the cost of a bucket no longer grows with the schedules in it.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

from schedules import timing
from schedules.calendars import CalendarSpec

# At most this many run times of one schedule on the slow path (see the module's docstring).
CAP = 500
# At most this many slots of one cron timing in a window (a month of every minute is 44,640).
CRON_CAP = 50_000
_DAY = 86400
_MARGIN = timedelta(hours=3)  # as timing's _SHIFT_BOUND: no zone moves its clock by more


def _epoch(instant: datetime) -> int:
    return int(instant.timestamp())


@dataclass(frozen=True)
class Buckets:
    """The window cut at each local hour (or day) of `zone`: bucket i is [bounds[i], bounds[i + 1]) in epoch
    seconds, named keys[i] (a local date, or a (date, hour) pair). In a fall-back fold two buckets share a
    key (the hour happens twice); in a spring-forward gap an hour has none."""

    zone: str
    hourly: bool
    bounds: tuple[int, ...]
    keys: tuple[Hashable, ...]

    @property
    def start(self) -> datetime:
        return datetime.fromtimestamp(self.bounds[0], UTC)

    @property
    def end(self) -> datetime:
        return datetime.fromtimestamp(self.bounds[-1], UTC)

    def index(self, epoch: int) -> int:
        """The bucket holding `epoch` (which lies in the window)."""
        return bisect.bisect_right(self.bounds, epoch) - 1


def local_key(instant: datetime, zone: ZoneInfo, hourly: bool) -> Hashable:
    local = instant.astimezone(zone)
    return (local.date(), local.hour) if hourly else local.date()


def buckets(zone_name: str, first: date, days: int, *, hourly: bool) -> Buckets:
    """The local hours (or days) of `days` days from `first` in zone `zone_name`. A zone's hour starts on a
    quarter hour of UTC, so a walk in 15-minute steps finds every boundary."""
    zone = ZoneInfo(zone_name)
    start = datetime.combine(first, time(0), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(first + timedelta(days=days), time(0), tzinfo=zone).astimezone(UTC)
    bounds, keys = [_epoch(start)], [local_key(start, zone, hourly)]
    instant = start + timedelta(minutes=15)
    while instant < end:
        key = local_key(instant, zone, hourly)
        if key != keys[-1]:
            bounds.append(_epoch(instant))
            keys.append(key)
        instant += timedelta(minutes=15)
    bounds.append(_epoch(end))
    return Buckets(zone=zone_name, hourly=hourly, bounds=tuple(bounds), keys=tuple(keys))


@dataclass
class Counts:
    """Runs per bucket for each group, and where a group's counts become lower bounds (the cap cut)."""

    size: int
    rows: dict[Hashable, list[int]] = field(default_factory=dict)
    capped_from: dict[Hashable, int] = field(default_factory=dict)  # group -> first bucket that is "N+"

    def row(self, group: Hashable) -> list[int]:
        if group not in self.rows:
            self.rows[group] = [0] * self.size
        return self.rows[group]

    def cap(self, group: Hashable, bucket: int) -> None:
        self.capped_from[group] = min(bucket, self.capped_from.get(group, bucket))


@dataclass(frozen=True)
class Item:
    """One schedule, as the counting needs it: its timing, next run, runs left (max_runs) and group."""

    spec: timing.ScheduleSpec
    next_run_at: datetime
    runs_left: int | None
    group: Hashable


@dataclass(frozen=True)
class Shared:
    """Schedules that run alike, in one group: the same timing `spec` (no jitter, no max_runs, no end_at
    inside the window, calendars that rule out whole days and skip) and the same `group`.

    - A cron's `values` are its members' next runs (epoch seconds).
    - An interval's `values` are its members' phases, ascending: each next run's epoch second modulo the
      interval. Every member's next run must lie before `since(window, now)` plus one interval (a
      schedule whose next run is further off is an `Item`).
    """

    spec: timing.ScheduleSpec
    group: Hashable
    values: Sequence[int]


def since(window: Buckets, now: datetime) -> int:
    """The first epoch second counted: the window's start, or the next whole second from `now`."""
    return max(window.bounds[0], _epoch(now) + (1 if now.microsecond else 0))


def count_runs(
    items: Iterable[Item], window: Buckets, *, now: datetime, shared: Iterable[Shared] = ()
) -> Counts:
    """The run times of `items` and of the `shared` groups in the window from `now` on, per group and
    bucket."""
    counts = Counts(size=len(window.keys))
    start = since(window, now)
    if start >= window.bounds[-1]:
        return counts
    allowed_cache: dict[tuple, list[tuple[int, int]] | None] = {}
    crons: dict[tuple, list[int]] = {}  # (timing, group) -> its members' next runs
    jittered_cache: dict[tuple, list[int]] = {}
    for item in items:
        spec = item.spec
        allowed = _allowed(spec, window, allowed_cache)
        if item.runs_left is not None or allowed is None or _special_cron(spec):
            _count_slowly(item, window, start, counts)
        elif spec.jitter_seconds:
            _count_jittered(item, window, start, allowed, counts, jittered_cache)
        elif spec.schedule_type == "interval":
            _count_interval(item, window, start, allowed, counts)
        else:
            crons.setdefault((spec, item.group), []).append(_epoch(item.next_run_at))
    for group in shared:
        allowed = _allowed(group.spec, window, allowed_cache)
        if allowed is None:
            raise ValueError(f"{group.spec}: calendars with windows or next_allowed are counted one by one")
        if group.spec.schedule_type == "interval":
            _count_phases(group, window, start, allowed, counts)
        elif _special_cron(group.spec):
            for first in group.values:
                member = Item(group.spec, datetime.fromtimestamp(first, UTC), None, group.group)
                _count_slowly(member, window, start, counts)
        else:
            crons.setdefault((group.spec, group.group), []).extend(group.values)
    slots_cache: dict[timing.ScheduleSpec, tuple] = {}
    for (spec, group), firsts in crons.items():
        allowed = allowed_cache[(spec.exclude, spec.only, spec.calendar_policy)]
        _count_cron(spec, group, firsts, window, start, allowed, counts, slots_cache)
    return counts


# --- calendars: the allowed stretches of the window -----------------------------------------------------


def _allowed(spec: timing.ScheduleSpec, window: Buckets, cache: dict) -> list[tuple[int, int]] | None:
    """The stretches [a, b) of the window (epoch seconds) where the calendars allow a run; None when the
    calendars cannot be read by day (windows, or next_allowed, which moves runs): the slow path."""
    key = (spec.exclude, spec.only, spec.calendar_policy)
    if key in cache:
        return cache[key]
    if not spec.calendared:
        result: list[tuple[int, int]] | None = [(window.bounds[0], window.bounds[-1])]
    elif spec.moves or any(calendar.has_windows() for calendar in spec.exclude + spec.only):
        result = None
    else:
        result = _allowed_by_days(spec.exclude, spec.only, window)
    cache[key] = result
    return result


def _days_of(calendar: CalendarSpec, window: Buckets) -> list[tuple[int, int]]:
    """The stretches of the window that fall on a day `calendar` names (read in its zone)."""
    first = calendar.local_date(window.start) - timedelta(days=1)
    last = calendar.local_date(window.end) + timedelta(days=1)
    out = []
    for day in calendar.days_between(first, last + timedelta(days=1)):
        a = _epoch(calendar.day_start(day))
        b = _epoch(calendar.day_start(day + timedelta(days=1)))
        out.append((max(a, window.bounds[0]), min(b, window.bounds[-1])))
    return [(a, b) for a, b in out if a < b]


def _union(stretches: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(stretches):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _complement(stretches: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out, at = [], lo
    for a, b in stretches:
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return out


def _allowed_by_days(exclude, only, window: Buckets) -> list[tuple[int, int]]:
    lo, hi = window.bounds[0], window.bounds[-1]
    allowed = [(lo, hi)]
    if only:
        allowed = _union([s for calendar in only for s in _days_of(calendar, window)])
    excluded = _union([s for calendar in exclude for s in _days_of(calendar, window)])
    if excluded:
        keep = _complement(excluded, lo, hi)
        allowed = [(max(a, c), min(b, d)) for a, b in allowed for c, d in keep if max(a, c) < min(b, d)]
    return allowed


def excluded_days(calendars: Iterable[CalendarSpec], first: date, days: int) -> dict[date, list[str]]:
    """Each day of [first, first + days) that an exclude calendar names (in its own zone), with the names."""
    out: dict[date, list[str]] = {}
    for calendar in calendars:
        for day in calendar.days_between(first, first + timedelta(days=days)):
            out.setdefault(day, []).append(calendar.name)
    return out


def outside_days(calendars: Iterable[CalendarSpec], first: date, days: int) -> dict[date, list[str]]:
    """Each day of [first, first + days) that an only calendar does not name, with the names: its schedules
    run on none of them. Calendars of windows (hours, not days) name no day and are left out."""
    out: dict[date, list[str]] = {}
    for calendar in calendars:
        if calendar.has_windows():
            continue
        named = set(calendar.days_between(first, first + timedelta(days=days)))
        for day in (first + timedelta(days=i) for i in range(days)):
            if day not in named:
                out.setdefault(day, []).append(calendar.name)
    return out


# --- the three ways of counting -------------------------------------------------------------------------


def _end_bound(spec: timing.ScheduleSpec) -> int | None:
    """No run after end_at: the first epoch second past it."""
    return None if spec.end_at is None else _epoch(spec.end_at) + 1


def _add_between(row: list[int], window: Buckets, allowed, lo: int, hi: int | None, before: Callable) -> None:
    """Add to each bucket the runs inside the allowed stretches and [lo, hi), where `before(x)` is how many
    runs lie before instant x: its difference at the two ends of each piece."""
    for a, b in allowed:
        a, b = max(a, lo), b if hi is None else min(b, hi)
        if a >= b:
            continue
        first, last = window.index(a), window.index(b - 1)
        counted = [before(x) for x in (a, *window.bounds[first + 1 : last + 1], b)]
        for i in range(last - first + 1):
            row[first + i] += counted[i + 1] - counted[i]


def _count_interval(item: Item, window: Buckets, since: int, allowed, counts: Counts) -> None:
    t0 = _epoch(item.next_run_at)
    step = item.spec.interval_minutes * 60

    def before(x: int) -> int:  # runs t0 + k*step (k >= 0) before x >= t0: ceil((x - t0) / step)
        return -((t0 - x) // step)

    _add_between(counts.row(item.group), window, allowed, max(since, t0), _end_bound(item.spec), before)


def _count_phases(group: Shared, window: Buckets, since: int, allowed, counts: Counts) -> None:
    """An interval group's runs, summed over its members without visiting them.

    A member with phase r (its runs are r modulo the interval `step`) runs first at t, the first such
    instant at or after `since` (t < since + step). Before an instant x >= since it has ceil((x - t) / step)
    runs. Writing x = Q*step + R, that is Q + [r < R] less a number that does not depend on x. Summed over
    the n members, and with what does not depend on x dropped (a bucket's count is a difference):
    n*Q + #(phases < R), one bisection of the sorted phases."""
    step = group.spec.interval_minutes * 60
    phases, n = group.values, len(group.values)

    def before(x: int) -> int:
        q, r = divmod(x, step)
        return n * q + bisect.bisect_left(phases, r)

    _add_between(counts.row(group.group), window, allowed, since, None, before)


def _cron_key(spec: timing.ScheduleSpec) -> timing.ScheduleSpec:
    """What a cron's slots depend on: its name only when an `H` field hashes it."""
    return spec if _hashed(spec.cron_expr) else dataclasses.replace(spec, key="")


def _count_cron(spec, group, firsts: list[int], window, since, allowed, counts, cache) -> None:
    key = _cron_key(spec)
    if key not in cache:
        slots, capped = cron_slots(spec, window.start, window.end, CRON_CAP)
        if allowed != [(window.bounds[0], window.bounds[-1])]:
            starts = [a for a, _ in allowed]
            slots = [s for s in slots if (j := bisect.bisect_right(starts, s) - 1) >= 0 and s < allowed[j][1]]
        where = [window.index(s) for s in slots]
        per_bucket = [0] * len(window.keys)
        for b in where:
            per_bucket[b] += 1
        cache[key] = (slots, capped, where, per_bucket)
    slots, capped, where, per_bucket = cache[key]
    stop = _end_bound(spec)
    row = counts.row(group)
    # Each member counts the slots from its own next run on: the rest of the bucket that holds it, and
    # every later bucket whole (added once for all members below). Members with the same next run (most
    # of a timing's, at scale) are counted at once.
    whole_from = [0] * (len(per_bucket) + 1)
    for t0, alike in itertools.groupby(sorted(firsts)):
        weight = sum(1 for _ in alike)
        lo = bisect.bisect_left(slots, max(since, t0))
        if stop is not None:
            hi = bisect.bisect_left(slots, stop)
            for b in where[lo:hi]:
                row[b] += weight
        elif lo < len(slots):
            b = where[lo]
            row[b] += weight * (bisect.bisect_right(where, b, lo) - lo)
            whole_from[b + 1] += weight
        # A next_run_at set off the cron's grid (by hand) is itself the next run.
        if since <= t0 < window.bounds[-1] and (lo == len(slots) or slots[lo] != t0) and _inside(allowed, t0):
            if stop is None or t0 < stop:
                row[window.index(t0)] += weight
    members_whole = 0
    for b, n in enumerate(per_bucket):
        members_whole += whole_from[b]
        if members_whole and n:
            row[b] += members_whole * n
    if capped and slots:
        counts.cap(group, window.index(slots[-1]))


def _inside(allowed: list[tuple[int, int]], epoch: int) -> bool:
    j = bisect.bisect_right(allowed, (epoch, float("inf"))) - 1
    return j >= 0 and epoch < allowed[j][1]


def _count_jittered(item: Item, window: Buckets, since: int, allowed, counts: Counts, cache: dict) -> None:
    """Jitter moves each run a hashed offset (under the gap between slots) after its slot: the slots are
    listed as on the fast paths, from the window's start less the jitter, and each is moved."""
    spec = item.spec
    first = timing.slot_of(spec, item.next_run_at)
    if first is None:
        return
    t0, jitter = _epoch(first), spec.jitter_seconds
    lo = max(t0, since - jitter)
    stop = _end_bound(spec)
    hi = window.bounds[-1] if stop is None else min(window.bounds[-1], stop)
    if spec.schedule_type == "interval":
        step = spec.interval_minutes * 60
        begin = t0 + step * max(0, -((t0 - lo) // step))
        slots = range(begin, hi, step)[:CRON_CAP]
        capped = len(range(begin, hi, step)) > CRON_CAP
    else:
        key = (_cron_key(spec), jitter)
        if key not in cache:
            cache[key] = cron_slots(spec, window.start - timedelta(seconds=jitter), window.end, CRON_CAP)
        listed, capped = cache[key]
        slots = listed[bisect.bisect_left(listed, lo) : bisect.bisect_left(listed, hi)]
    row = counts.row(item.group)
    last = None
    for slot in slots:
        if not _inside(allowed, slot):  # a calendar rules out the slot, wherever its run would fall
            continue
        last = slot + int(timing.jitter_offset(spec, datetime.fromtimestamp(slot, UTC)).total_seconds())
        if since <= last < window.bounds[-1]:
            row[window.index(last)] += 1
    if capped and last is not None:
        counts.cap(item.group, window.index(min(max(last, window.bounds[0]), window.bounds[-1] - 1)))


def _count_slowly(item: Item, window: Buckets, since: int, counts: Counts) -> None:
    times = timing.run_times(item.spec, next_run_at=item.next_run_at, n=CAP, runs_left=item.runs_left)
    row = counts.row(item.group)
    for t in times:
        e = _epoch(t)
        if since <= e < window.bounds[-1]:
            row[window.index(e)] += 1
    if len(times) == CAP and _epoch(times[-1]) < window.bounds[-1]:
        counts.cap(item.group, max(0, window.index(max(_epoch(times[-1]), window.bounds[0]))))


def _special_cron(spec: timing.ScheduleSpec) -> bool:
    """`L` and `#` crons are walked with timing itself rather than by fields."""
    if spec.schedule_type != "cron":
        return False
    fields, nth = _fields(spec)
    return bool(nth) or any(isinstance(v, str) and v != "*" for f in fields for v in f)


def _fields(spec: timing.ScheduleSpec):
    return _expanded(spec.cron_expr, spec.key if _hashed(spec.cron_expr) else "")


@lru_cache(maxsize=4096)
def _hashed(expr: str) -> bool:
    return "h" in timing.expand_cron(expr).lower()


@lru_cache(maxsize=65536)
def _expanded(expr: str, key: str):
    """croniter's parse of the fields (`H` hashed from `key`); read-only by callers."""
    expr = timing.expand_cron(expr)
    return croniter.expand(expr, hash_id=(key.encode() or b"-") if _hashed(expr) else None)


def cron_slots(spec: timing.ScheduleSpec, start: datetime, end: datetime, cap: int) -> tuple[list[int], bool]:
    """The cron slots in [start, end) as epoch seconds, ascending, at most `cap` (and whether it cut), the
    same instants as stepping `timing.next_slot` (its DST rules), computed day by day."""
    (minutes, hours, doms, months, dows), _ = _fields(spec)
    zone = ZoneInfo(spec.timezone)
    plain = dataclasses.replace(spec, exclude=(), only=(), jitter_seconds=0, start_at=None, end_at=None)
    lo, hi = _epoch(start), _epoch(end)
    any_dom, any_dow = doms == ["*"], dows == ["*"]
    dom_set, dow_set = set(doms), {v % 7 for v in dows if v != "*"}
    month_set = None if months == ["*"] else set(months)
    hour_list = range(24) if hours == ["*"] else hours
    minute_list = range(60) if minutes == ["*"] else minutes
    out: list[int] = []
    day = start.astimezone(zone).date() - timedelta(days=1)
    last = end.astimezone(zone).date() + timedelta(days=1)
    while day <= last and len(out) < cap:
        day_lo = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
        day_hi = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
        offset = (day_lo + timedelta(hours=12)).astimezone(zone).utcoffset()
        steady = all(
            (instant).astimezone(zone).utcoffset() == offset
            for instant in (day_lo - _MARGIN, day_hi + _MARGIN)
        )
        if not steady:
            slot = timing.next_slot(plain, after=day_lo - timedelta(microseconds=1))
            while slot is not None and slot < day_hi and len(out) < cap:
                if lo <= _epoch(slot) < hi:
                    out.append(_epoch(slot))
                slot = timing.next_slot(plain, after=slot)
        elif (month_set is None or day.month in month_set) and _day_matches(
            day, any_dom, any_dow, dom_set, dow_set
        ):
            base = int(datetime.combine(day, time(0), tzinfo=UTC).timestamp()) - int(offset.total_seconds())
            for h in hour_list:
                for m in minute_list:
                    e = base + h * 3600 + m * 60
                    if lo <= e < hi:
                        out.append(e)
        day += timedelta(days=1)
    out.sort()
    return out[:cap], len(out) >= cap


def _day_matches(day: date, any_dom: bool, any_dow: bool, doms: set, dows: set) -> bool:
    """cron's rule (croniter's day_or): with both day fields restricted, either one matches."""
    dom_ok = any_dom or day.day in doms
    dow_ok = any_dow or day.isoweekday() % 7 in dows
    if not any_dom and not any_dow:
        return dom_ok or dow_ok
    return dom_ok and dow_ok
