"""Schedule services: the one place that validates, creates, edits, enables and disables schedules.

The REST API and the admin both call these functions, so a schedule saved either way passes the same
rules and gets its `next_run_at` the same way. The database constraints hold the invariants; the rules
here exist to turn a bad request into a 400 that names the field instead of an IntegrityError.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from orchestrator import retry_policy
from orchestrator.models import Directive, Job, Run, Task3Scope, Trigger
from orchestrator.params import params_errors
from orchestrator.services import OrchestratorService
from project import outbound
from schedules import changes as change_log
from schedules import dependencies, runstate, timing
from schedules.dispatch import SchedulerError, message_for
from schedules.dispatch import run_now as dispatch_run_now
from schedules.labels import label_errors
from schedules.models import (
    SCHEDULED_RUN_UNFINISHED,
    Calendar,
    CalendarPolicy,
    ChangeSource,
    MisfirePolicy,
    OverlapPolicy,
    RunAfterMode,
    Schedule,
    ScheduleDependency,
    ScheduledRun,
    ScheduledRunStatus,
    ScheduleType,
)
from schedules.publishing import publish_on_commit, time_limits

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
    "jitter_seconds",
    "start_at",
    "end_at",
    "max_runs",
    "catchup_window_seconds",
    "history_keep",
    "alert_after_failures",
    "alert_after_seconds",
    "alert_webhook_url",
    "pause_after_failures",
    "params",
    "labels",
    "retry_policy",
    "run_after_statuses",
    "run_after_mode",
)
# Calendars (issue 33): the calendars a schedule's slots are ruled out by (exclude) or kept to (only),
# and what a ruled-out slot becomes. Set through the same services, recorded in the same history; not
# declared by schedules files (sync_schedules leaves them as they are).
CALENDAR_SETS = ("exclude_calendars", "only_calendars")
CALENDAR_FIELDS = (*CALENDAR_SETS, "calendar_policy")
# Set with the schedule but stored apart (the schedules_scheduledependency table): the upstreams, as
# Schedule instances (the API and admin resolve ids or names); history records them by name.
RELATION_FIELDS = ("run_after",)
TIMING_FIELDS = frozenset(
    {"schedule_type", "interval_minutes", "cron_expr", "timezone", "jitter_seconds", "start_at", "end_at"}
)
# A managed schedule (declared in a schedules file, manage.py sync_schedules) takes changes of these
# from the file only: every field the file declares, which is every client field but `enabled` (a field
# the file leaves out is declared as its default). The API and admin may still enable and disable it.
MANAGED_FIELDS = (*(field for field in SCHEDULE_FIELDS if field != "enabled"), *RELATION_FIELDS)

# Jitter spreads a slot over at most a day (and never past the next slot: see schedule_errors).
MAX_JITTER_SECONDS = 24 * 3600
# A catch-up window longer than this is a unit mistake (it would run slots weeks late).
MAX_CATCHUP_WINDOW_SECONDS = 30 * 24 * 3600
# Backfill: slots one call may create (issue 16.6).
MAX_BACKFILL_SLOTS = 1000
# The longest pause note (the column's size).
PAUSE_NOTE_MAX = 500
# Preview: how many run times, by default and at most.
PREVIEW_COUNT = 10
MAX_PREVIEW_COUNT = 100

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
    "schedule_pause_after_failures_positive": "pause_after_failures",
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


class ScheduleManaged(ScheduleInvalid):
    """An edit of a field a schedules file declares (409: the file, not the API, owns it)."""


class ScheduleInUse(ScheduleInvalid):
    """A delete of a schedule other schedules run after (409), unless they go in the same delete.

    Dropping the upstream from their run_after behind their back would change them with no change
    record, and leave a dependency-only (`none`) downstream with no upstream: a state create refuses."""


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


def run_params_errors(job: Job, params: Any) -> dict[str, list[str]]:
    """`params` against the job's `params_schema`: {"params": ["$.path: message", ...]} or {}."""
    problems = params_errors(job.params_schema, params)
    return {"params": problems} if problems else {}


def _choice_error(value: Any, choices: type) -> list[str] | None:
    if value not in choices.values:
        return [f'"{value}" is not a valid choice; expected one of {", ".join(choices.values)}.']
    return None


def schedule_errors(
    values: Mapping[str, Any],
    *,
    changed: Iterable[str],
    pk: int | None = None,
    now: datetime | None = None,
    run_count: int = 0,
) -> dict[str, list[str]]:
    """Every rule a schedule's full state must satisfy, as {"field": [messages]}; empty when valid.

    `values` holds every field of SCHEDULE_FIELDS (the row after the change); `changed` names the ones
    the caller is setting, so a schedule whose job was disabled later can still be edited or disabled.
    `run_count` is the schedule's scheduled_run_count (max_runs).
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
        ("run_after_mode", RunAfterMode),
    ):
        if (problem := _choice_error(values.get(field), choices)) is not None:
            errors[field] = problem

    for field in ("max_global", "max_per_job"):
        cap = values.get(field)
        if cap is not None and cap < 1:
            errors[field] = ["Must be a positive integer (at least 1), or null for no cap."]

    # Checked when they or the job change: a job whose schema changed later must not block a disable
    # (its runs fail at start instead, saying why).
    if changed & {"params", "job"} and values.get("job") is not None:
        errors.update(run_params_errors(values["job"], values.get("params")))
    if "labels" in changed and (problems := label_errors(values.get("labels"))):
        errors["labels"] = problems
    if "retry_policy" in changed and values.get("retry_policy") is not None:
        problems = retry_policy.policy_errors(values["retry_policy"])
        if problems:
            errors["retry_policy"] = [
                f"{key}: {message}" for key, msgs in problems.items() for message in msgs
            ]
    if problems := dependencies.status_errors(values.get("run_after_statuses")):
        errors["run_after_statuses"] = problems
    if "run_after" in values:
        errors.update(_run_after_errors(values, pk=pk))
    errors.update(limit_errors(values, run_count=run_count, enabling="enabled" in changed))
    errors.update(timing_errors(values, now=now))
    if values.get("alert_webhook_url") and "alert_webhook_url" in changed:
        errors.update(webhook_errors(values["alert_webhook_url"]))
    return errors


def webhook_errors(url: str) -> dict[str, list[str]]:
    """A webhook must reach public addresses only, unless its host is in ALERT_WEBHOOK_ALLOWED_HOSTS
    (project/outbound.py). A host that does not resolve now is accepted: every send checks again."""
    try:
        outbound.webhook_target(url)
    except outbound.Unresolved:
        return {}
    except outbound.Refused as exc:
        return {"alert_webhook_url": [f"Refused: {exc}."]}
    return {}


def limit_errors(
    values: Mapping[str, Any], *, run_count: int = 0, enabling: bool = False
) -> dict[str, list[str]]:
    """max_runs and the catch-up window. A schedule that completed its max_runs is not enabled again
    unless max_runs is raised or cleared: it would only disable itself again."""
    errors: dict[str, list[str]] = {}
    max_runs = values.get("max_runs")
    if max_runs is not None and max_runs < 1:
        errors["max_runs"] = ["Must be at least 1, or null for no limit."]
    elif max_runs is not None and values.get("enabled") and enabling and run_count >= max_runs:
        errors["max_runs"] = [
            f"The schedule completed {run_count} of {max_runs} runs; raise or clear max_runs to enable it."
        ]
    pause = values.get("pause_after_failures")
    if pause is not None and pause < 1:
        errors["pause_after_failures"] = ["Must be at least 1, or null to never pause."]
    overdue = values.get("alert_after_seconds")
    if overdue is not None and overdue < 1:
        errors["alert_after_seconds"] = ["Must be at least 1 second, or null for no overdue alert."]
    window = values.get("catchup_window_seconds")
    if window is not None and not 0 <= window <= MAX_CATCHUP_WINDOW_SECONDS:
        errors["catchup_window_seconds"] = [
            f"Must be between 0 and {MAX_CATCHUP_WINDOW_SECONDS} seconds (30 days), or null for the default."
        ]
    return errors


def date_error(value: Any) -> str | None:
    """Why a date a client gave is refused: not an aware datetime, or outside the documented range
    (timing.EARLIEST .. timing.LATEST, docs/SCHEDULES.md "Dates"); None if fine."""
    if not isinstance(value, datetime) or value.tzinfo is None:
        return "Must be an aware date-time with a UTC offset, e.g. 2026-01-01T00:00:00Z."
    return timing.date_range_error(value)


def timing_errors(values: Mapping[str, Any], *, now: datetime | None = None) -> dict[str, list[str]]:
    """The rules of the timing fields alone (type, interval or cron, timezone, jitter, bounds): what
    create and a preview share."""
    errors: dict[str, list[str]] = {}
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
    elif schedule_type == ScheduleType.NONE:
        if interval is not None:
            errors["interval_minutes"] = ["Must be null for a schedule of type none."]
        if cron_expr:
            errors["cron_expr"] = ["Must be empty for a schedule of type none."]
        # It has no slots: jitter and bounds have nothing to act on, and no gap to check.
        return errors
    else:
        errors["schedule_type"] = _choice_error(schedule_type, ScheduleType) or ["Invalid schedule type."]

    start_at, end_at = values.get("start_at"), values.get("end_at")
    for field, value in (("start_at", start_at), ("end_at", end_at)):
        if value is not None and (problem := date_error(value)) is not None:
            errors[field] = [problem]
    if "start_at" not in errors and "end_at" not in errors and start_at and end_at and end_at <= start_at:
        errors["end_at"] = ["Must be after start_at."]
    jitter = values.get("jitter_seconds") or 0
    if jitter < 0 or jitter > MAX_JITTER_SECONDS:
        errors["jitter_seconds"] = [f"Must be between 0 and {MAX_JITTER_SECONDS} seconds (24 hours)."]

    # A syntactically valid cron can still never fire (`0 0 30 2 *`); find out now, not in the scheduler.
    if not errors.keys() & TIMING_FIELDS:
        unbounded = dataclasses.replace(timing.spec_of(_Values(values)), start_at=None, end_at=None)
        try:
            gap = timing.shortest_gap(unbounded, after=now or timezone.now())
        except Exception:
            field = "cron_expr" if schedule_type == ScheduleType.CRON else "interval_minutes"
            errors[field] = ["This schedule has no upcoming run times."]
        else:
            # At most the shortest gap between slots, so a slot can be told from its dispatch time and
            # runs keep their order.
            if jitter > gap.total_seconds():
                errors["jitter_seconds"] = [
                    f"Must be at most the shortest gap between runs ({int(gap.total_seconds())} seconds)."
                ]
    return errors


def _run_after_errors(values: Mapping[str, Any], *, pk: int | None) -> dict[str, list[str]]:
    """run_after: no self-dependency, no cycle; a schedule of type none needs at least one upstream."""
    upstreams = list(values.get("run_after") or [])
    if not upstreams:
        if values.get("schedule_type") == ScheduleType.NONE:
            return {"run_after": ["A schedule of type none runs only after others: name at least one."]}
        return {}
    if gone := _hold_upstreams(upstreams):
        return {
            "run_after": [
                f"Schedule {name!r} was deleted meanwhile: it cannot be run after." for name in gone
            ]
        }
    if pk is None:
        return {}  # a new schedule has no downstreams: it closes no cycle
    dependencies.lock_graph()  # held to commit: two edits cannot close a cycle together
    edges, names = dependencies.graph_edges()
    problems = dependencies.run_after_errors(
        schedule_id=pk,
        name=values.get("name") or str(pk),
        upstream_ids=[u.pk for u in upstreams],
        edges=edges,
        names={**names, **{u.pk: u.name for u in upstreams}},
    )
    return {"run_after": problems} if problems else {}


def _hold_upstreams(upstreams: list[Schedule]) -> list[str]:
    """Lock the upstreams against their delete until this edit commits (FOR KEY SHARE, in id order) and
    return the names of those deleted since they were read. A delete that locked one first has committed
    when the lock is granted, and the row is gone: the edit is refused here, by name, rather than by its
    foreign key at commit. A delete that comes later waits for this edit and then sees its edge."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id FROM schedules_schedule WHERE id = ANY(%s) ORDER BY id FOR KEY SHARE",
            [[upstream.pk for upstream in upstreams]],
        )
        held = {row[0] for row in cursor.fetchall()}
    return sorted(upstream.name for upstream in upstreams if upstream.pk not in held)


def run_after_names(schedule: Schedule) -> list[str]:
    """The upstreams' names, sorted: what history and the screens show."""
    return sorted(schedule.run_after.values_list("name", flat=True)) if schedule.pk else []


class _Values:
    """Attribute access over a mapping, for timing.spec_of."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        return self._values.get(name)


def calendar_errors(
    *, policy: Any, exclude: list, only: list, jitter_seconds: int | None
) -> dict[str, list[str]]:
    """The calendar fields: a known policy, and no jitter with next_allowed (a moved run is not one of
    the schedule's slots, so its dispatch time could not be told back from a jittered one)."""
    errors: dict[str, list[str]] = {}
    if (problem := _choice_error(policy, CalendarPolicy)) is not None:
        errors["calendar_policy"] = problem
    elif policy == CalendarPolicy.NEXT_ALLOWED and (exclude or only) and (jitter_seconds or 0) > 0:
        errors["calendar_policy"] = ["next_allowed takes no jitter: set jitter_seconds to 0 or use skip."]
    return errors


def _calendar_list(value: Any) -> list[Calendar]:
    """A client's calendars (a list, a queryset or a related manager) as a list of rows."""
    if value is None:
        return []
    if hasattr(value, "all"):
        value = value.all()
    return list(value)


def _specs(exclude: list[Calendar], only: list[Calendar]) -> tuple[tuple, tuple]:
    return tuple(c.spec() for c in exclude), tuple(c.spec() for c in only)


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


def first_dispatch_at(schedule: Schedule, now: datetime, calendars: tuple | None = None) -> datetime | None:
    """`next_run_at` of a schedule created, re-timed or enabled at `now`: the dispatch time (jitter
    applied) of its first slot, or None when no slot is left before end_at."""
    # last_run_at is a high-water mark: the new first slot must lie after it even if a clock is behind.
    after = max(now, schedule.last_run_at) if schedule.last_run_at else now
    spec = timing.spec_of(schedule)
    if calendars is not None:
        spec = dataclasses.replace(spec, exclude=calendars[0], only=calendars[1])
    slot = timing.first_run(spec, now=after)
    return None if slot is None else timing.next_dispatch(spec, slot)


def _timing_changed(current: Schedule, changed: set[str]) -> bool:
    """The name is what jitter and `H` hash, so renaming such a schedule moves its times too."""
    if changed & TIMING_FIELDS:
        return True
    hashed = current.jitter_seconds > 0 or "h" in (current.cron_expr or "").lower()
    return "name" in changed and hashed


def _managed_errors(current: Schedule, changed: set[str], source: str) -> dict[str, list[str]]:
    if not current.managed or source == ChangeSource.SYNC:
        return {}
    return {
        field: [f"Schedule {current.name!r} is managed by sync_schedules: change {field} in its file."]
        for field in sorted(changed & set(MANAGED_FIELDS))
    }


def database_now(now: datetime | None) -> datetime:
    """`now`, or the database's clock: the scheduler decides what is due by PostgreSQL's now(), so a
    web host whose clock is off must not anchor a new or re-enabled schedule early or late (one query;
    callers read it once per operation and pass it on)."""
    if now is None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT now()")
            (now,) = cursor.fetchone()
    # Whole seconds: an interval anchored at 04:47:13 reads better than at 04:47:13.482913.
    return now.replace(microsecond=0)


# A scheduled run in these states has not started; deleting its schedule cancels it.
WAITING_STATUSES = (ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED)

# --- Services -----------------------------------------------------------------------------------------


@transaction.atomic
def create_schedule(
    *, now: datetime | None = None, source: str = ChangeSource.API, actor: str = "", managed: bool = False,
    **fields: Any,
) -> Schedule:  # fmt: skip
    """Validate and insert a schedule; `next_run_at` is its first slot after now (enabled or not)."""
    unknown = set(fields) - set(SCHEDULE_FIELDS) - set(CALENDAR_FIELDS) - set(RELATION_FIELDS)
    if unknown:
        raise TypeError(f"unknown schedule fields: {sorted(unknown)}")
    now = database_now(now)
    exclude = _calendar_list(fields.pop("exclude_calendars", None))
    only = _calendar_list(fields.pop("only_calendars", None))
    upstreams = list(fields.pop("run_after", None) or [])
    schedule = Schedule(**fields, managed=managed)
    values = {field: getattr(schedule, field) for field in SCHEDULE_FIELDS}
    _normalise(values)
    errors = schedule_errors({**values, "run_after": upstreams}, changed=fields.keys(), now=now)
    errors.update(
        calendar_errors(
            policy=schedule.calendar_policy,
            exclude=exclude,
            only=only,
            jitter_seconds=values["jitter_seconds"],
        )
    )
    if errors:
        raise ScheduleInvalid(errors)
    for field, value in values.items():
        setattr(schedule, field, value)
    schedule.next_run_at = first_dispatch_at(schedule, now, _specs(exclude, only))
    _save(schedule)
    schedule.exclude_calendars.set(exclude)
    schedule.only_calendars.set(only)
    if upstreams:
        schedule.run_after.set(upstreams)
    after = change_log.snapshot(schedule, (*SCHEDULE_FIELDS, *CALENDAR_FIELDS, "managed"))
    after["run_after"] = run_after_names(schedule)
    change_log.record(
        schedule, action="create", source=source, actor=actor, changes=change_log.diff({}, after)
    )
    logger.info(
        "schedule created",
        extra={"schedule_id": schedule.pk, "job": schedule.job.key, "next_run_at": schedule.next_run_at},
    )
    return schedule


@transaction.atomic
def update_schedule(
    schedule: Schedule | int,
    changes: Mapping[str, Any],
    *,
    now: datetime | None = None,
    source: str = ChangeSource.API,
    actor: str = "",
    action: str = "update",
    extra: Mapping[str, Any] | None = None,
) -> Schedule:
    """Apply `changes` to the schedule's current row; recompute `next_run_at` when the timing changes or
    the schedule is re-enabled. Claims and `last_run_at` are the scheduler's and stay as they are.

    A managed schedule refuses changes of its declared fields unless they come from sync_schedules
    (ScheduleManaged, a 409). `extra` sets system fields besides (the pause record, `managed`); every
    change is recorded in the schedule's history with `source` and `actor`.
    """
    unknown = set(changes) - set(SCHEDULE_FIELDS) - set(CALENDAR_FIELDS) - set(RELATION_FIELDS)
    if unknown:
        raise TypeError(f"unknown schedule fields: {sorted(unknown)}")
    now = database_now(now)
    pk = schedule.pk if isinstance(schedule, Schedule) else schedule
    # Lock and re-read: the caller's copy may be stale, and the scheduler writes next_run_at/last_run_at.
    current = Schedule.objects.select_for_update().select_related("job").get(pk=pk)
    changes = dict(changes)
    calendar_changes = {field: changes.pop(field) for field in CALENDAR_FIELDS if field in changes}
    calendar_sets = {
        field: _calendar_list(calendar_changes.get(field, getattr(current, field))) for field in CALENDAR_SETS
    }
    policy = calendar_changes.get("calendar_policy", current.calendar_policy)
    calendars_changed = {
        field
        for field in CALENDAR_SETS
        if {c.pk for c in calendar_sets[field]} != {c.pk for c in getattr(current, field).all()}
    } | ({"calendar_policy"} if policy != current.calendar_policy else set())
    old_upstreams = list(current.run_after.order_by("pk"))
    new_upstreams = old_upstreams
    if "run_after" in changes:
        new_upstreams = sorted(set(changes.pop("run_after") or []), key=lambda u: u.pk)
    # The type is the discriminator: switching it clears the other kind's field unless the client set it.
    new_type = changes.get("schedule_type", current.schedule_type)
    if new_type != current.schedule_type:
        if new_type == ScheduleType.CRON:
            changes.setdefault("interval_minutes", None)
        elif new_type == ScheduleType.INTERVAL:
            changes.setdefault("cron_expr", "")
        elif new_type == ScheduleType.NONE:
            changes.setdefault("interval_minutes", None)
            changes.setdefault("cron_expr", "")
    values = {field: getattr(current, field) for field in SCHEDULE_FIELDS}
    values.update(changes)
    _normalise(values)
    changed = {field for field in changes if values[field] != getattr(current, field)}
    if [u.pk for u in new_upstreams] != [u.pk for u in old_upstreams]:
        changed.add("run_after")
    if changed & {"run_after", "schedule_type"}:
        values["run_after"] = new_upstreams
    if managed_errors := _managed_errors(current, changed, source):
        raise ScheduleManaged(managed_errors)
    errors = schedule_errors(
        values, changed=changed, pk=current.pk, now=now, run_count=current.scheduled_run_count
    )
    if calendars_changed or "jitter_seconds" in changed:
        errors.update(
            calendar_errors(
                policy=policy,
                exclude=calendar_sets["exclude_calendars"],
                only=calendar_sets["only_calendars"],
                jitter_seconds=values["jitter_seconds"],
            )
        )
    if errors:
        raise ScheduleInvalid(errors)
    extra = {field: value for field, value in (extra or {}).items() if getattr(current, field) != value}
    if not changed and not extra and not calendars_changed:
        return current
    fields = (*SCHEDULE_FIELDS, *CALENDAR_FIELDS, "managed", *change_log.PAUSE_FIELDS)
    before = change_log.snapshot(current, fields)
    if calendars_changed:
        current.exclude_calendars.set(calendar_sets["exclude_calendars"])
        current.only_calendars.set(calendar_sets["only_calendars"])
        current.calendar_policy = policy
        changed = changed | calendars_changed
    before["run_after"] = sorted(u.name for u in old_upstreams)
    if "run_after" in changed:
        current.run_after.set(new_upstreams)
        changed.discard("run_after")
    was_enabled = current.enabled
    for field in changed - set(CALENDAR_FIELDS):
        setattr(current, field, values[field])
    for field, value in extra.items():
        setattr(current, field, value)
    update_fields = (set(changed) - set(CALENDAR_SETS)) | set(extra)
    enabling = current.enabled and not was_enabled
    if _timing_changed(current, changed) or enabling or calendars_changed:
        current.next_run_at = first_dispatch_at(current, now)
        update_fields.add("next_run_at")
    if enabling:
        # pause_after_failures counts afresh: only slots created from here on (the database's clock,
        # as the slots' created_at). The scheduler's pause checks this too, so a pause evaluated
        # before this enable committed cannot disable the schedule again.
        current.failures_counted_since = Now()
        update_fields.add("failures_counted_since")
    _save(current, update_fields=sorted(update_fields | {"updated_at"}))
    if enabling:
        current.refresh_from_db(fields=["failures_counted_since"])
    after = change_log.snapshot(current, fields)
    after["run_after"] = run_after_names(current)
    change_log.record(
        current, action=action, source=source, actor=actor, changes=change_log.diff(before, after)
    )
    logger.info(
        "schedule updated",
        extra={"schedule_id": current.pk, "fields": sorted(changed), "next_run_at": current.next_run_at},
    )
    return current


def enable_schedule(
    schedule: Schedule | int, *, now: datetime | None = None, source: str = ChangeSource.API, actor: str = ""
) -> Schedule:
    """Enable; `next_run_at` is computed from now, so slots missed while disabled are not run, and the
    pause note goes. Enabling an enabled schedule changes nothing (its anchor stays)."""
    return update_schedule(
        schedule,
        {"enabled": True},
        now=now,
        source=source,
        actor=actor,
        action="enable",
        extra={"paused_note": "", "paused_at": None, "paused_by": ""},
    )


def disable_schedule(
    schedule: Schedule | int, *, note: str = "", source: str = ChangeSource.API, actor: str = ""
) -> Schedule:
    """Disable, recording why and by whom (`paused_note`, `paused_by`, `paused_at`) until enable clears
    them: the row, its history and its `next_run_at` stay; the due query skips disabled rows.
    Disabling a disabled schedule with a new note updates the note."""
    if len(note) > PAUSE_NOTE_MAX:
        raise ScheduleInvalid({"note": [f"Ensure this field has no more than {PAUSE_NOTE_MAX} characters."]})
    pk = schedule.pk if isinstance(schedule, Schedule) else schedule
    current = Schedule.objects.only("enabled", "paused_note").get(pk=pk)
    if not current.enabled and note == current.paused_note:
        return update_schedule(pk, {}, source=source, actor=actor)
    return update_schedule(
        pk,
        {"enabled": False},
        source=source,
        actor=actor,
        action="disable",
        extra={"paused_note": note, "paused_at": database_now(None), "paused_by": actor},
    )


@transaction.atomic
def delete_schedule(schedule: Schedule) -> None:
    """Delete the schedule and its ScheduledRuns (cascade); the orchestrator's Runs stay.

    Its runs that have not started end `cancelled` on their Run (they never start: the worker's start
    gate takes only queued runs); a running one finishes and keeps its outcome on its Run.
    """
    delete_schedules([schedule.pk])


@transaction.atomic
def delete_schedules(schedule_ids: list[int]) -> int:
    """`delete_schedule` for many schedules in a few statements (a bulk delete); returns how many went.
    Ids deleted meanwhile are skipped: the outcome the caller asked for."""
    # Lock the rows first (in id order: two deletes of overlapping sets cannot deadlock): a dispatch
    # holds a row while it inserts the slot's runs, so the delete waits for that commit and then sees
    # (and cancels) what it made. Without the lock the delete could read the scheduled runs before the
    # dispatch committed one more, and fail at commit on the foreign key.
    names = dict(
        Schedule.objects.select_for_update()
        .filter(pk__in=schedule_ids)
        .order_by("pk")
        .values_list("pk", "name")
    )
    if not names:
        return 0
    # After the lock: an edit adding an edge holds its upstreams FOR KEY SHARE to its commit
    # (`_hold_upstreams`), so this lock waited for it and its edge is seen here; an edit that comes after
    # waits for this delete and finds the upstream gone (a 400 naming run_after). Either way no downstream
    # keeps a run_after that silently lost an upstream.
    if in_use := downstreams_outside(list(names)):
        messages = [in_use_message(names[up], downs) for up, downs in in_use.items()]
        raise ScheduleInUse({"run_before": messages})
    waiting: dict[int, list[int]] = {}
    for schedule_id, run_id in ScheduledRun.objects.filter(
        schedule_id__in=list(names), status__in=WAITING_STATUSES, run_id__isnull=False
    ).values_list("schedule_id", "run_id"):
        waiting.setdefault(schedule_id, []).append(run_id)
    cancelled = 0
    for schedule_id, run_ids in waiting.items():
        reason = f"cancelled: schedule {names[schedule_id]!r} was deleted"
        cancelled += len(runstate.run_cancel(run_ids, reason))
    Schedule.objects.filter(pk__in=list(names)).delete()
    for schedule_id in names:
        logger.info(
            "schedule deleted",
            extra={"schedule_id": schedule_id, "runs_cancelled": len(waiting.get(schedule_id, ()))},
        )
    return len(names)


def downstreams_outside(schedule_ids: list[int]) -> dict[int, list[str]]:
    """Of `schedule_ids`, those that schedules outside `schedule_ids` run after: upstream id -> the
    downstreams' names, sorted. One query; deleting the upstream with all its downstreams is free."""
    found: dict[int, list[str]] = {}
    for upstream_id, name in (
        ScheduleDependency.objects.filter(upstream_id__in=schedule_ids)
        .exclude(downstream_id__in=schedule_ids)
        .order_by("upstream_id", "downstream__name")
        .values_list("upstream_id", "downstream__name")
    ):
        found.setdefault(upstream_id, []).append(name)
    return found


def in_use_message(name: str, downstreams: list[str], shown: int = 10) -> str:
    """Why `name` cannot be deleted: the schedules that run after it (the first `shown` of them)."""
    listed = ", ".join(map(repr, downstreams[:shown]))
    if len(downstreams) == 1:
        return (
            f"Schedule {listed} runs after {name!r}: remove {name!r} from its run_after first, or delete"
            " both together."
        )
    more = f" (and {len(downstreams) - shown} more)" if len(downstreams) > shown else ""
    return (
        f"Schedules {listed}{more} run after {name!r}: remove {name!r} from their run_after first, or"
        " delete them together with it."
    )


@transaction.atomic
def launch_run_manually(
    *,
    job: Job,
    directive: Directive | None = None,
    custom_directive_text: str = "",
    task3_scope: str,
    params: dict[str, Any] | None = None,
) -> Run:
    """POST /api/runs/: validate, create the run through the orchestrator (the path every run takes)
    and publish its message once the transaction commits."""
    params = {} if params is None else params
    errors = launch_errors(
        job=job, directive=directive, custom_directive_text=custom_directive_text, check_job_enabled=True
    )
    if (problem := _choice_error(task3_scope, Task3Scope)) is not None:
        errors["task3_scope"] = problem
    if job is not None:
        errors.update(run_params_errors(job, params))
    if errors:
        raise ScheduleInvalid(errors)
    run = OrchestratorService.launch(
        job=job,
        directive=directive,
        custom_directive_text=custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=task3_scope,
        params=params,
    )
    publish_on_commit([message_for(job, run, None)], limits={job.key: time_limits(job.timeout_seconds)})
    logger.info("manual run launched", extra={"run_id": run.pk, "job": job.key})
    return run


def run_now(schedule: Schedule, *, params: dict[str, Any] | None = None) -> ScheduledRun:
    """POST /api/schedules/{id}/run-now: a manual run with the schedule's params, the keys of `params`
    (an override) replacing theirs; the result is checked against the job's schema (a 400 naming the
    path, also when the schedule's own params no longer fit a changed schema). A disabled schedule runs;
    a disabled job does not (a 400 naming job_key, as POST /api/runs/ and a bulk run-now refuse it)."""
    errors: dict[str, list[str]] = {}
    if not schedule.job.enabled:
        errors["job"] = [f"Job {schedule.job.key!r} is disabled."]
    effective = None
    if params is not None and not isinstance(params, dict):
        errors["params"] = params_errors({}, params)
    else:
        effective = {**schedule.params, **(params or {})}
        errors.update(run_params_errors(schedule.job, effective))
    if errors:
        raise ScheduleInvalid(errors)
    return dispatch_run_now(schedule, params=effective)


# --- Preview and backfill -----------------------------------------------------------------------------

# What a preview takes: the timing fields, and the name (what jitter and `H` hash) and max_runs.
PREVIEW_FIELDS = (
    "name",
    "schedule_type",
    "interval_minutes",
    "cron_expr",
    "timezone",
    "jitter_seconds",
    "start_at",
    "end_at",
    "max_runs",
    *CALENDAR_FIELDS,
)


@dataclass(frozen=True)
class Preview:
    times: list[datetime]  # dispatch times, jitter applied, within the bounds and max_runs
    description: str
    # The schedule's own slots up to the last time shown that its calendars rule out, and why.
    excluded: list[tuple[datetime, str]] = dataclasses.field(default_factory=list)


def describe_schedule(spec: timing.ScheduleSpec) -> str:
    """timing.describe plus jitter and bounds: 'every 10 minutes, jitter up to 120 s, until ...'."""
    parts = [timing.describe(spec)]
    if spec.jitter_seconds:
        parts.append(f"each run delayed by up to {spec.jitter_seconds} s of jitter")
    if spec.start_at is not None:
        parts.append(f"from {spec.start_at.isoformat()}")
    if spec.end_at is not None:
        parts.append(f"until {spec.end_at.isoformat()}")
    return ", ".join(parts)


def preview_schedule(
    *, count: int = PREVIEW_COUNT, after: datetime | None = None, now: datetime | None = None, **fields: Any
) -> Preview:
    """The next `count` run times of a schedule with these timing fields, as saving it would give
    (saved at `after`, default now); the same 400s as create for them. Nothing is written."""
    unknown = set(fields) - set(PREVIEW_FIELDS)
    if unknown:
        raise TypeError(f"unknown preview fields: {sorted(unknown)}")
    values: dict[str, Any] = {
        "name": "",
        "cron_expr": "",
        "timezone": "UTC",
        "jitter_seconds": 0,
        "calendar_policy": CalendarPolicy.SKIP,
        **fields,
    }
    values["exclude_calendars"] = _calendar_list(values.get("exclude_calendars"))
    values["only_calendars"] = _calendar_list(values.get("only_calendars"))
    _normalise(values)
    errors = timing_errors(values, now=now)
    errors.update(
        calendar_errors(
            policy=values["calendar_policy"],
            exclude=values["exclude_calendars"],
            only=values["only_calendars"],
            jitter_seconds=values["jitter_seconds"],
        )
    )
    errors.update(limit_errors({"max_runs": values.get("max_runs")}))
    if not 1 <= count <= MAX_PREVIEW_COUNT:
        errors["count"] = [f"Must be between 1 and {MAX_PREVIEW_COUNT}."]
    if after is not None and (problem := date_error(after)) is not None:
        errors["after"] = [problem]
    if errors:
        raise ScheduleInvalid(errors)
    spec = timing.spec_of(_Values(values))
    saved_at = after.replace(microsecond=0) if after is not None else database_now(now)
    slot = timing.first_run(spec, now=saved_at)
    # The schedule as saving it would make it, shown by the function every other screen uses.
    saved = _Values(
        {**values, "enabled": True, "next_run_at": timing.next_dispatch(spec, slot), "scheduled_run_count": 0}
    )
    times = timing.upcoming_runs(saved, n=count)
    excluded: list[tuple[datetime, str]] = []
    first = timing.first_slot(spec, now=saved_at)
    if spec.calendared and first is not None:
        last = times[-1] if times else first + timedelta(days=timing.MAX_CALENDAR_DAYS)
        excluded = timing.excluded_between(spec, start=first, end=last, limit=MAX_PREVIEW_COUNT)
    return Preview(times=times, description=describe_schedule(spec), excluded=excluded)


def upcoming_runs(schedule: Schedule, n: int) -> list[datetime]:
    """timing.upcoming_runs for the screens (API, admin, dashboard): a row written around the services
    (a shell, an old release) that the slot math refuses must not make a page fail; it shows none."""
    try:
        return timing.upcoming_runs(schedule, n=n)
    except Exception:
        logger.exception("upcoming runs not computable", extra={"schedule_id": schedule.pk})
        return []


@dataclass(frozen=True)
class BackfillResult:
    created: int  # runs created (queued)
    skipped: int  # slots that already had a run (scheduled or backfilled): left alone
    overlap_skipped: int  # slots recorded `skipped` by the overlap policy
    slots: int  # slots in [start, end)


def _backfill_errors(start: Any, end: Any, overlap_policy: Any, now: datetime) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for field, value in (("start", start), ("end", end)):
        if (problem := date_error(value)) is not None:
            errors[field] = [problem]
    if (problem := _choice_error(overlap_policy, OverlapPolicy)) is not None:
        errors["overlap_policy"] = problem
    if errors:
        return errors
    if end <= start:
        errors["end"] = ["Must be after start."]
    elif end > now + timedelta(seconds=1):  # `now` is whole seconds
        errors["end"] = ["Backfill is for past slots: end must not be in the future."]
    return errors


@transaction.atomic
def backfill_schedule(
    schedule: Schedule | int,
    *,
    start: datetime,
    end: datetime,
    overlap_policy: str = OverlapPolicy.ALLOW,
    now: datetime | None = None,
) -> BackfillResult:
    """Create a run (trigger `backfill`) for each slot in [start, end) that has none yet, at most
    MAX_BACKFILL_SLOTS per call, under max_runs and the backfill's own `overlap_policy` (default
    `allow`, as Temporal's backfill: a backfill asks for every slot of the window; the schedule's policy
    is for slots coming due live); the runs are published on commit like any other and meet the caps at
    the worker. Idempotent: the unique slot (`scheduledrun_unique_slot`, shared with scheduled runs)
    makes a second identical call create none.
    """
    from schedules import dispatch, slots

    now = database_now(now)
    if errors := _backfill_errors(start, end, overlap_policy, now):
        raise ScheduleInvalid(errors)
    pk = schedule.pk if isinstance(schedule, Schedule) else schedule
    # The row lock serialises backfills of one schedule with each other and with its dispatch.
    current = Schedule.objects.select_for_update(of=("self",)).select_related("job", "directive").get(pk=pk)
    if current.schedule_type == ScheduleType.NONE:
        raise ScheduleInvalid({"schedule_type": ["A schedule of type none has no slots to backfill."]})
    spec = timing.spec_of(current)
    anchor = current.last_run_at or (
        timing.slot_of(spec, current.next_run_at) if current.next_run_at else None
    )
    wanted = timing.slots_between(spec, start=start, end=end, anchor=anchor, limit=MAX_BACKFILL_SLOTS + 1)
    if len(wanted) > MAX_BACKFILL_SLOTS:
        raise ScheduleInvalid(
            {
                "end": [
                    f"[start, end) holds more than {MAX_BACKFILL_SLOTS} slots;"
                    f" backfill at most {MAX_BACKFILL_SLOTS} per call."
                ]
            }
        )
    if not current.job.enabled:
        raise ScheduleInvalid({"job": [f"Job {current.job.key!r} is disabled."]})
    existing = set(
        ScheduledRun.objects.filter(
            schedule=current, trigger__in=[Trigger.SCHEDULE, Trigger.BACKFILL], scheduled_for__in=wanted
        ).values_list("scheduled_for", flat=True)
    )
    new = [slot for slot in wanted if slot not in existing]
    unfinished = 0
    if overlap_policy != OverlapPolicy.ALLOW:
        unfinished = ScheduledRun.objects.filter(
            schedule=current, status__in=SCHEDULED_RUN_UNFINISHED
        ).count()
    decisions = slots.decide_overlap(
        new, overlap_policy=overlap_policy, unfinished=unfinished, job_enabled=True
    )
    runs_wanted = sum(1 for decision in decisions if decision.dispatch)
    if current.max_runs is not None and current.scheduled_run_count + runs_wanted > current.max_runs:
        left = max(0, current.max_runs - current.scheduled_run_count)
        raise ScheduleInvalid(
            {"max_runs": [f"The backfill needs {runs_wanted} runs; max_runs leaves {left}."]}
        )
    created, overlap_skipped = _backfill_insert(current, decisions, dispatch, overlap_policy)
    _count_backfilled_runs(current, created)
    logger.info(
        "schedule backfilled",
        extra={
            "schedule_id": current.pk,
            "runs_created": created,
            "slots_skipped": len(existing),
            "overlap_skipped": overlap_skipped,
        },
    )
    return BackfillResult(
        created=created, skipped=len(existing), overlap_skipped=overlap_skipped, slots=len(wanted)
    )


def _backfill_insert(current: Schedule, decisions: list, dispatch: Any, overlap: str) -> tuple[int, int]:
    """Insert the backfill's runs and scheduled runs; publish the created ones on commit; under
    `cancel_other` / `terminate_other` the new run cancels the schedule's unfinished ones."""
    slots = [decision.slot for decision in decisions if decision.dispatch]
    previous = dispatch.previous_slots([(current.pk, slot) for slot in slots])
    runs = OrchestratorService.launch_many(
        [
            {
                "job": current.job,
                "directive": current.directive,
                "custom_directive_text": current.custom_directive_text,
                "trigger": Trigger.BACKFILL,
                "task3_scope": current.task3_scope,
                "task_id": str(uuid.uuid4()),
                "params": current.params,
                "scheduled_for": slot,
                "previous_scheduled_for": previous[(current.pk, slot)],
            }
            for slot in slots
        ]
    )
    columns, by_key = dispatch.slot_columns([(current.pk, decision) for decision in decisions], runs)
    run_for = {slot: run for (_, slot), run in by_key.items()}
    inserted = dispatch.insert_slots(columns, trigger=Trigger.BACKFILL)
    # A slot the scheduler dispatched meanwhile is already there: drop the run made for it.
    orphans = [run.pk for slot, run in run_for.items() if (current.pk, slot) not in inserted]
    if orphans:
        Run.objects.filter(pk__in=orphans).delete()
    messages = [
        dispatch.message_for(current.job, run, ScheduledRun(pk=inserted[(current.pk, slot)]))
        for slot, run in run_for.items()
        if (current.pk, slot) in inserted
    ]
    publish_on_commit(messages)
    new = {run.pk: slot for slot, run in run_for.items() if (current.pk, slot) in inserted}
    if new:
        dispatch.cancel_overlapped(current.pk, overlap, keep=set(new), slot=max(new.values()))
    skipped = sum(
        1 for decision in decisions if not decision.dispatch and (current.pk, decision.slot) in inserted
    )
    return len(messages), skipped


def _count_backfilled_runs(current: Schedule, created: int) -> None:
    """Backfilled runs count toward max_runs; reaching it disables the schedule as a dispatch does, with
    no next run."""
    if not created:
        return
    count = current.scheduled_run_count + created
    fields: dict[str, Any] = {"scheduled_run_count": F("scheduled_run_count") + created}
    if current.max_runs is not None and count >= current.max_runs:
        fields["next_run_at"] = None
        if current.enabled:
            fields.update(
                enabled=False, paused_note=f"completed {count} runs", paused_at=Now(), paused_by="backfill"
            )
    Schedule.objects.filter(pk=current.pk).update(**fields)
