"""Schedule services: the one place that validates, creates, edits, enables and disables schedules.

The REST API and the admin both call these functions, so a schedule saved either way passes the same
rules and gets its `next_run_at` the same way. The database constraints hold the invariants; the rules
here exist to turn a bad request into a 400 that names the field instead of an IntegrityError.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from orchestrator.models import Directive, Job, Run, Task3Scope
from schedules import runstate, timing
from schedules.dispatch import SchedulerError, launch_manual_run
from schedules.models import (
    MisfirePolicy,
    OverlapPolicy,
    Schedule,
    ScheduledRun,
    ScheduledRunStatus,
    ScheduleType,
)

logger = logging.getLogger(__name__)

# Fields a client may set; everything else (last_run_at, next_run_at, claims, timestamps) is the system's.
SCHEDULE_FIELDS = (
    "name",
    "job",
    "directive",
    "custom_directive_text",
    "enabled",
    "schedule_type",
    "interval_minutes",
    "cron_expr",
    "timezone",
    "task3_scope",
    "max_global",
    "max_per_job",
    "misfire_policy",
    "overlap_policy",
)
TIMING_FIELDS = frozenset({"schedule_type", "interval_minutes", "cron_expr", "timezone"})

# One year: longer intervals are almost certainly a unit mistake, and `upcoming` must stay within
# datetime's range.
MAX_INTERVAL_MINUTES = 365 * 24 * 60
# Directive text is instructions, not a payload; this bounds what one row can hold.
MAX_DIRECTIVE_TEXT = 100_000

# Database constraint (or unique index) name -> the field a client should fix. Postgres names the
# unique column constraint `<table>_<column>_key`; foreign keys get a hashed suffix, hence prefixes.
_CONSTRAINT_FIELDS = {
    "schedules_schedule_name_key": "name",
    "schedule_interval_xor_cron": "schedule_type",
    "schedule_directive_xor_custom_text": "directive",
    "schedule_max_global_positive": "max_global",
    "schedule_max_per_job_positive": "max_per_job",
}
_CONSTRAINT_PREFIX_FIELDS = {
    "schedules_schedule_job_id_": "job",
    "schedules_schedule_directive_id_": "directive",
}


class ScheduleInvalid(SchedulerError):
    """Bad input, as DRF-shaped errors: {"field": ["message", ...]}."""

    def __init__(self, errors: Mapping[str, list[str]]) -> None:
        super().__init__("; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in errors.items()))
        self.errors = {field: list(msgs) for field, msgs in errors.items()}


# --- Validation ---------------------------------------------------------------------------------------


def launch_errors(
    *, job: Job | None, directive: Directive | None, custom_directive_text: str, check_job_enabled: bool
) -> dict[str, list[str]]:
    """Rules shared by schedules and manual runs: an enabled job, and a directive or custom text."""
    errors: dict[str, list[str]] = {}
    if job is None:
        errors["job"] = ["This field is required."]
    elif check_job_enabled and not job.enabled:
        errors["job"] = [f"Job {job.key!r} is disabled."]
    if directive is not None and custom_directive_text:
        errors["directive"] = ["Give either directive or custom_directive_text, not both."]
    elif directive is not None and job is not None and directive.job_id not in (None, job.pk):
        errors["directive"] = [f"Directive {directive.key!r} belongs to another job."]
    if custom_directive_text and len(custom_directive_text) > MAX_DIRECTIVE_TEXT:
        errors["custom_directive_text"] = [
            f"Ensure this field has no more than {MAX_DIRECTIVE_TEXT} characters."
        ]
    return errors


def _choice_error(value: Any, choices: type) -> list[str] | None:
    if value not in choices.values:
        return [f'"{value}" is not a valid choice; expected one of {", ".join(choices.values)}.']
    return None


def schedule_errors(
    values: Mapping[str, Any], *, changed: Iterable[str], pk: int | None = None, now: datetime | None = None
) -> dict[str, list[str]]:
    """Every rule a schedule's full state must satisfy, as {"field": [messages]}; empty when valid.

    `values` holds every field of SCHEDULE_FIELDS (the row after the change); `changed` names the ones
    the caller is setting, so a schedule whose job was disabled later can still be edited or disabled.
    """
    changed = set(changed)
    errors: dict[str, list[str]] = {}

    name = values.get("name") or ""
    if not name.strip():
        errors["name"] = ["This field may not be blank."]
    elif "name" in changed and Schedule.objects.filter(name=name).exclude(pk=pk).exists():
        errors["name"] = [f"A schedule named {name!r} already exists."]

    errors.update(
        launch_errors(
            job=values.get("job"),
            directive=values.get("directive"),
            custom_directive_text=values.get("custom_directive_text") or "",
            check_job_enabled="job" in changed,
        )
    )

    for field, choices in (
        ("task3_scope", Task3Scope),
        ("misfire_policy", MisfirePolicy),
        ("overlap_policy", OverlapPolicy),
    ):
        if (problem := _choice_error(values.get(field), choices)) is not None:
            errors[field] = problem

    for field in ("max_global", "max_per_job"):
        cap = values.get(field)
        if cap is not None and cap < 1:
            errors[field] = ["Must be a positive integer (at least 1), or null for no cap."]

    timezone_name = values.get("timezone") or ""
    try:
        timing.validate_timezone(timezone_name)
    except ValueError:
        errors["timezone"] = [
            f"Unknown timezone {timezone_name!r}; use an IANA name such as 'Europe/London'."
        ]

    schedule_type = values.get("schedule_type")
    interval = values.get("interval_minutes")
    cron_expr = values.get("cron_expr") or ""
    if schedule_type == ScheduleType.INTERVAL:
        if interval is None:
            errors["interval_minutes"] = ["Required for an interval schedule."]
        elif interval < 1:
            errors["interval_minutes"] = ["Must be at least 1."]
        elif interval > MAX_INTERVAL_MINUTES:
            errors["interval_minutes"] = [f"Must be at most {MAX_INTERVAL_MINUTES} (one year)."]
        if cron_expr:
            errors["cron_expr"] = ["Must be empty for an interval schedule."]
    elif schedule_type == ScheduleType.CRON:
        if not cron_expr:
            errors["cron_expr"] = ["Required for a cron schedule, e.g. '0 2 * * *'."]
        else:
            try:
                timing.validate_cron_expr(cron_expr)
            except ValueError as exc:
                errors["cron_expr"] = [str(exc)]
        if interval is not None:
            errors["interval_minutes"] = ["Must be null for a cron schedule."]
    else:
        errors["schedule_type"] = _choice_error(schedule_type, ScheduleType) or ["Invalid schedule type."]

    # A syntactically valid cron can still never fire (`0 0 30 2 *`); find out now, not in the scheduler.
    if not errors.keys() & TIMING_FIELDS:
        try:
            timing.upcoming(timing.spec_of(_Values(values)), after=now or timezone.now(), n=5)
        except Exception:
            field = "cron_expr" if schedule_type == ScheduleType.CRON else "interval_minutes"
            errors[field] = ["This schedule has no upcoming run times."]
    return errors


class _Values:
    """Attribute access over a mapping, for timing.spec_of."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        return self._values.get(name)


def _normalise(values: dict[str, Any]) -> None:
    if isinstance(values.get("cron_expr"), str):
        # Spaces are not meaningful between cron fields; store the canonical form.
        values["cron_expr"] = " ".join(values["cron_expr"].split())
    if isinstance(values.get("timezone"), str):
        values["timezone"] = values["timezone"].strip()


def integrity_error_field(exc: IntegrityError) -> str | None:
    """The client field behind a constraint violation, by constraint name; None when not ours."""
    constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None) or ""
    if constraint in _CONSTRAINT_FIELDS:
        return _CONSTRAINT_FIELDS[constraint]
    for prefix, field in _CONSTRAINT_PREFIX_FIELDS.items():
        if constraint.startswith(prefix):
            return field
    return None


def _save(schedule: Schedule, **kwargs: Any) -> None:
    # A concurrent request can pass validation alongside this one (two creates with one name); the
    # database decides, and the loser gets the same 400 validation would have given.
    try:
        with transaction.atomic():
            schedule.save(**kwargs)
    except IntegrityError as exc:
        field = integrity_error_field(exc)
        if field is None:
            raise
        message = "A schedule with this name already exists." if field == "name" else "Violates a constraint."
        raise ScheduleInvalid({field: [message]}) from exc


def _first_slot(schedule: Schedule, now: datetime) -> datetime:
    # last_run_at is a high-water mark: the new first slot must lie after it even if a clock is behind.
    after = max(now, schedule.last_run_at) if schedule.last_run_at else now
    return timing.first_slot(timing.spec_of(schedule), now=after)


def _now(now: datetime | None) -> datetime:
    # Whole seconds: an interval anchored at 04:47:13 reads better than at 04:47:13.482913.
    return (now or timezone.now()).replace(microsecond=0)


# A scheduled run in these states has not started; deleting its schedule cancels it.
WAITING_STATUSES = (ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED)

# --- Services -----------------------------------------------------------------------------------------


@transaction.atomic
def create_schedule(*, now: datetime | None = None, **fields: Any) -> Schedule:
    """Validate and insert a schedule; `next_run_at` is its first slot after now (enabled or not)."""
    unknown = set(fields) - set(SCHEDULE_FIELDS)
    if unknown:
        raise TypeError(f"unknown schedule fields: {sorted(unknown)}")
    now = _now(now)
    schedule = Schedule(**fields)
    values = {field: getattr(schedule, field) for field in SCHEDULE_FIELDS}
    _normalise(values)
    errors = schedule_errors(values, changed=fields.keys(), now=now)
    if errors:
        raise ScheduleInvalid(errors)
    for field, value in values.items():
        setattr(schedule, field, value)
    schedule.next_run_at = _first_slot(schedule, now)
    _save(schedule)
    logger.info(
        "schedule created",
        extra={"schedule_id": schedule.pk, "job": schedule.job.key, "next_run_at": schedule.next_run_at},
    )
    return schedule


@transaction.atomic
def update_schedule(
    schedule: Schedule | int, changes: Mapping[str, Any], *, now: datetime | None = None
) -> Schedule:
    """Apply `changes` to the schedule's current row; recompute `next_run_at` when the timing changes or
    the schedule is re-enabled. Claims and `last_run_at` are the scheduler's and stay as they are."""
    unknown = set(changes) - set(SCHEDULE_FIELDS)
    if unknown:
        raise TypeError(f"unknown schedule fields: {sorted(unknown)}")
    now = _now(now)
    pk = schedule.pk if isinstance(schedule, Schedule) else schedule
    # Lock and re-read: the caller's copy may be stale, and the scheduler writes next_run_at/last_run_at.
    current = Schedule.objects.select_for_update().select_related("job").get(pk=pk)
    changes = dict(changes)
    # The type is the discriminator: switching it clears the other kind's field unless the client set it.
    new_type = changes.get("schedule_type", current.schedule_type)
    if new_type != current.schedule_type:
        if new_type == ScheduleType.CRON:
            changes.setdefault("interval_minutes", None)
        elif new_type == ScheduleType.INTERVAL:
            changes.setdefault("cron_expr", "")
    values = {field: getattr(current, field) for field in SCHEDULE_FIELDS}
    values.update(changes)
    _normalise(values)
    changed = {field for field in changes if values[field] != getattr(current, field)}
    errors = schedule_errors(values, changed=changed, pk=current.pk, now=now)
    if errors:
        raise ScheduleInvalid(errors)
    if not changed:
        return current
    was_enabled = current.enabled
    for field in changed:
        setattr(current, field, values[field])
    update_fields = set(changed)
    if changed & TIMING_FIELDS or (current.enabled and not was_enabled):
        current.next_run_at = _first_slot(current, now)
        update_fields.add("next_run_at")
    _save(current, update_fields=sorted(update_fields | {"updated_at"}))
    logger.info(
        "schedule updated",
        extra={"schedule_id": current.pk, "fields": sorted(changed), "next_run_at": current.next_run_at},
    )
    return current


def enable_schedule(schedule: Schedule | int, *, now: datetime | None = None) -> Schedule:
    """Enable; `next_run_at` is computed from now, so slots missed while disabled are not run.
    Enabling an enabled schedule changes nothing (its anchor stays)."""
    return update_schedule(schedule, {"enabled": True}, now=now)


def disable_schedule(schedule: Schedule | int) -> Schedule:
    """Disable: the row, its history and its `next_run_at` stay; the due query skips disabled rows."""
    return update_schedule(schedule, {"enabled": False})


@transaction.atomic
def delete_schedule(schedule: Schedule) -> None:
    """Delete the schedule and its ScheduledRuns (cascade); the orchestrator's Runs stay.

    Its runs that have not started end `cancelled` on their Run (they never start: the worker's start
    gate takes only queued runs); a running one finishes and keeps its outcome on its Run.
    """
    # Lock the row first: a dispatch holds it while it inserts the slot's runs, so the delete waits for
    # that commit and then sees (and cancels) what it made. Without the lock the delete could read the
    # scheduled runs before the dispatch committed one more, and fail at commit on the foreign key.
    locked = Schedule.objects.select_for_update().filter(pk=schedule.pk).first()
    if locked is None:
        return  # deleted meanwhile: the outcome the caller asked for
    waiting = ScheduledRun.objects.filter(
        schedule_id=locked.pk, status__in=WAITING_STATUSES, run_id__isnull=False
    ).values_list("run_id", flat=True)
    cancelled = runstate.run_cancel(list(waiting), f"cancelled: schedule {locked.name!r} was deleted")
    schedule_id = locked.pk
    locked.delete()
    logger.info("schedule deleted", extra={"schedule_id": schedule_id, "runs_cancelled": len(cancelled)})


def launch_run_manually(
    *, job: Job, directive: Directive | None = None, custom_directive_text: str = "", task3_scope: str
) -> Run:
    """POST /api/runs/: validate, then launch through the same path the scheduler takes."""
    errors = launch_errors(
        job=job, directive=directive, custom_directive_text=custom_directive_text, check_job_enabled=True
    )
    if (problem := _choice_error(task3_scope, Task3Scope)) is not None:
        errors["task3_scope"] = problem
    if errors:
        raise ScheduleInvalid(errors)
    run = launch_manual_run(
        job=job, directive=directive, custom_directive_text=custom_directive_text, task3_scope=task3_scope
    )
    logger.info("manual run launched", extra={"run_id": run.pk, "job": job.key})
    return run
