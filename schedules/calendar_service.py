"""Calendar services: the one place that validates, creates, edits, imports into and deletes calendars.

The API, the admin and `manage.py import_calendar` call these. An edit recomputes `next_run_at` of every
enabled schedule that uses the calendar, in batches under row locks, and writes a ScheduleChange for
each (action `calendar`), in the transaction that saves the calendar.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Q, Value

from schedules import calendars, timing
from schedules import changes as change_log
from schedules.models import Calendar, ChangeSource, Schedule, ScheduleChange

logger = logging.getLogger(__name__)

CALENDAR_FIELDS = ("name", "timezone", "rules", "holidays")
# Schedules locked and updated per statement when a calendar edit recomputes their next runs.
RECOMPUTE_BATCH = 500
# The largest iCalendar file accepted.
MAX_ICS_BYTES = 2_000_000


class CalendarInvalid(Exception):
    """Bad input, as DRF-shaped errors: {"field": ["message", ...]} (keys such as `rules[2].date`)."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))
        self.errors = {field: list(msgs) for field, msgs in errors.items()}


class CalendarInUse(CalendarInvalid):
    """A delete of a calendar schedules still use (409)."""


def calendar_errors(values: Mapping[str, Any], *, pk: int | None = None) -> dict[str, list[str]]:
    """Every rule a calendar's full state must satisfy; empty when valid."""
    errors: dict[str, list[str]] = {}
    name = values.get("name")
    if not isinstance(name, str) or not name.strip():
        errors["name"] = ["This field may not be blank."]
    elif len(name) > 200:
        errors["name"] = ["Ensure this field has no more than 200 characters."]
    elif Calendar.objects.filter(name=name).exclude(pk=pk).exists():
        errors["name"] = [f"A calendar named {name!r} already exists."]
    zone = values.get("timezone")
    try:
        timing.validate_timezone(zone)
    except ValueError:
        errors["timezone"] = [f"Unknown timezone {zone!r}; use an IANA name such as 'Europe/London'."]
    errors.update(calendars.rules_errors(values.get("rules")))
    errors.update(calendars.holidays_errors(values.get("holidays")))
    return errors


def _save(calendar: Calendar) -> None:
    try:
        with transaction.atomic():
            calendar.save()
    except IntegrityError as exc:  # a concurrent create with the same name won
        raise CalendarInvalid({"name": ["A calendar with this name already exists."]}) from exc


@transaction.atomic
def create_calendar(**fields: Any) -> Calendar:
    unknown = set(fields) - set(CALENDAR_FIELDS)
    if unknown:
        raise TypeError(f"unknown calendar fields: {sorted(unknown)}")
    values = {"timezone": "UTC", "rules": [], "holidays": None, **fields}
    if errors := calendar_errors(values):
        raise CalendarInvalid(errors)
    values["rules"] = calendars.normalise_rules(values["rules"])
    calendar = Calendar(**values)
    _save(calendar)
    logger.info("calendar created", extra={"calendar_id": calendar.pk})
    return calendar


@transaction.atomic
def update_calendar(
    calendar: Calendar | int,
    changes: Mapping[str, Any],
    *,
    source: str = ChangeSource.API,
    actor: str = "",
    now: datetime | None = None,
) -> Calendar:
    """Apply `changes`; when the days change, recompute the next run of every schedule using it."""
    unknown = set(changes) - set(CALENDAR_FIELDS)
    if unknown:
        raise TypeError(f"unknown calendar fields: {sorted(unknown)}")
    pk = calendar.pk if isinstance(calendar, Calendar) else calendar
    current = Calendar.objects.select_for_update().get(pk=pk)
    values = {field: getattr(current, field) for field in CALENDAR_FIELDS}
    values.update(changes)
    if errors := calendar_errors(values, pk=current.pk):
        raise CalendarInvalid(errors)
    values["rules"] = calendars.normalise_rules(values["rules"])
    changed = [field for field in CALENDAR_FIELDS if values[field] != getattr(current, field)]
    if not changed:
        return current
    for field in changed:
        setattr(current, field, values[field])
    _save(current)
    recomputed = recompute_schedules(current, source=source, actor=actor, now=now, fields=changed)
    logger.info(
        "calendar updated",
        extra={"calendar_id": current.pk, "fields": changed, "schedules_recomputed": recomputed},
    )
    return current


@transaction.atomic
def delete_calendar(calendar: Calendar) -> None:
    """Delete a calendar no schedule uses (a schedule must drop it first: its slots would change)."""
    locked = Calendar.objects.select_for_update().filter(pk=calendar.pk).first()
    if locked is None:
        return
    users = list(
        Schedule.objects.filter(Q(exclude_calendars=locked) | Q(only_calendars=locked))
        .distinct()
        .order_by("name")
        .values_list("name", flat=True)[:10]
    )
    if users:
        raise CalendarInUse(
            {"calendar": [f"Used by schedules {', '.join(map(repr, users))}: remove it from them first."]}
        )
    locked.delete()


def import_ics(
    calendar: Calendar | int, data: bytes | str, *, source: str = ChangeSource.API, actor: str = ""
) -> tuple[Calendar, int]:
    """Add an iCalendar file's events to the calendar's rules (calendars.ics_rules); returns the
    calendar and how many rules were new. An edit like any other: schedules using it are recomputed."""
    if isinstance(data, str):
        data = data.encode()
    if not data:
        raise CalendarInvalid({"file": ["Send an iCalendar (.ics) file."]})
    if len(data) > MAX_ICS_BYTES:
        raise CalendarInvalid({"file": [f"At most {MAX_ICS_BYTES} bytes."]})
    pk = calendar.pk if isinstance(calendar, Calendar) else calendar
    current = Calendar.objects.get(pk=pk)
    try:
        new = calendars.ics_rules(data, timezone=current.timezone)
    except (calendars.IcsError, ValueError, TypeError, KeyError) as exc:
        raise CalendarInvalid({"file": [str(exc)[:500]]}) from exc
    except OverflowError as exc:  # an event on 9999-12-31 ends the day after, past what a date holds
        raise CalendarInvalid(
            {"file": ["An event's dates run past what a date holds (years 1 to 9999)."]}
        ) from exc
    rules = calendars.merged_rules(current.rules or [], new)
    added = len(rules) - len(current.rules or [])
    if added:
        current = update_calendar(current, {"rules": rules}, source=source, actor=actor)
    return current, added


# GET /api/calendars/{id}/days without an `end`: a year from `start`.
DEFAULT_DAYS = 366


def excluded_days(calendar: Calendar, *, start: Any, end: Any) -> tuple[date, date, list[date]]:
    """The days in [start, end) the calendar names (its windows are minutes, not days), with the range:
    `start` defaults to today in the calendar's zone, `end` to DEFAULT_DAYS after `start`."""
    errors: dict[str, list[str]] = {}
    parsed = {}
    if start is None:
        start = calendar.spec().local_date(_db_now()).isoformat()
    first, last = timing.EARLIEST.date(), timing.LATEST.date()
    if end is None and (given := _iso(start)) is not None:
        # Held to the range before adding: a year after 9999-12-01 is past what a date holds.
        end = min(min(max(given, first), last) + timedelta(days=DEFAULT_DAYS), last).isoformat()
    for field, value in (("start", start), ("end", end)):
        parsed[field] = _iso(value)
        if parsed[field] is None:
            errors[field] = ["Must be a date, YYYY-MM-DD."]
        elif not first <= parsed[field] <= last:
            # The dates docs/SCHEDULES.md ("Dates") allows everywhere a client gives one.
            errors[field] = [f"Must be between {first.isoformat()} and {last.isoformat()}."]
    if errors:
        raise CalendarInvalid(errors)
    if parsed["end"] <= parsed["start"]:
        raise CalendarInvalid({"end": ["Must be after start (end is exclusive)."]})
    if (parsed["end"] - parsed["start"]).days > calendars.MAX_DAYS_RANGE:
        raise CalendarInvalid({"end": [f"At most {calendars.MAX_DAYS_RANGE} days per call."]})
    return parsed["start"], parsed["end"], calendar.spec().days_between(parsed["start"], parsed["end"])


def _iso(value: Any) -> date | None:
    try:
        return date.fromisoformat(value) if isinstance(value, str) and len(value) == 10 else None
    except ValueError:
        return None


# --- A calendar edit moves the next runs of the schedules using it -------------------------------------


def _db_now() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        (now,) = cursor.fetchone()
    return now.replace(microsecond=0)


def recomputed_next_run(schedule: Schedule, *, now: datetime) -> datetime | None:
    """The next run of an enabled schedule after its calendars changed.

    With calendar_policy skip the next slot stays (a ruled-out slot is recorded skipped when it
    comes), unless it had none. With next_allowed the next run time is found again from the pending
    one (or now, if that is later), never at or before the high-water mark `last_run_at`.
    """
    spec = timing.spec_of(schedule)
    pending = schedule.next_run_at
    last = schedule.last_run_at
    if pending is not None and not spec.moves:
        return pending
    if pending is None:
        slot = timing.first_run(spec, now=max(now, last) if last else now)
        return timing.next_dispatch(spec, slot)
    after = min(pending, now) - timedelta(microseconds=1)
    if last is not None:
        after = max(after, last)
    if not spec.calendared:
        return pending
    return timing.next_dispatch(spec, timing.next_run_time(spec, after=after, since=last))


def recompute_schedules(
    calendar: Calendar,
    *,
    source: str = ChangeSource.API,
    actor: str = "",
    now: datetime | None = None,
    fields: Iterable[str] = (),
) -> int:
    """Recompute next_run_at of every enabled schedule using `calendar`, RECOMPUTE_BATCH rows per
    statement under row locks (the scheduler's dispatch holds the same locks), and record a change
    for each schedule using it. Returns how many schedules use it."""
    now = now or _db_now()
    ids = list(
        Schedule.objects.filter(Q(exclude_calendars=calendar) | Q(only_calendars=calendar))
        .distinct()
        .order_by("id")
        .values_list("id", flat=True)
    )
    what = ", ".join(fields)
    for start in range(0, len(ids), RECOMPUTE_BATCH):
        batch = list(
            Schedule.objects.select_for_update(of=("self",))
            .filter(pk__in=ids[start : start + RECOMPUTE_BATCH])
            .prefetch_related("exclude_calendars", "only_calendars")
            .order_by("id")
        )
        moved: list[Schedule] = []
        records: list[ScheduleChange] = []
        for schedule in batch:
            changes: dict[str, dict[str, Any]] = {
                "calendar": {"old": None, "new": f"{calendar.name}: {what}"}
            }
            if schedule.enabled:
                try:
                    new = recomputed_next_run(schedule, now=now)
                except Exception:
                    logger.exception("next run not computable", extra={"schedule_id": schedule.pk})
                    new = schedule.next_run_at
                if new != schedule.next_run_at:
                    changes["next_run_at"] = {
                        "old": change_log.json_value("next_run_at", schedule.next_run_at),
                        "new": change_log.json_value("next_run_at", new),
                    }
                    schedule.next_run_at = new
                    moved.append(schedule)
            records.append(
                ScheduleChange(
                    schedule_id=schedule.pk,
                    schedule_name=schedule.name,
                    action="calendar",
                    source=source,
                    actor=(actor or "")[:150],
                    changes=changes,
                )
            )
        if moved:
            Schedule.objects.bulk_update(moved, ["next_run_at"])
        ScheduleChange.objects.bulk_create(records)
    return len(ids)


def calendar_specs_for(schedule_ids: list[int]) -> dict[int, tuple[tuple, tuple, str]]:
    """schedule id -> (exclude specs, only specs, calendar_policy) for those of `schedule_ids` that use
    calendars (three queries, whatever the number): what the scheduler's dispatch adds to a row."""
    if not schedule_ids:
        return {}
    # One statement for both sets, on every dispatch transaction: most schedules have no calendar.
    rows = (
        Schedule.exclude_calendars.through.objects.filter(schedule_id__in=schedule_ids)
        .annotate(kind=Value("exclude"))
        .values_list("kind", "schedule_id", "calendar_id")
        .union(
            Schedule.only_calendars.through.objects.filter(schedule_id__in=schedule_ids)
            .annotate(kind=Value("only"))
            .values_list("kind", "schedule_id", "calendar_id"),
            all=True,
        )
    )
    pairs: dict[str, list[tuple[int, int]]] = {"exclude": [], "only": []}
    for kind, sid, cid in rows:
        pairs[kind].append((sid, cid))
    used = {sid for rows in pairs.values() for sid, _ in rows}
    if not used:
        return {}
    specs = {
        c.pk: c.spec()
        for c in Calendar.objects.filter(pk__in={cid for rows in pairs.values() for _, cid in rows})
    }
    policies = dict(Schedule.objects.filter(pk__in=used).values_list("id", "calendar_policy"))
    out: dict[int, tuple[tuple, tuple, str]] = {}
    for sid in used:
        exclude = tuple(sorted((specs[cid] for s, cid in pairs["exclude"] if s == sid), key=lambda c: c.name))
        only = tuple(sorted((specs[cid] for s, cid in pairs["only"] if s == sid), key=lambda c: c.name))
        out[sid] = (exclude, only, policies.get(sid, "skip"))
    return out
