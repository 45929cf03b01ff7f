"""Slot math: when a schedule fires. Pure and clock-free: every function takes the time it reasons from.

(Stub: the DST-exact implementation lands next; the signatures are final.)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter


@dataclass(frozen=True)
class ScheduleSpec:
    schedule_type: str  # "interval" | "cron"
    interval_minutes: int | None = None
    cron_expr: str = ""
    timezone: str = "UTC"


def next_slot(spec: ScheduleSpec, *, after: datetime) -> datetime:
    if spec.schedule_type == "interval":
        return after + timedelta(minutes=spec.interval_minutes)
    zone = ZoneInfo(spec.timezone)
    local = after.astimezone(zone).replace(tzinfo=None)
    return croniter(spec.cron_expr, local).get_next(datetime).replace(tzinfo=zone).astimezone(ZoneInfo("UTC"))


def upcoming(spec: ScheduleSpec, *, after: datetime, n: int = 5) -> list[datetime]:
    out = []
    for _ in range(n):
        after = next_slot(spec, after=after)
        out.append(after)
    return out


# --- Interface used by the API, admin and scheduler (implementations may be refined, names are final) ---


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
    """Slots from `first` (itself a slot) up to and including `now`: the latest `limit` of them, ascending,
    and the first slot after `now`."""
    due: list[datetime] = []
    slot = first
    while slot <= now:
        due.append(slot)
        if len(due) > limit:
            due.pop(0)
        slot = next_slot(spec, after=slot)
    return due, slot


def validate_timezone(name: str) -> None:
    """Raise ValueError unless `name` is an IANA zone."""
    try:
        ZoneInfo(name)
    except Exception as exc:
        raise ValueError(f"unknown timezone {name!r}") from exc


def validate_cron_expr(expr: str) -> None:
    """Raise ValueError unless `expr` is a valid 5-field cron expression."""
    if len(expr.split()) != 5 or not croniter.is_valid(expr):
        raise ValueError(f"invalid cron expression {expr!r}: expected 5 fields like '0 2 * * *'")


def describe(spec: ScheduleSpec) -> str:
    """Human-readable timing for the admin, e.g. 'every 10 minutes' or 'cron 0 2 * * * (Europe/London)'."""
    if spec.schedule_type == "interval":
        n = spec.interval_minutes
        return "every minute" if n == 1 else f"every {n} minutes"
    return f"cron {spec.cron_expr} ({spec.timezone})"
