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
