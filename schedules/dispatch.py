"""Creating scheduled runs: dispatching due slots (the scheduler) and run-now (the API and admin).

Dispatch works on schedules this instance has claimed (schedules.claiming). Each transaction locks a
batch of claimed rows that are *still ours* (`claimed_by = me AND claimed_until > now()`), decides every
due slot (misfire and overlap policies, bounds and max_runs: `schedules.slots.plan_slots`, pure), inserts
the runs and scheduled runs in bulk, advances `last_run_at`/`next_run_at` from the slots, counts the
runs (`scheduled_run_count`, disabling a schedule that reached `max_runs`) and releases the claims, then
commits; the run messages are published only after the commit. A crash anywhere before the commit leaves
nothing but an expiring claim; a crash after it leaves `queued` rows with no `published_at`, which the
outbox sweep publishes. The unique slot constraint (`scheduledrun_unique_slot`) backs all of this: a
slot that is already there (dispatched, or backfilled) is never inserted twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.http import Http404

from orchestrator.models import Directive, Job, Run, Trigger
from orchestrator.services import OrchestratorService
from schedules import cancelling, claiming, timing
from schedules.calendar_service import calendar_specs_for
from schedules.claiming import renew
from schedules.models import OverlapPolicy, Schedule, ScheduledRun, ScheduledRunStatus
from schedules.publishing import RunMessage, publish_on_commit, send_messages, stamp_published, time_limits
from schedules.slots import CANCELLING_POLICIES, SlotDecision, SlotPlan, plan_slots

logger = logging.getLogger(__name__)

# Schedules locked per transaction, and slots (rows) written per transaction: a killed instance loses
# at most one such transaction, and 10,000 due slots cost tens of statements, not tens of thousands.
SCHEDULES_PER_TRANSACTION = 200
SLOTS_PER_TRANSACTION = 500


class SchedulerError(Exception):
    """Base for the scheduler's domain errors."""


# --- The scheduler's dispatch ----------------------------------------------------------------------

UNFINISHED_SQL = """
SELECT schedule_id, count(*) FROM schedules_scheduledrun
 WHERE schedule_id = ANY(%(ids)s) AND status IN ('queued', 'throttled', 'running')
 GROUP BY schedule_id
"""

# The slot insert: a conflict on the unique slot means the slot is already there (never twice), as a
# scheduled run or a backfilled one (the constraint covers both triggers).
INSERT_SLOTS_SQL = """
INSERT INTO schedules_scheduledrun
       (schedule_id, run_id, trigger, scheduled_for, status, task_id, worker, error_summary,
        created_at, finished_at)
SELECT v.schedule_id, v.run_id, %(trigger)s, v.slot, v.status, v.task_id, '', v.reason,
       now(), CASE WHEN v.status = 'skipped' THEN now() END
  FROM unnest(%(schedule_ids)s::bigint[], %(run_ids)s::bigint[], %(slots)s::timestamptz[],
              %(statuses)s::text[], %(task_ids)s::text[], %(reasons)s::text[])
       AS v(schedule_id, run_id, slot, status, task_id, reason)
    ON CONFLICT (schedule_id, scheduled_for) WHERE trigger IN ('schedule', 'backfill') DO NOTHING
RETURNING id, schedule_id, scheduled_for
"""


@dataclass
class DispatchResult:
    dispatched: int = 0
    skipped: int = 0
    published: int = 0
    publish_failed: int = 0
    lost: list[int] = field(default_factory=list)  # claims no longer ours: someone else's now
    failed: list[int] = field(default_factory=list)  # plan errors: left claimed, retried after the TTL
    pending: list[int] = field(default_factory=list)  # still claimed, not reached (stop requested)
    busy: list[int] = field(default_factory=list)  # still claimed, row locked by another session

    def add(self, other: DispatchResult) -> None:
        self.dispatched += other.dispatched
        self.skipped += other.skipped
        self.published += other.published
        self.publish_failed += other.publish_failed
        self.lost += other.lost
        self.failed += other.failed
        self.busy += other.busy


def handover_window(taken_over_at: datetime | None, *, ttl: float) -> tuple[datetime, datetime] | None:
    """The span a dead claimant held a row, from the expiry of its claim (`Claim.taken_over_at`).

    When that claim was taken is not recorded; it is taken as one claim TTL before it expired, this
    instance's TTL (instances of one deployment share `--claim-ttl`). A renewed claim was held longer
    than that, by an instance alive while it renewed, so its slots were late for a live scheduler.
    """
    if taken_over_at is None:
        return None
    return (taken_over_at - timedelta(seconds=float(ttl)), taken_over_at)


def dispatch_claimed(
    schedule_ids: list[int],
    *,
    claimant: str,
    grace: timedelta,
    ttl: float,
    should_stop: Callable[[], bool] = lambda: False,
    taken_over: dict[int, datetime] | None = None,
) -> DispatchResult:
    """Dispatch every due slot of the schedules `claimant` claimed, a bounded batch per transaction.

    Stops between transactions when `should_stop()` says so; what was not reached is returned in
    `pending` (still claimed: the caller releases it). Claims are renewed as the batch goes on.
    Schedules whose rows another session holds locked are returned in `busy`, still claimed: the
    caller retries them shortly (their claims expire by themselves if it does not).
    `taken_over`: schedule id -> when the dead claim this instance took over expired (`Claim`).
    """
    total = DispatchResult()
    queue = deque(schedule_ids)
    handovers = {
        sid: window
        for sid, at in (taken_over or {}).items()
        if (window := handover_window(at, ttl=ttl)) is not None
    }
    renewed_at = time.monotonic()
    while queue:
        if should_stop():
            total.pending = list(queue)
            break
        batch = [queue.popleft() for _ in range(min(SCHEDULES_PER_TRANSACTION, len(queue)))]
        result, unfinished = _dispatch_batch(batch, claimant=claimant, grace=grace, handovers=handovers)
        total.add(result)
        # Schedules with slots left (a long catch-up cut by the per-transaction budget) go first again.
        queue.extendleft(reversed(unfinished))
        if queue and time.monotonic() - renewed_at > ttl / 3:
            kept = set(renew(claimant=claimant, schedule_ids=list(queue), ttl=ttl))
            lost = [sid for sid in queue if sid not in kept]
            if lost:
                logger.warning(
                    "claims lost before dispatch", extra={"claimant": claimant, "count": len(lost)}
                )
                total.lost += lost
            queue = deque(sid for sid in queue if sid in kept)
            renewed_at = time.monotonic()
    return total


@dataclass(frozen=True)
class _Locked:
    """A claimed schedule row as claiming.lock_claimed returns it, with the database's `now()`."""

    id: int
    name: str
    spec: timing.ScheduleSpec
    misfire_policy: str
    overlap_policy: str
    last_run_at: datetime | None
    next_run_at: datetime | None
    directive_id: int | None
    custom_directive_text: str
    task3_scope: str
    job_id: int
    runs_left: int | None  # max_runs - scheduled_run_count; None without max_runs
    catchup_window: timedelta | None  # the schedule's own grace; None: the scheduler's
    params: dict
    now: datetime

    @classmethod
    def from_row(cls, row: tuple) -> _Locked:
        (sid, name, stype, minutes, cron_expr, tz, misfire, overlap, last, nxt, directive_id, text, scope,
         job_id, jitter, start_at, end_at, max_runs, run_count, catchup, params, now) = row  # fmt: skip
        spec = timing.ScheduleSpec(
            schedule_type=stype,
            interval_minutes=minutes,
            cron_expr=cron_expr or "",
            timezone=tz or "UTC",
            jitter_seconds=jitter or 0,
            start_at=start_at,
            end_at=end_at,
            key=name,
        )
        runs_left = None if max_runs is None else max(0, max_runs - run_count)
        window = None if catchup is None else timedelta(seconds=catchup)
        # Raw SQL: jsonb comes back as text (Django leaves its decoding to JSONField).
        params = json.loads(params) if isinstance(params, str) else (params or {})
        return cls(sid, name, spec, misfire, overlap, last, nxt, directive_id, text or "", scope, job_id,
                   runs_left, window, params, now)  # fmt: skip


@dataclass
class _Batch:
    """What one dispatch transaction works on, step to step."""

    claimant: str
    locked: list[_Locked]
    jobs: dict[int, Job]
    planned: list[tuple[_Locked, SlotPlan]] = field(default_factory=list)
    unfinished_ids: list[int] = field(default_factory=list)  # cut by the budget: still claimed
    run_for: dict[tuple[int, datetime], Run] = field(default_factory=dict)
    inserted: dict[tuple[int, datetime], int] = field(default_factory=dict)


def _dispatch_batch(
    schedule_ids: list[int],
    *,
    claimant: str,
    grace: timedelta,
    handovers: dict[int, tuple[datetime, datetime]],
) -> tuple[DispatchResult, list[int]]:
    """One transaction: lock, plan, insert, advance, release; then publish. Returns (result, unfinished)."""
    result = DispatchResult()
    with transaction.atomic():
        locked = _lock_batch(schedule_ids, claimant=claimant, result=result)
        if not locked:
            return result, []
        counts = _unfinished_counts(locked)
        batch = _Batch(claimant=claimant, locked=locked, jobs=Job.objects.in_bulk({s.job_id for s in locked}))
        _plan_batch(batch, counts=counts, grace=grace, handovers=handovers, result=result)
        columns = _launch_runs(batch)
        _write_slots(batch, columns)
        _cancel_overlapped(batch, counts)
    # Committed: count what was written, then (only now) publish.
    messages = _committed_messages(batch, result)
    _publish(messages, result)
    return result, batch.unfinished_ids


def _lock_batch(schedule_ids: list[int], *, claimant: str, result: DispatchResult) -> list[_Locked]:
    """Lock the rows still claimed by us; sort the others into busy (kept) and lost (given back)."""
    locked = [_Locked.from_row(row) for row in claiming.lock_claimed(schedule_ids, claimant=claimant)]
    # Calendars (issue 33): the slot math rules slots out (or moves them) by the schedule's calendars.
    calendared = calendar_specs_for([s.id for s in locked])
    if calendared:
        locked = [_with_calendars(s, *calendared[s.id]) if s.id in calendared else s for s in locked]
    locked_ids = {s.id for s in locked}
    missing = [sid for sid in schedule_ids if sid not in locked_ids]
    if missing:
        # Still ours but locked by someone else: keep the claim, the caller retries it.
        busy = claiming.still_claimed(missing, claimant=claimant)
        if busy:
            result.busy += sorted(busy)
            logger.warning(
                "claimed schedules locked by another session; retried later",
                extra={"claimant": claimant, "count": len(busy), "schedule_ids": sorted(busy)},
            )
        # Not ours any more (expired and taken over) or disabled meanwhile: give back what is ours.
        gone = [sid for sid in missing if sid not in busy]
        if gone:
            claiming.release_claims(claimant=claimant, schedule_ids=gone)
            result.lost += gone
    return locked


def _with_calendars(s: _Locked, exclude: tuple, only: tuple, policy: str) -> _Locked:
    spec = dataclasses.replace(s.spec, exclude=exclude, only=only, calendar_policy=policy)
    return dataclasses.replace(s, spec=spec)


def _unfinished_counts(locked: list[_Locked]) -> dict[int, int]:
    """Unfinished runs per schedule, for the overlap policy (not needed under `allow`)."""
    needs_count = [s.id for s in locked if s.overlap_policy != OverlapPolicy.ALLOW]
    if not needs_count:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(UNFINISHED_SQL, {"ids": needs_count})
        return dict(cursor.fetchall())


def _plan_batch(
    batch: _Batch,
    *,
    counts: dict[int, int],
    grace: timedelta,
    handovers: dict[int, tuple[datetime, datetime]],
    result: DispatchResult,
) -> None:
    """Decide each schedule's due slots within the transaction's slot budget."""
    budget = SLOTS_PER_TRANSACTION
    for s in batch.locked:
        if budget <= 0:
            batch.unfinished_ids.append(s.id)  # still claimed; the next transaction takes it
            continue
        try:
            plan = plan_slots(
                s.spec,
                next_run_at=s.next_run_at,
                last_run_at=s.last_run_at,
                now=s.now,
                misfire_policy=s.misfire_policy,
                overlap_policy=s.overlap_policy,
                unfinished=counts.get(s.id, 0),
                grace=s.catchup_window if s.catchup_window is not None else grace,
                job_enabled=batch.jobs[s.job_id].enabled,
                max_slots=budget,
                handover=handovers.get(s.id),
                runs_left=s.runs_left,
            )
        except Exception:
            # A schedule whose timing cannot be computed keeps its claim: it is retried once the TTL
            # passes (a natural back-off) and never blocks the others in this batch.
            logger.exception("slot planning failed", extra={"schedule_id": s.id, "schedule": s.name})
            result.failed.append(s.id)
            continue
        budget -= len(plan.decisions)
        batch.planned.append((s, plan))
        if (
            plan.decisions
            and not plan.completed
            and plan.next_run_at is not None
            and plan.next_run_at <= s.now
        ):
            batch.unfinished_ids.append(s.id)  # cut by the budget: more slots are due


def _launch_runs(batch: _Batch) -> dict[str, list]:
    """The runs (one INSERT, in decision order, through the orchestrator's launch path) and the
    scheduled-run columns for INSERT_SLOTS_SQL."""
    directives = Directive.objects.in_bulk(
        {s.directive_id for s in batch.locked if s.directive_id is not None}
    )
    dispatched = [
        (s, decision.slot) for s, plan in batch.planned for decision in plan.decisions if decision.dispatch
    ]
    previous = previous_slots([(s.id, slot) for s, slot in dispatched])
    launches = [
        {
            "job": batch.jobs[s.job_id],
            "directive": directives.get(s.directive_id) if s.directive_id is not None else None,
            "custom_directive_text": s.custom_directive_text,
            "trigger": Trigger.SCHEDULE,
            "task3_scope": s.task3_scope,
            "task_id": str(uuid.uuid4()),
            "params": s.params,
            "scheduled_for": slot,
            "previous_scheduled_for": previous[(s.id, slot)],
        }
        for s, slot in dispatched
    ]
    runs = OrchestratorService.launch_many(launches)
    pairs = [(s.id, decision) for s, plan in batch.planned for decision in plan.decisions]
    columns, run_for = slot_columns(pairs, runs)
    batch.run_for.update(run_for)
    return columns


# For each (schedule, slot): the latest earlier slot of that schedule that launched a run (a scheduled or
# backfilled one, not a skipped one): a run's `previous_scheduled_for`. One probe of
# scheduledrun_history_idx per slot.
PREVIOUS_SLOTS_SQL = """
SELECT v.schedule_id, v.slot,
       (SELECT max(r.scheduled_for) FROM schedules_scheduledrun r
         WHERE r.schedule_id = v.schedule_id AND r.trigger IN ('schedule', 'backfill')
           AND r.run_id IS NOT NULL AND r.scheduled_for < v.slot)
  FROM unnest(%(ids)s::bigint[], %(slots)s::timestamptz[]) AS v(schedule_id, slot)
"""


def previous_slots(pairs: list[tuple[int, datetime]]) -> dict[tuple[int, datetime], datetime | None]:
    """(schedule id, slot) -> the schedule's latest earlier slot that launched a run, counting the other
    slots of `pairs` (launched together, not yet inserted) as launched; None for the first."""
    if not pairs:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(PREVIOUS_SLOTS_SQL, {"ids": [p[0] for p in pairs], "slots": [p[1] for p in pairs]})
        stored = {(sid, slot): prev for sid, slot, prev in cursor.fetchall()}
    launched: dict[int, set[datetime]] = {}
    for sid, slot in pairs:
        launched.setdefault(sid, set()).add(slot)
    result: dict[tuple[int, datetime], datetime | None] = {}
    for sid, slots in launched.items():
        before = None  # the previous slot of this call
        for slot in sorted(slots):
            result[(sid, slot)] = max(
                (t for t in (stored[(sid, slot)], before) if t is not None), default=None
            )
            before = slot
    return result


def slot_columns(pairs: list[tuple[int, SlotDecision]], runs: list[Run]) -> tuple[dict[str, list], dict]:
    """INSERT_SLOTS_SQL's columns for (schedule id, slot decision) pairs, the launched `runs` taken in
    order by the decisions that dispatch; and (schedule id, slot) -> run of those."""
    run_iter = iter(runs)
    run_for: dict[tuple[int, datetime], Run] = {}
    columns: dict[str, list] = {
        k: [] for k in ("schedule_ids", "run_ids", "slots", "statuses", "task_ids", "reasons")
    }
    for schedule_id, decision in pairs:
        run = next(run_iter) if decision.dispatch else None
        columns["schedule_ids"].append(schedule_id)
        columns["run_ids"].append(run.pk if run else None)
        columns["slots"].append(decision.slot)
        columns["statuses"].append(ScheduledRunStatus.QUEUED if run else ScheduledRunStatus.SKIPPED)
        columns["task_ids"].append(run.task_id if run else "")
        columns["reasons"].append(decision.reason)
        if run is not None:
            run_for[(schedule_id, decision.slot)] = run
    return columns, run_for


def insert_slots(columns: dict[str, list], *, trigger: str) -> dict[tuple[int, datetime], int]:
    """Insert scheduled runs (INSERT_SLOTS_SQL); returns (schedule id, slot) -> id of those inserted.
    A slot that already exists is left out: the caller deletes the run it made for it."""
    if not columns["slots"]:
        return {}
    with connection.cursor() as cursor:
        cursor.execute(INSERT_SLOTS_SQL, {**columns, "trigger": trigger})
        return {(sid, slot): srid for srid, sid, slot in cursor.fetchall()}


def _write_slots(batch: _Batch, columns: dict[str, list]) -> None:
    """Insert the scheduled runs, drop runs whose slot already existed, advance and release the rows."""
    batch.inserted = insert_slots(columns, trigger=Trigger.SCHEDULE)
    # A conflict means the slot already exists (a backfill got there first; otherwise never expected
    # under a held claim and the high-water mark, but the constraint is the last word).
    orphans = [run.pk for key, run in batch.run_for.items() if key not in batch.inserted]
    if orphans:
        Run.objects.filter(pk__in=orphans).delete()
        logger.warning("slots already dispatched", extra={"count": len(orphans), "claimant": batch.claimant})
    if not batch.planned:
        return
    runs = {s.id: 0 for s, _ in batch.planned}
    for sid, slot in batch.run_for:
        if (sid, slot) in batch.inserted:
            runs[sid] += 1
    keep = set(batch.unfinished_ids)  # cut by the budget: keep the claim for the next transaction
    # The row is locked, so runs_left (read with the lock) is exact: reaching max_runs disables it, and
    # it has no next run (a stale next_run_at would show a run that never comes; enabling it again
    # recomputes one from now).
    completes = [s.runs_left is not None and 0 < s.runs_left <= runs[s.id] for s, _ in batch.planned]
    claiming.advance_and_release(
        claimant=batch.claimant,
        ids=[s.id for s, _ in batch.planned],
        last=[plan.last_slot for _, plan in batch.planned],
        next_run_at=[
            None if done else plan.next_run_at
            for (_, plan), done in zip(batch.planned, completes, strict=True)
        ],
        keep=[s.id in keep for s, _ in batch.planned],
        runs=[runs[s.id] for s, _ in batch.planned],
        completes=completes,
    )


def _cancel_overlapped(batch: _Batch, counts: dict[int, int]) -> None:
    """`cancel_other` and `terminate_other`: each schedule's new run cancels its other unfinished runs."""
    for s, _ in batch.planned:
        if s.overlap_policy not in CANCELLING_POLICIES or not counts.get(s.id):
            continue
        new = {
            run.pk: slot
            for (sid, slot), run in batch.run_for.items()
            if sid == s.id and (sid, slot) in batch.inserted
        }
        if new:
            cancel_overlapped(s.id, s.overlap_policy, keep=set(new), slot=max(new.values()))


def cancel_overlapped(schedule_id: int, overlap_policy: str, *, keep: set[int], slot: datetime) -> None:
    """Cancel the schedule's unfinished runs but `keep` (the new slot's): with the cancel grace under
    `cancel_other`, none (SIGKILL) under `terminate_other`. The new run then waits for the schedule's
    one slot (worker/caps.py) until the cancelled one has let it go."""
    if overlap_policy not in CANCELLING_POLICIES:
        return
    grace = 0.0 if overlap_policy == OverlapPolicy.TERMINATE_OTHER else cancelling.default_grace()
    by = f"overlap_policy {overlap_policy} (slot {slot.isoformat()})"
    cancelled, stopping = cancelling.cancel_unfinished_of_schedule(schedule_id, keep=keep, by=by, grace=grace)
    if cancelled or stopping:
        logger.info(
            "overlapped runs cancelled",
            extra={"schedule_id": schedule_id, "cancelled": len(cancelled), "stopping": len(stopping)},
        )


def _committed_messages(batch: _Batch, result: DispatchResult) -> list[RunMessage]:
    """Count what was written, log it, and build the messages of the runs inserted."""
    messages: list[RunMessage] = []
    log_lines: list[tuple[str, dict]] = []
    for s, plan in batch.planned:
        job = batch.jobs[s.job_id]
        for decision in plan.decisions:
            key = (s.id, decision.slot)
            if key not in batch.inserted:
                continue
            slot = decision.slot.isoformat()
            if decision.dispatch:
                run = batch.run_for[key]
                result.dispatched += 1
                messages.append(
                    RunMessage.build(
                        run_id=run.pk,
                        task_id=run.task_id,
                        job_key=job.key,
                        job_queue=job.queue,
                        scheduled_run_id=batch.inserted[key],
                    )
                )
                # Every run field (project/logging.py), so the run can be followed from here to its worker.
                run_fields = {"scheduled_run_id": batch.inserted[key], "job": job.key, "task_id": run.task_id}
                log_lines.append(
                    ("slot dispatched", {"schedule_id": s.id, "slot": slot, "run_id": run.pk, **run_fields})
                )
            else:
                result.skipped += 1
                log_lines.append(
                    ("slot skipped", {"schedule_id": s.id, "slot": slot, "reason": decision.reason})
                )
        if plan.completed:
            log_lines.append(("schedule completed its max_runs", {"schedule_id": s.id}))
    for message, extra in log_lines:
        logger.info(message, extra={**extra, "claimant": batch.claimant})
    return messages


def _publish(messages: list[RunMessage], result: DispatchResult) -> None:
    """Hand the committed runs' messages to the broker; a failure leaves them to the outbox sweep."""
    if messages and connection.in_atomic_block:
        # Called inside someone else's transaction: our block was only a savepoint, so wait for theirs.
        publish_on_commit(messages)
    elif messages:
        try:
            send_messages(messages)
        except Exception as exc:
            result.publish_failed += len(messages)
            logger.warning(
                "publish failed; left for the outbox sweep",
                extra={"count": len(messages), "error": type(exc).__name__},
            )
        else:
            result.published += len(messages)
            # If the stamp is lost (database gone), the sweep publishes again later: a duplicate
            # message with the same task id, which the worker's conditional transition absorbs.
            stamp_published(messages)


# --- Manual paths (API and admin) -----------------------------------------------------------------


def message_for(job: Job, run: Run, scheduled_run: ScheduledRun | None) -> RunMessage:
    """The run's message (RunMessage.build), from the model instances."""
    return RunMessage.build(
        run_id=run.pk,
        task_id=run.task_id,
        job_key=job.key,
        job_queue=job.queue,
        scheduled_run_id=scheduled_run.pk if scheduled_run is not None else None,
    )


# A run-now holds its schedule's key while it inserts, so a delete waits for it (and cancels the run)
# instead of the run-now failing at commit on the foreign key to a schedule deleted meanwhile.
# Its now() is the run-now's slot (the database clock, as every slot is): it orders the run among the
# waiters for a cap (worker/semaphore.py) with the scheduled ones.
_HOLD_SCHEDULE_SQL = "SELECT now() FROM schedules_schedule WHERE id = %s FOR KEY SHARE"


@transaction.atomic
def run_now(schedule: Schedule, *, params: dict | None = None) -> ScheduledRun:
    """Launch the schedule's job now, outside its slots. Works on a disabled schedule; caps still apply.
    The run takes `params` (the caller checked them; schedules.services.run_now merges an override)
    or else the schedule's.

    Raises Http404 when the schedule was deleted meanwhile (the API's answer for a deleted schedule)."""
    with connection.cursor() as cursor:
        cursor.execute(_HOLD_SCHEDULE_SQL, [schedule.pk])
        held = cursor.fetchone()
    if held is None:
        raise Http404(f"schedule {schedule.pk} was deleted")
    run = OrchestratorService.launch(
        job=schedule.job,
        directive=schedule.directive,
        custom_directive_text=schedule.custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=schedule.task3_scope,
        params=schedule.params if params is None else params,
        scheduled_for=held[0],
        previous_scheduled_for=previous_slots([(schedule.pk, held[0])])[(schedule.pk, held[0])],
    )
    scheduled_run = ScheduledRun.objects.create(
        schedule=schedule,
        run=run,
        trigger=Trigger.MANUAL,
        scheduled_for=held[0],
        status=ScheduledRunStatus.QUEUED,
        task_id=run.task_id,
    )
    # The job's time limits and the schedule's name are at hand: the publish does not read them again.
    publish_on_commit(
        [message_for(schedule.job, run, scheduled_run)],
        limits={schedule.job.key: time_limits(schedule.job.timeout_seconds)},
        names={scheduled_run.pk: schedule.name},
    )
    logger.info(
        "run now",
        extra={
            "run_id": run.pk,
            "scheduled_run_id": scheduled_run.pk,
            "schedule_id": schedule.pk,
            "job": schedule.job.key,
            "task_id": run.task_id,
        },
    )
    return scheduled_run
