"""Change history: a `ScheduleChange` row for every write to a schedule (issue 16.10).

Services call `record` inside the transaction that makes the change, so a change and its record commit
or roll back together. Values are stored as JSON: the job and directive by key, datetimes in ISO 8601;
a long custom directive text is stored as its length and digest (instructions, not a payload to copy
into every record).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from schedules.models import ChangeSource, Schedule, ScheduleChange

# Besides the client's fields, the pause record is part of what enable/disable change.
PAUSE_FIELDS = ("paused_note", "paused_at", "paused_by")
# Custom directive texts longer than this are recorded by length and digest.
TEXT_KEPT = 200


# Secrets (a webhook URL carries its token): history says whether one is set, and a digest that tells
# a change, never the value.
SECRET_FIELDS = frozenset({"alert_webhook_url"})


def json_value(field: str, value: Any) -> Any:
    """A field's value as history stores it."""
    if field in SECRET_FIELDS:
        if not value:
            return ""
        return f"<set, sha256 {hashlib.sha256(str(value).encode()).hexdigest()[:8]}>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict | list):
        return value  # params: JSON already (bounded by orchestrator.params.MAX_PARAMS_BYTES)
    if field in ("job", "directive"):
        return getattr(value, "key", str(value))
    text = str(value)
    if field == "custom_directive_text" and len(text) > TEXT_KEPT:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        return f"<{len(text)} characters, sha256 {digest}>"
    return text


# Many-to-many fields: recorded as the sorted names of the calendars.
CALENDAR_SETS = frozenset({"exclude_calendars", "only_calendars"})


def snapshot(schedule: Schedule, fields: Iterable[str]) -> dict[str, Any]:
    """The JSON form of `fields` of `schedule`."""
    return {
        field: _names(schedule, field)
        if field in CALENDAR_SETS
        else json_value(field, getattr(schedule, field))
        for field in fields
    }


def _names(schedule: Schedule, field: str) -> list[str]:
    if schedule.pk is None:
        return []
    return sorted(calendar.name for calendar in getattr(schedule, field).all())


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"field": {"old": ..., "new": ...}} for each field whose JSON value changed."""
    return {
        field: {"old": before.get(field), "new": after[field]}
        for field in after
        if before.get(field) != after[field]
    }


def record(
    schedule: Schedule,
    *,
    action: str,
    source: str,
    actor: str = "",
    changes: Mapping[str, Mapping[str, Any]],
) -> ScheduleChange:
    """Write one history row. `source` is api | admin | sync; `actor` the user (or file) behind it."""
    change = build(schedule, action=action, source=source, actor=actor, changes=changes)
    change.save()
    return change


def build(
    schedule: Schedule,
    *,
    action: str,
    source: str,
    actor: str = "",
    changes: Mapping[str, Mapping[str, Any]],
) -> ScheduleChange:
    """The history row `record` writes, unsaved: a bulk operation writes many in one INSERT."""
    if source not in ChangeSource.values:
        raise ValueError(f"unknown change source {source!r}")
    return ScheduleChange(
        schedule_id=schedule.pk,
        schedule_name=schedule.name,
        action=action,
        source=source,
        actor=(actor or "")[:150],
        changes=dict(changes),
    )


def history(schedule_id: int):
    """A schedule's changes, newest first (also after the schedule is deleted)."""
    return ScheduleChange.objects.filter(schedule_id=schedule_id).order_by("-at", "-id")


def record_delete(schedule: Schedule, *, source: str, actor: str = "") -> ScheduleChange:
    """The record of a delete: every field's last value (the row is about to go)."""
    change = build_delete(schedule, source=source, actor=actor)
    change.save()
    return change


def build_delete(schedule: Schedule, *, source: str, actor: str = "") -> ScheduleChange:
    """`record_delete`'s row, unsaved."""
    from schedules.services import CALENDAR_FIELDS, SCHEDULE_FIELDS

    before = snapshot(schedule, (*SCHEDULE_FIELDS, *CALENDAR_FIELDS, "managed"))
    # As create and update record it: the upstreams' names (`.all()`, so a bulk delete's prefetch serves).
    before["run_after"] = sorted(upstream.name for upstream in schedule.run_after.all())
    return build(
        schedule,
        action="delete",
        source=source,
        actor=actor,
        changes={field: {"old": value, "new": None} for field, value in before.items()},
    )


def shown(value: Any) -> str:
    """A stored value as a person reads it: text as is, `(empty)`, `(none)`, numbers and lists as JSON."""
    if value is None:
        return "(none)"
    if value == "":
        return "(empty)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def readable(changes: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(field, old, new) rows of a record's changes, values as `shown` writes them."""
    return [(field, shown(change.get("old")), shown(change.get("new"))) for field, change in changes.items()]
