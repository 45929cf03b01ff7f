"""/dashboard/calendar: a week (per hour) or month (per day) of runs across schedules, in a viewer's zone.

Upcoming runs are counted by schedules.runcounts (the run times `upcoming_runs` gives, calendars applied,
per job or label value), most schedules in groups that run alike (`load`); past ones are the window's
scheduled runs by status: settled ones from SlotCount's quarter hours, the rest from the history
(`past_counts`). Days an exclude calendar of the shown schedules names, or an only calendar does not,
carry the calendar's name. The page gets counts, never slots.
"""

from __future__ import annotations

import calendar as stdlib_calendar
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from django.contrib.postgres.aggregates import ArrayAgg
from django.contrib.postgres.expressions import ArraySubquery
from django.db import connection, transaction
from django.db.models import (
    BigIntegerField,
    Case,
    Count,
    Exists,
    F,
    Func,
    OuterRef,
    Q,
    QuerySet,
    Sum,
    TextField,
    Value,
    When,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce, Mod

from monitoring.models import SlotCount
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


# A schedule's next run in epoch seconds (what runcounts counts in).
_NEXT = Func(
    F("next_run_at"), template="EXTRACT(EPOCH FROM %(expressions)s)::bigint", output_field=BigIntegerField()
)


def _label_value(label: str):
    """The expression naming a schedule's group by a label: its value ("no <key>" without it)."""
    return Coalesce(KeyTextTransform(label, "labels"), Value(f"no {label}"), output_field=TextField())


def load(schedules: QuerySet, group_by: str, window: runcounts.Buckets, since: int):
    """The enabled schedules with a next run, as runcounts wants them, and the calendars they exclude or
    run only on ({"exclude": [specs], "only": [specs]}).

    Most schedules come as `runcounts.Shared` groups: one GROUP BY over the schedules gives a row per
    timing, calendars and group, so the page costs about the same at 100,000 schedules as at 10,000. The
    rest (jitter, max_runs, an end inside the window, calendars with windows or next_allowed, an
    interval's next run more than one interval off) come as one `runcounts.Item` each."""
    label = group_by[6:] if group_by.startswith("label:") else None
    live = schedules.filter(enabled=True, next_run_at__isnull=False).annotate(next=_NEXT)
    through = {"exclude": Schedule.exclude_calendars.through, "only": Schedule.only_calendars.through}
    specs = {c.pk: c.spec() for c in Calendar.objects.all()}  # a few, however many schedules use them
    windowed = [pk for pk, spec in specs.items() if spec.has_windows()]

    def linked(kind: str, **extra) -> Exists:
        return Exists(through[kind].objects.filter(schedule_id=OuterRef("pk"), **extra))

    def calendar_ids(kind: str) -> Case:  # read only for the few schedules that have calendars
        ids = through[kind].objects.filter(schedule_id=OuterRef("pk")).order_by("calendar_id")
        return Case(When(linked(kind), then=ArraySubquery(ids.values("calendar_id"))))

    alike = (
        Q(jitter_seconds=0, max_runs__isnull=True)
        & (Q(end_at__isnull=True) | Q(end_at__gte=window.end))
        & ~((linked("exclude") | linked("only")) & Q(calendar_policy="next_allowed"))
        & (Q(schedule_type="cron") | Q(schedule_type="interval", next__lt=since + F("interval_minutes") * 60))
    )
    if windowed:
        alike &= ~linked("exclude", calendar_id__in=windowed) & ~linked("only", calendar_id__in=windowed)
    # One GROUP BY for intervals (members by phase: next run modulo the interval), one for the others
    # (crons, by next run). A cron whose fields hash the name (`H`) has its own slots: its name is part of
    # its timing. The schedules that are not alike come out of the same scans as ids. Grouped by job id
    # (not its key) and sorted in Python: narrow keys and no ordered aggregate keep PostgreSQL's sort small.
    common = {
        "group": F("job_id") if label is None else _label_value(label),
        "exclude": calendar_ids("exclude"),
        "only": calendar_ids("only"),
    }
    hashed = Q(cron_expr__icontains="h") & ~Q(cron_expr__startswith="@")
    phase = Mod("next", F("interval_minutes") * 60, output_field=BigIntegerField())
    queries = (
        live.filter(schedule_type="interval")
        .values("interval_minutes", "calendar_policy", **common)
        .annotate(values=ArrayAgg(phase, filter=alike), others=ArrayAgg("id", filter=~alike)),
        live.exclude(schedule_type="interval")
        .values(
            "cron_expr",
            "timezone",
            "calendar_policy",
            **common,
            key=Case(When(hashed, then=F("name")), default=Value("")),
        )
        .annotate(values=ArrayAgg("next", filter=alike), others=ArrayAgg("id", filter=~alike)),
    )
    jobs = dict(Job.objects.values_list("id", "key")) if label is None else {}
    shared, named, others = [], {"exclude": set(), "only": set()}, []
    for row in (row for query in queries for row in query.order_by()):
        others += row["others"] or ()
        if not row["values"]:
            continue
        calendars = {kind: tuple(row[kind] or ()) for kind in named}
        for kind, ids in calendars.items():
            named[kind].update(ids)
        timing_fields = (
            {"schedule_type": "interval", "interval_minutes": row["interval_minutes"]}
            if "interval_minutes" in row
            else {
                "schedule_type": "cron",
                "cron_expr": row["cron_expr"],
                "timezone": row["timezone"],
                "key": row["key"],
            }
        )
        spec = timing.ScheduleSpec(
            exclude=tuple(specs[c] for c in calendars["exclude"]),
            only=tuple(specs[c] for c in calendars["only"]),
            calendar_policy=row["calendar_policy"],
            **timing_fields,
        )
        group = jobs[row["group"]] if label is None else row["group"]
        shared.append(runcounts.Shared(spec, group, sorted(row["values"])))

    rows = list(Schedule.objects.filter(pk__in=others).values(*_FIELDS)) if others else []
    links: dict[str, dict[int, list[int]]] = {kind: defaultdict(list) for kind in through}
    for kind, model in through.items():
        pairs = model.objects.filter(schedule_id__in=[row["id"] for row in rows])
        for schedule_id, calendar_id in pairs.values_list("schedule_id", "calendar_id"):
            links[kind][schedule_id].append(calendar_id)
            named[kind].add(calendar_id)
    items = []
    for values in rows:
        row = _Row(
            values,
            [_Cal(specs[c]) for c in links["exclude"].get(values["id"], ())],
            [_Cal(specs[c]) for c in links["only"].get(values["id"], ())],
        )
        runs_left = None if row.max_runs is None else max(0, row.max_runs - (row.scheduled_run_count or 0))
        group = row.job__key if label is None else (row.labels or {}).get(label, f"no {label}")
        items.append(runcounts.Item(timing.spec_of(row), row.next_run_at, runs_left, group))
    return (
        items,
        shared,
        {kind: sorted((specs[c] for c in ids), key=lambda c: c.name) for kind, ids in named.items()},
    )


# Statuses a scheduled run leaves; its final one is counted in SlotCount when it settles.
UNSETTLED = ("queued", "throttled", "running")


def past_counts(schedules: QuerySet, query: Query, window: runcounts.Buckets, *, filtered: bool) -> dict:
    """{bucket key: {status: n}} of the window's scheduled runs, by `scheduled_for`.

    Settled ones (succeeded, failed, skipped, cancelled) come from SlotCount: a few rows per quarter hour
    (job, labels, status), kept by triggers, whatever the size of the history, and read in one GROUP BY
    per quarter. The others (queued, throttled, running: few at any time) from the history itself.
    The filters apply to a settled slot's job and labels as they were when it settled."""
    settled = SlotCount.objects.filter(quarter__gte=window.start, quarter__lt=window.end)
    if query.labels:
        settled = settled.filter(parse_selector(query.labels))
    if query.job:
        settled = settled.filter(job_id__in=Job.objects.filter(key=query.job).values("id"))
    unsettled = ScheduledRun.objects.filter(
        status__in=UNSETTLED, scheduled_for__gte=window.start, scheduled_for__lt=window.end
    )
    if filtered:
        unsettled = unsettled.filter(schedule__in=schedules.values("id"))
    out: dict = defaultdict(dict)
    rows = [
        *settled.values_list("quarter", "status").annotate(n=Sum("slots")).order_by(),
        *unsettled.values_list("scheduled_for", "status").annotate(n=Count("id")).order_by(),
    ]
    for at, status, n in rows:
        if n:
            key = window.keys[window.index(int(at.timestamp()))]
            out[key][status] = out[key].get(status, 0) + n
    return out


def build(query: Query, *, now: datetime) -> dict:
    """Everything the template draws."""
    schedules = selected(query)
    window = runcounts.buckets(query.zone, query.first, query.days, hourly=query.hourly)
    with transaction.atomic(), connection.cursor() as cursor:
        # At 100,000 schedules PostgreSQL estimates the GROUP BYs costly enough to compile them first
        # (JIT), which takes about 300 ms each, longer than running them: not for this page's queries.
        cursor.execute("SET LOCAL jit = off")
        items, shared, calendars = load(schedules, query.group_by, window, runcounts.since(window, now))
        past = past_counts(schedules, query, window, filtered=bool(query.labels or query.job))
    counts = runcounts.count_runs(items, window, now=now, shared=shared)
    excluded = runcounts.excluded_days(calendars["exclude"], query.first, query.days)
    outside = runcounts.outside_days(calendars["only"], query.first, query.days)

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
    day_heads = [{"day": d, "excluded": excluded.get(d, []), "outside": outside.get(d, [])} for d in days]
    if query.hourly:
        grid = [{"hour": h, "cells": [cell_for((d, h)) for d in days]} for h in range(24)]
    else:
        lead = [None] * query.first.weekday()
        slots = lead + [
            {"day": d, "excluded": excluded.get(d, []), "outside": outside.get(d, []), **cell_for(d)}
            for d in days
        ]
        slots += [None] * (-len(slots) % 7)
        grid = [slots[i : i + 7] for i in range(0, len(slots), 7)]
    step = timedelta(days=7) if query.hourly else timedelta(days=32)
    previous = query.first - (timedelta(days=7) if query.hourly else timedelta(days=1))
    return {
        "query": query,
        "days": day_heads,
        "grid": grid,
        "schedules": len(items) + sum(len(group.values) for group in shared),
        "excluded_calendars": [spec.name for spec in calendars["exclude"]],
        "only_calendars": [spec.name for spec in calendars["only"]],
        "previous": previous.replace(day=1) if not query.hourly else previous,
        "next": (query.first + step).replace(day=1) if not query.hourly else query.first + step,
        "now": now,
    }
