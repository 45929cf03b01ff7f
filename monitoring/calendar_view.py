"""/dashboard/calendar: a week (per hour) or month (per day) of runs across schedules, in a viewer's zone.

Upcoming runs are counted by schedules.runcounts (the run times `upcoming_runs` gives, calendars applied,
per job); past ones are the ScheduledRun rows of the window counted by status in one GROUP BY on
`date_trunc(..., scheduled_for AT TIME ZONE zone)` (a range scan of `scheduledrun_list_idx`). Days an
exclude calendar of the shown schedules names carry the calendar's name. The page gets counts, never slots.
"""

from __future__ import annotations

import calendar as stdlib_calendar
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.db.models import Count, QuerySet
from django.db.models.functions import Trunc

from orchestrator.models import Job
from schedules import runcounts, timing
from schedules.labels import key_error, parse_selector
from schedules.models import Calendar, Schedule, ScheduledRun

VIEWS = ("week", "month")
# Past and future statuses in the order a cell lists them.
STATUS_ORDER = ("succeeded", "failed", "running", "queued", "throttled", "skipped", "cancelled")


class BadParameter(ValueError):
    """A query parameter the page cannot use; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Query:
    view: str
    first: date  # the window's first local day
    days: int
    zone: str
    labels: tuple[str, ...]
    job: str
    group_by: str = "job"  # or "label:<key>": the rows of a cell's breakdown

    @property
    def hourly(self) -> bool:
        return self.view == "week"


def parse(params, *, today: date | None = None) -> Query:
    """The page's parameters (a QueryDict), or BadParameter naming the one at fault."""
    view = params.get("view", "week") or "week"
    if view not in VIEWS:
        raise BadParameter("view", f"view must be week or month, not {view!r}.")
    zone = params.get("tz", "UTC") or "UTC"
    try:
        timing.validate_timezone(zone)
    except ValueError as exc:
        raise BadParameter("tz", f"tz: {exc}") from exc
    raw = params.get("start", "")
    if raw:
        try:
            start = date.fromisoformat(raw)
        except ValueError as exc:
            raise BadParameter("start", f"start must be a date, YYYY-MM-DD, not {raw!r}.") from exc
        if not 1971 <= start.year <= 8999:
            raise BadParameter("start", "start must lie between 1971 and 8999.")
    else:
        start = today or datetime.now(ZoneInfo(zone)).date()
    labels = tuple(value for value in params.getlist("label") if value.strip())
    try:
        parse_selector(labels)
    except ValueError as exc:
        raise BadParameter("label", f"label: {exc}") from exc
    job = params.get("job", "").strip()
    if job and not Job.objects.filter(key=job).exists():
        raise BadParameter("job", f"job: no job {job!r}.")
    group_by = params.get("group_by", "job").strip() or "job"
    if group_by != "job" and (not group_by.startswith("label:") or key_error(group_by[6:]) is not None):
        raise BadParameter("group_by", f"group_by must be job or label:<key> (label:team), not {group_by!r}.")
    if view == "week":
        return Query(view, start - timedelta(days=start.weekday()), 7, zone, labels, job, group_by)
    first = start.replace(day=1)
    days = stdlib_calendar.monthrange(first.year, first.month)[1]
    return Query(view, first, days, zone, labels, job, group_by)


def selected(query: Query) -> QuerySet:
    schedules = Schedule.objects.all()
    if query.labels:
        schedules = schedules.filter(parse_selector(query.labels))
    if query.job:
        schedules = schedules.filter(job__key=query.job)
    return schedules


class _Row:
    """What timing.spec_of reads of a schedule, from a `values()` row and its calendars' specs."""

    def __init__(self, values: dict, exclude: list, only: list):
        self.__dict__.update(values)
        self.exclude_calendars = exclude
        self.only_calendars = only


class _Cal:
    def __init__(self, spec):
        self._spec = spec

    def spec(self):
        return self._spec


_FIELDS = (
    "id", "name", "job__key", "labels", "schedule_type", "interval_minutes", "cron_expr", "timezone",
    "jitter_seconds", "start_at", "end_at", "calendar_policy", "next_run_at", "max_runs",
    "scheduled_run_count",
)  # fmt: skip


def _items(schedules: QuerySet, group_by: str) -> tuple[list[runcounts.Item], list]:
    """The enabled schedules with a next run, as runcounts items (grouped by job, or by a label's value),
    and the specs of the calendars they exclude. Calendars are read once each, not per schedule."""
    label = group_by[6:] if group_by.startswith("label:") else None
    live = schedules.filter(enabled=True, next_run_at__isnull=False)
    links: dict[str, dict[int, list[int]]] = {"exclude": defaultdict(list), "only": defaultdict(list)}
    used: set[int] = set()
    for kind, field in (("exclude", Schedule.exclude_calendars), ("only", Schedule.only_calendars)):
        through = field.through.objects.filter(schedule_id__in=live.values("id"))
        for schedule_id, calendar_id in through.values_list("schedule_id", "calendar_id"):
            links[kind][schedule_id].append(calendar_id)
            used.add(calendar_id)
    specs = {c.pk: c.spec() for c in Calendar.objects.filter(pk__in=used)}
    items = []
    for values in live.values(*_FIELDS):
        row = _Row(
            values,
            [_Cal(specs[c]) for c in links["exclude"].get(values["id"], ())],
            [_Cal(specs[c]) for c in links["only"].get(values["id"], ())],
        )
        runs_left = None if row.max_runs is None else max(0, row.max_runs - (row.scheduled_run_count or 0))
        group = row.job__key if label is None else (row.labels or {}).get(label, f"no {label}")
        items.append(runcounts.Item(timing.spec_of(row), row.next_run_at, runs_left, group))
    excluded = {c for links_ in links["exclude"].values() for c in links_}
    return items, [specs[c] for c in sorted(excluded, key=lambda c: specs[c].name)]


def past_counts(schedules: QuerySet, query: Query, window: runcounts.Buckets, *, filtered: bool) -> dict:
    """{bucket key: {status: n}} of the window's ScheduledRun rows: one GROUP BY query."""
    zone = ZoneInfo(query.zone)
    runs = ScheduledRun.objects.filter(scheduled_for__gte=window.start, scheduled_for__lt=window.end)
    if filtered:
        runs = runs.filter(schedule__in=schedules.values("id"))
    rows = (
        runs.annotate(bucket=Trunc("scheduled_for", "hour" if query.hourly else "day", tzinfo=zone))
        .values("bucket", "status")
        .annotate(n=Count("id"))
        .order_by()
    )
    out: dict = defaultdict(dict)
    for row in rows:
        local = row["bucket"].astimezone(zone)
        key = (local.date(), local.hour) if query.hourly else local.date()
        out[key][row["status"]] = out[key].get(row["status"], 0) + row["n"]
    return out


def build(query: Query, *, now: datetime) -> dict:
    """Everything the template draws."""
    schedules = selected(query)
    window = runcounts.buckets(query.zone, query.first, query.days, hourly=query.hourly)
    items, exclude_specs = _items(schedules, query.group_by)
    counts = runcounts.count_runs(items, window, now=now)
    past = past_counts(schedules, query, window, filtered=bool(query.labels or query.job))
    excluded = runcounts.excluded_days(exclude_specs, query.first, query.days)

    # Per key (a fall-back fold's two hours share one), each group's upcoming count and whether it is "N+".
    cells: dict = defaultdict(lambda: {"groups": defaultdict(int), "capped": set()})
    for group, row in counts.rows.items():
        capped_from = counts.capped_from.get(group)
        for index, n in enumerate(row):
            capped = capped_from is not None and index >= capped_from
            if n or capped:
                cell = cells[window.keys[index]]
                cell["groups"][group] += n
                if capped:
                    cell["capped"].add(group)
    now_epoch = now.timestamp()
    bucket_end = {}
    for index, key in enumerate(window.keys):
        bucket_end[key] = window.bounds[index + 1]

    def cell_for(key) -> dict:
        cell = cells.get(key)
        groups = []
        total, capped = 0, False
        if cell is not None:
            for group in sorted(cell["groups"], key=str):
                n = cell["groups"][group]
                plus = group in cell["capped"]
                groups.append({"group": group, "n": n, "plus": plus})
                total += n
                capped = capped or plus
        statuses = past.get(key, {})
        return {
            "id": f"{key[0].isoformat()}T{key[1]:02d}" if isinstance(key, tuple) else key.isoformat(),
            "exists": key in bucket_end,
            "past": key in bucket_end and bucket_end[key] <= now_epoch,
            "total": total,
            "plus": capped,
            "groups": groups,
            "statuses": [{"status": s, "n": statuses[s]} for s in STATUS_ORDER if statuses.get(s)],
        }

    days = [query.first + timedelta(days=i) for i in range(query.days)]
    day_heads = [{"day": d, "excluded": excluded.get(d, [])} for d in days]
    if query.hourly:
        grid = [{"hour": h, "cells": [cell_for((d, h)) for d in days]} for h in range(24)]
    else:
        lead = [None] * query.first.weekday()
        slots = lead + [{"day": d, "excluded": excluded.get(d, []), **cell_for(d)} for d in days]
        slots += [None] * (-len(slots) % 7)
        grid = [slots[i : i + 7] for i in range(0, len(slots), 7)]
    step = timedelta(days=7) if query.hourly else timedelta(days=32)
    previous = query.first - (timedelta(days=7) if query.hourly else timedelta(days=1))
    return {
        "query": query,
        "days": day_heads,
        "grid": grid,
        "schedules": len(items),
        "excluded_calendars": [spec.name for spec in exclude_specs],
        "previous": previous.replace(day=1) if not query.hourly else previous,
        "next": (query.first + step).replace(day=1) if not query.hourly else query.first + step,
        "now": now,
    }
