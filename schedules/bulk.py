"""Acting on many schedules at once: enable, disable, run-now or delete, by ids or by a selector.

`POST /api/schedules/bulk`, the admin's actions and the dashboard's multi-select all call `bulk_apply`.
All or none: the rows are locked and every one is judged by the rules the single operations use
(services.schedule_errors, the managed rule, a delete's downstreams, the run-now checks) before anything
is written; one refusal and nothing changes (BulkRefused, a 409 that lists what would change and what
was refused, and why).

Enable, disable and delete are set-based: the per-row rules and next run time come from the same
functions as the single operations (services), then one UPDATE (enable: from an unnest of the new
`next_run_at`s) or services.delete_schedules (which the single delete calls too), and one INSERT of the
change records. Run-now goes through the single run-now row by row (services.run_now: trigger `manual`,
the caps apply at the worker), inside the same transaction; it takes at most MAX_RUN_NOW schedules a
call, so a call stays within a web worker's timeout (about 4 ms a schedule here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Q, TextChoices, prefetch_related_objects
from django.utils import timezone

from orchestrator.models import Job
from schedules import changes as change_log
from schedules import services
from schedules.labels import label_errors
from schedules.models import Schedule, ScheduleChange

logger = logging.getLogger(__name__)

# Schedules one call may touch: a selector matching more is a 400 (narrow it, or call again).
MAX_BULK = 10_000
# Run-now creates each run through the single path (a few statements each): fewer per call.
MAX_RUN_NOW = 1_000
SELECTOR_KEYS = ("labels", "job_key", "name_prefix")
# Fields a change record of enable/disable compares (the single path's set).
RECORDED_FIELDS = (*services.SCHEDULE_FIELDS, "managed", *change_log.PAUSE_FIELDS)


class BulkAction(TextChoices):
    ENABLE = "enable", "enable"
    DISABLE = "disable", "disable"
    RUN_NOW = "run-now", "run-now"
    DELETE = "delete", "delete"


@dataclass
class BulkResult:
    action: str
    dry_run: bool
    # {"id", "name"} of each schedule changed (would be, in a dry run or a refused call); a run-now adds
    # "scheduled_run" (its id; null in a dry run).
    changed: list[dict[str, Any]] = field(default_factory=list)
    # Already in the state asked for (enable of an enabled schedule): nothing to do, not refused.
    unchanged: list[dict[str, Any]] = field(default_factory=list)
    # {"id", "name", "reasons": {"field": ["message", ...]}}; name is null for an unknown id.
    refused: list[dict[str, Any]] = field(default_factory=list)


class BulkRefused(services.SchedulerError):
    """Some schedules were refused: nothing was changed. `result` says what would have, and why not."""

    def __init__(self, result: BulkResult) -> None:
        super().__init__(f"{len(result.refused)} of the schedules were refused; nothing was changed")
        self.result = result


def selector_q(selector: Mapping[str, Any]) -> Q:
    """The schedules a (valid) selector matches: every given part, combined with AND."""
    condition = Q()
    if selector.get("labels"):
        # One containment test (`labels @> {...}`): one GIN index condition for all the pairs.
        condition &= Q(labels__contains=dict(selector["labels"]))
    if selector.get("job_key"):
        condition &= Q(job__key=selector["job_key"])
    if selector.get("name_prefix"):
        condition &= Q(name__startswith=selector["name_prefix"])
    return condition


def request_errors(action: Any, *, ids: Any, selector: Any, note: Any) -> dict[str, list[str]]:
    """What is wrong with a bulk request as a whole (a 400 naming the field); empty when valid."""
    errors: dict[str, list[str]] = {}
    if action not in BulkAction.values:
        errors["action"] = [
            f'"{action}" is not a valid choice; expected one of {", ".join(BulkAction.values)}.'
        ]
    if ids is not None and selector is not None:
        errors["selector"] = ["Give ids or selector, not both."]
    elif ids is None and selector is None:
        errors["ids"] = ["Give ids (a list of schedule ids) or selector."]
    elif ids is not None:
        if not isinstance(ids, list) or not ids:
            errors["ids"] = ["Must be a non-empty list of schedule ids."]
        elif not all(isinstance(i, int) and not isinstance(i, bool) and i >= 1 for i in ids):
            errors["ids"] = ["Every id must be a positive integer."]
        elif len(set(ids)) > (limit := limit_for(action)):
            errors["ids"] = [f"At most {limit} schedules per call for {action}."]
    elif problems := selector_errors(selector):
        errors["selector"] = problems
    if note and action != BulkAction.DISABLE:
        errors["note"] = ["A note goes with disable only."]
    elif note is not None and not isinstance(note, str):
        errors["note"] = ["Must be a string."]
    elif note and len(note) > services.PAUSE_NOTE_MAX:
        errors["note"] = [f"Ensure this field has no more than {services.PAUSE_NOTE_MAX} characters."]
    return errors


def limit_for(action: Any) -> int:
    """The most schedules one call may touch with `action`."""
    return MAX_RUN_NOW if action == BulkAction.RUN_NOW else MAX_BULK


def selector_errors(selector: Any) -> list[str]:
    """Problems of a selector object, each naming its part; empty when valid."""
    if not isinstance(selector, Mapping):
        return ['Must be an object: {"labels": {...}, "job_key": "...", "name_prefix": "..."}.']
    problems = [
        f"{key}: unknown part; one of {', '.join(SELECTOR_KEYS)}."
        for key in selector
        if key not in SELECTOR_KEYS
    ]
    for key in ("job_key", "name_prefix"):
        if selector.get(key) is not None and not isinstance(selector[key], str):
            problems.append(f"{key}: must be a string.")
    if isinstance(selector.get("job_key"), str) and selector["job_key"]:
        if not Job.objects.filter(key=selector["job_key"]).exists():
            problems.append(f"job_key: no job with key {selector['job_key']!r}.")
    if selector.get("labels") is not None:
        problems += [f"labels: {problem}" for problem in label_errors(selector["labels"])]
    if not problems and not any(selector.get(key) for key in SELECTOR_KEYS):
        # An empty selector would match every schedule: say so with ids, or narrow it.
        problems.append(
            "Give at least one of labels, job_key, name_prefix (an empty selector matches everything)."
        )
    return problems


def bulk_apply(
    action: str,
    *,
    ids: list[int] | None = None,
    selector: Mapping[str, Any] | None = None,
    note: str = "",
    dry_run: bool = False,
    source: str,
    actor: str = "",
) -> BulkResult:
    """Apply `action` to the schedules named by `ids` or matched by `selector`, all or none.

    Raises ScheduleInvalid for a bad request (400), BulkRefused when any schedule is refused (nothing
    written). A dry run judges and answers the same, and writes nothing.
    """
    if errors := request_errors(action, ids=ids, selector=selector, note=note):
        raise services.ScheduleInvalid(errors)
    note = note or ""
    result = BulkResult(action=action, dry_run=dry_run)
    with transaction.atomic():
        now = services.database_now(None)
        rows = _lock(ids=ids, selector=selector, limit=limit_for(action))
        if ids is not None:
            found = {row.pk for row in rows}
            result.refused += [
                {"id": i, "name": None, "reasons": {"ids": ["No schedule with this id."]}}
                for i in dict.fromkeys(ids)
                if i not in found
            ]
        if action in (BulkAction.ENABLE, BulkAction.DISABLE):
            plans = _plan_toggle(
                rows, enable=action == BulkAction.ENABLE, note=note, actor=actor, now=now, result=result
            )
        else:
            _judge(rows, action, result)
        if result.refused:
            raise BulkRefused(result)
        if not dry_run:
            if action in (BulkAction.ENABLE, BulkAction.DISABLE):
                _apply_toggle(plans, action=action, source=source, actor=actor)
            elif action == BulkAction.RUN_NOW:
                _apply_run_now(rows, result)
            else:
                _apply_delete(rows, source=source, actor=actor)
    logger.info(
        "bulk applied",
        extra={
            "action": action,
            "dry_run": dry_run,
            "changed": len(result.changed),
            "unchanged": len(result.unchanged),
        },
    )
    return result


def _lock(*, ids: list[int] | None, selector: Mapping[str, Any] | None, limit: int) -> list[Schedule]:
    """The target rows, locked in id order (two bulk calls over overlapping sets cannot deadlock)."""
    rows = Schedule.objects.select_related("job", "directive").select_for_update(of=("self",)).order_by("pk")
    if ids is not None:
        return list(rows.filter(pk__in=set(ids)))
    found = list(rows.filter(selector_q(selector))[: limit + 1])
    if len(found) > limit:
        raise services.ScheduleInvalid(
            {"selector": [f"Matches more than {limit} schedules; narrow it (at most {limit} per call)."]}
        )
    return found


def _entry(row: Schedule) -> dict[str, Any]:
    return {"id": row.pk, "name": row.name}


@dataclass
class _Plan:
    row: Schedule
    before: dict[str, Any]


def _plan_toggle(
    rows: Iterable[Schedule], *, enable: bool, note: str, actor: str, now: datetime, result: BulkResult
) -> list[_Plan]:
    """Enable or disable as services.enable_schedule / disable_schedule do, judged row by row (the same
    rules, services.schedule_errors); each changed row is updated in memory, ready for one write."""
    plans = []
    for row in rows:
        if enable:
            wanted = {"enabled": True, "paused_note": "", "paused_at": None, "paused_by": ""}
        elif not row.enabled and row.paused_note == note:
            wanted = {}  # disable_schedule's "nothing to do"
        else:
            wanted = {"enabled": False, "paused_note": note, "paused_at": now, "paused_by": actor}
        wanted = {f: v for f, v in wanted.items() if getattr(row, f) != v}
        if not wanted:
            result.unchanged.append(_entry(row))
            continue
        changed = {"enabled"} & wanted.keys()
        values = {f: getattr(row, f) for f in services.SCHEDULE_FIELDS} | {
            f: v for f, v in wanted.items() if f in services.SCHEDULE_FIELDS
        }
        errors = services.schedule_errors(
            values, changed=changed, pk=row.pk, now=now, run_count=row.scheduled_run_count
        )
        if errors:
            result.refused.append({**_entry(row), "reasons": errors})
            continue
        plan = _Plan(row=row, before=change_log.snapshot(row, RECORDED_FIELDS))
        enabling = enable and not row.enabled
        for f, v in wanted.items():
            setattr(row, f, v)
        if enabling:
            # The single enable's next run: the first slot from now (slots missed while disabled are not run).
            row.next_run_at = services.first_dispatch_at(row, now)
        plans.append(plan)
        result.changed.append(_entry(row))
    return plans


# Enable, set-based: each row's next run (computed by services.first_dispatch_at, as the single enable) in one
# statement. pause_after_failures counts afresh from the database's clock for the rows being enabled,
# as the single enable does; a row enabled already only loses its stale pause record.
ENABLE_SQL = """
UPDATE schedules_schedule AS s
   SET enabled = true, paused_note = '', paused_at = NULL, paused_by = '',
       next_run_at = v.next_run_at, updated_at = %(stamp)s,
       failures_counted_since = CASE WHEN s.enabled THEN s.failures_counted_since ELSE now() END
  FROM unnest(%(ids)s::bigint[], %(next_run_ats)s::timestamptz[]) AS v(id, next_run_at)
 WHERE s.id = v.id
"""


def _apply_toggle(plans: list[_Plan], *, action: str, source: str, actor: str) -> None:
    if not plans:
        return
    rows = [plan.row for plan in plans]
    stamp = timezone.now()
    if action == BulkAction.DISABLE:
        first = rows[0]
        Schedule.objects.filter(pk__in=[row.pk for row in rows]).update(
            enabled=False,
            paused_note=first.paused_note,
            paused_at=first.paused_at,
            paused_by=first.paused_by,
            updated_at=stamp,
        )
    else:
        with connection.cursor() as cursor:
            cursor.execute(
                ENABLE_SQL,
                {
                    "ids": [row.pk for row in rows],
                    "next_run_ats": [row.next_run_at for row in rows],
                    "stamp": stamp,
                },
            )
    ScheduleChange.objects.bulk_create(
        [
            change_log.build(
                plan.row,
                action=action,
                source=source,
                actor=actor,
                changes=change_log.diff(plan.before, change_log.snapshot(plan.row, RECORDED_FIELDS)),
            )
            for plan in plans
        ],
        batch_size=1000,
    )


def _judge(rows: Iterable[Schedule], action: str, result: BulkResult) -> None:
    """Run-now and delete: the single paths' refusals, judged before anything is written."""
    rows = list(rows)
    # A delete may take an upstream with all its downstreams; one that leaves a downstream is refused.
    in_use = services.downstreams_outside([row.pk for row in rows]) if action == BulkAction.DELETE else {}
    for row in rows:
        reasons: dict[str, list[str]] = {}
        if action == BulkAction.DELETE and row.managed:
            reasons["managed"] = [
                f"Schedule {row.name!r} is managed by sync_schedules: remove it from its file and run"
                " sync_schedules --prune."
            ]
        if row.pk in in_use:
            reasons["run_before"] = [services.in_use_message(row.name, in_use[row.pk])]
        if action == BulkAction.RUN_NOW:
            if not row.job.enabled:
                reasons["job_key"] = [f"Job {row.job.key!r} is disabled."]
            reasons.update(services.run_params_errors(row.job, row.params))
        if reasons:
            result.refused.append({**_entry(row), "reasons": reasons})
        else:
            result.changed.append(
                {**_entry(row), **({"scheduled_run": None} if action == BulkAction.RUN_NOW else {})}
            )


def _apply_run_now(rows: list[Schedule], result: BulkResult) -> None:
    by_id = {entry["id"]: entry for entry in result.changed}
    for row in rows:
        by_id[row.pk]["scheduled_run"] = services.run_now(row).pk


def _apply_delete(rows: list[Schedule], *, source: str, actor: str) -> None:
    # The delete records list each row's calendars and upstreams: three queries, not three per row.
    prefetch_related_objects(rows, "exclude_calendars", "only_calendars", "run_after")
    ScheduleChange.objects.bulk_create(
        [change_log.build_delete(row, source=source, actor=actor) for row in rows], batch_size=1000
    )
    services.delete_schedules([row.pk for row in rows])


# What each action did, for the admin's and the dashboard's messages: "Disabled 3 schedule(s)."
DONE = {
    BulkAction.ENABLE: "Enabled",
    BulkAction.DISABLE: "Disabled",
    BulkAction.RUN_NOW: "Queued a run of",
    BulkAction.DELETE: "Deleted",
}


def describe(result: BulkResult) -> str:
    """A done operation as one line, e.g. `Disabled 3 schedule(s) (1 already so).`"""
    unchanged = f" ({len(result.unchanged)} already so)" if result.unchanged else ""
    return f"{DONE[BulkAction(result.action)]} {len(result.changed)} schedule(s){unchanged}."


def describe_refusals(result: BulkResult, shown: int = 10) -> str:
    """A refused operation as one line: nothing changed, and the first refusals with their reasons."""
    reasons = "; ".join(
        f"{item['name'] or item['id']}: "
        + " ".join(f"{field}: {' '.join(msgs)}" for field, msgs in item["reasons"].items())
        for item in result.refused[:shown]
    )
    more = f" (and {len(result.refused) - shown} more)" if len(result.refused) > shown else ""
    return f"Nothing was changed: {len(result.refused)} schedule(s) refused. {reasons}{more}"
