"""Creating scheduled runs: dispatching due slots (the scheduler) and run-now (the API and admin).

Dispatch works on schedules this instance has claimed (schedules.claiming). Each transaction locks a
batch of claimed rows that are *still ours* (`claimed_by = me AND claimed_until > now()`), decides every
due slot (misfire and overlap policies, `plan_slots`, pure), inserts the runs and scheduled runs in bulk,
advances `last_run_at`/`next_run_at` from the slots and releases the claims, then commits; the run
messages are published only after the commit. A crash anywhere before the commit leaves nothing but an
expiring claim; a crash after it leaves `queued` rows with no `published_at`, which the outbox sweep
publishes. The unique slot constraint (`scheduledrun_unique_slot`) backs all of this: a slot that is
already there is never inserted twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

from orchestrator.models import Directive, Job, Run, Trigger
from orchestrator.services import OrchestratorService
from schedules import timing
from schedules.claiming import renew
from schedules.models import MisfirePolicy, OverlapPolicy, Schedule, ScheduledRun, ScheduledRunStatus
from schedules.publishing import RunMessage, publish_on_commit, send_messages, stamp_published

logger = logging.getLogger(__name__)

# run_all catches up at most this many missed slots (DESIGN 6.2).
MAX_CATCH_UP_SLOTS = 100
# Schedules locked per transaction, and slots (rows) written per transaction: a killed instance loses
# at most one such transaction, and 10,000 due slots cost tens of statements, not tens of thousands.
SCHEDULES_PER_TRANSACTION = 200
SLOTS_PER_TRANSACTION = 500

MISSED_REASON = "missed while the scheduler was down (misfire_policy skip)"
OVERLAP_SKIP_REASON = "previous run still unfinished (overlap_policy skip)"
OVERLAP_BUFFER_REASON = "a run is already waiting behind the unfinished one (overlap_policy buffer_one)"
JOB_DISABLED_REASON = "job disabled"


class SchedulerError(Exception):
    """Base for the scheduler's domain errors."""


class ClaimLost(SchedulerError):
    pass


# --- Pure: what to do with a schedule's due slots ---------------------------------------------------


@dataclass(frozen=True)
class SlotDecision:
    slot: datetime
    dispatch: bool  # False: recorded as `skipped` with `reason`
    reason: str = ""


@dataclass(frozen=True)
class SlotPlan:
    decisions: list[SlotDecision]
    next_run_at: datetime  # the slot after the last one decided (from the slot, never the clock)

    @property
    def last_slot(self) -> datetime | None:
        return self.decisions[-1].slot if self.decisions else None


def missed_before(*, now: datetime, grace: timedelta, handover: tuple[datetime, datetime] | None) -> datetime:
    """The instant before which a due slot counts as *missed*, for a schedule dispatched at `now`.

    A slot is missed when it waited longer than `grace` for a live scheduler. Time the row spent held
    by a claimant that died (`handover`: from when that claim was taken until it expired) is not
    waiting for a live scheduler: the claim TTL is routinely longer than the grace (120 s against
    60 s by default), and without this a SIGKILLed instance would make its peer record healthy slots
    as missed (DESIGN 6.2). Waiting before that claim was taken, or after it expired, still counts,
    so a real downtime of every scheduler is still a misfire. Lateness falls as the slot is later, so
    "missed" is one cut-off instant.
    """
    cutoff = now - grace
    if handover is not None:
        start, end = handover
        end = min(end, now)
        start = min(start, end)
        if end >= cutoff:  # the hand-over ended within the grace: its length does not count
            return cutoff - (end - start)
    return cutoff


def plan_slots(
    spec: timing.ScheduleSpec,
    *,
    next_run_at: datetime,
    last_run_at: datetime | None,
    now: datetime,
    misfire_policy: str,
    overlap_policy: str,
    unfinished: int,
    grace: timedelta,
    job_enabled: bool = True,
    max_slots: int | None = None,
    handover: tuple[datetime, datetime] | None = None,
) -> SlotPlan:
    """Decide every slot of one schedule that is due at `now` (the database clock).

    A slot that waited longer than `grace` for a live scheduler is *missed* (the schedulers were down
    or far behind; a claim held by a dead instance, `handover`, does not count: see `missed_before`).
    misfire_policy: `run_all` runs each missed slot (the latest MAX_CATCH_UP_SLOTS), `run_once` runs
    only the latest one, `skip` runs none and records the latest as `skipped` so history shows the gap.
    Slots not missed always run. overlap_policy then applies to each slot to run, in order, counting the
    schedule's unfinished runs (`unfinished`) plus the ones this plan adds. `max_slots` cuts a long
    plan; `next_run_at` then points at the first undecided slot, which is still due.

    The cost is that of the slots decided, never of the downtime: `run_once` and `skip` look only at
    the on-time slots and the latest missed one (issue 15.3).
    """
    if next_run_at > now:
        return SlotPlan(decisions=[], next_run_at=next_run_at)
    cutoff = missed_before(now=now, grace=grace, handover=handover)
    if misfire_policy == MisfirePolicy.RUN_ALL:
        due, after = timing.missed_slots(spec, first=next_run_at, now=now, limit=MAX_CATCH_UP_SLOTS)
        missed = [slot for slot in due if slot < cutoff]
        on_time = [slot for slot in due if slot >= cutoff]
    else:
        split = timing.split_due(
            spec, first=next_run_at, now=now, missed_before=cutoff, limit=MAX_CATCH_UP_SLOTS
        )
        on_time, after = split.on_time, split.following
        missed = [split.latest_missed] if split.latest_missed is not None else []
    if last_run_at is not None:
        # High-water mark: no slot at or before the last dispatched one is ever created again.
        missed = [slot for slot in missed if slot > last_run_at]
        on_time = [slot for slot in on_time if slot > last_run_at]
    if not missed and not on_time:
        return SlotPlan(decisions=[], next_run_at=after)

    decisions: list[SlotDecision] = []
    if misfire_policy == MisfirePolicy.RUN_ALL:
        to_run = missed + on_time
    elif misfire_policy == MisfirePolicy.SKIP:
        to_run = on_time
        if missed:
            decisions.append(SlotDecision(slot=missed[-1], dispatch=False, reason=MISSED_REASON))
    else:  # run_once
        to_run = on_time or missed[-1:]

    for slot in to_run:
        if not job_enabled:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=JOB_DISABLED_REASON))
        elif overlap_policy == OverlapPolicy.SKIP and unfinished > 0:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=OVERLAP_SKIP_REASON))
        elif overlap_policy == OverlapPolicy.BUFFER_ONE and unfinished > 1:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=OVERLAP_BUFFER_REASON))
        else:
            decisions.append(SlotDecision(slot=slot, dispatch=True))
            unfinished += 1

    if max_slots is not None and len(decisions) > max_slots:
        decisions = decisions[:max_slots]
        return SlotPlan(decisions=decisions, next_run_at=timing.next_slot(spec, after=decisions[-1].slot))
    return SlotPlan(decisions=decisions, next_run_at=after)


# --- The scheduler's dispatch ----------------------------------------------------------------------

# The claim check and the lock in one statement: only rows still claimed by us, unexpired (database
# clock), enabled. Another instance that takes over an expired claim skips this lock. SKIP LOCKED: a
# row someone else has locked (an edit in a transaction left open, a session in psql) must not stall
# the 200 schedules of the batch behind it; it is set aside as busy (BUSY_SQL) and retried.
LOCK_CLAIMED_SQL = """
SELECT s.id, s.name, s.schedule_type, s.interval_minutes, s.cron_expr, s.timezone, s.misfire_policy,
       s.overlap_policy, s.last_run_at, s.next_run_at, s.directive_id, s.custom_directive_text,
       s.task3_scope, s.job_id, now()
  FROM schedules_schedule s
 WHERE s.id = ANY(%(ids)s) AND s.enabled
   AND s.claimed_by = %(claimant)s AND s.claimed_until > now()
 ORDER BY s.id
   FOR UPDATE SKIP LOCKED
"""

# Of the rows LOCK_CLAIMED_SQL did not return, those still ours: locked by someone else (a plain read,
# which waits on no lock). The others are gone: expired and taken over, or disabled meanwhile.
BUSY_SQL = """
SELECT id FROM schedules_schedule
 WHERE id = ANY(%(ids)s) AND enabled AND claimed_by = %(claimant)s AND claimed_until > now()
"""

UNFINISHED_SQL = """
SELECT schedule_id, count(*) FROM schedules_scheduledrun
 WHERE schedule_id = ANY(%(ids)s) AND status IN ('queued', 'throttled', 'running')
 GROUP BY schedule_id
"""

# The slot insert: a conflict on the unique slot means the slot is already there (never twice).
INSERT_SLOTS_SQL = """
INSERT INTO schedules_scheduledrun
       (schedule_id, run_id, trigger, scheduled_for, status, task_id, worker, error_summary,
        created_at, finished_at)
SELECT v.schedule_id, v.run_id, 'schedule', v.slot, v.status, v.task_id, '', v.reason,
       now(), CASE WHEN v.status = 'skipped' THEN now() END
  FROM unnest(%(schedule_ids)s::bigint[], %(run_ids)s::bigint[], %(slots)s::timestamptz[],
              %(statuses)s::text[], %(task_ids)s::text[], %(reasons)s::text[])
       AS v(schedule_id, run_id, slot, status, task_id, reason)
    ON CONFLICT (schedule_id, scheduled_for) WHERE trigger = 'schedule' DO NOTHING
RETURNING id, schedule_id, scheduled_for
"""

# Advance from the slots and release the claim, only where the claim is still ours. A schedule whose
# catch-up was cut by the per-transaction budget (`keep`) stays claimed for the next transaction.
ADVANCE_SQL = """
UPDATE schedules_schedule AS s
   SET last_run_at = GREATEST(s.last_run_at, v.last_run_at),
       next_run_at = v.next_run_at,
       claimed_by = CASE WHEN v.keep THEN s.claimed_by ELSE '' END,
       claimed_until = CASE WHEN v.keep THEN s.claimed_until END,
       updated_at = now()
  FROM unnest(%(ids)s::bigint[], %(last)s::timestamptz[], %(next)s::timestamptz[], %(keep)s::boolean[])
       AS v(id, last_run_at, next_run_at, keep)
 WHERE s.id = v.id AND s.claimed_by = %(claimant)s
"""

# Giving back claims of rows we could not lock must not wait for them either.
RELEASE_SQL = """
UPDATE schedules_schedule SET claimed_by = '', claimed_until = NULL
 WHERE id = ANY(ARRAY(SELECT id FROM schedules_schedule
                        WHERE id = ANY(%(ids)s) AND claimed_by = %(claimant)s
                        FOR UPDATE SKIP LOCKED))
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


def dispatch_slot(
    schedule_id: int,
    *,
    claimant: str,
    grace: timedelta,
    taken_over_at: datetime | None = None,
    ttl: float = 0.0,
) -> DispatchResult:
    """Dispatch one claimed schedule's due slots (all of them), publishing after each commit."""
    total = DispatchResult()
    pending = [schedule_id]
    window = handover_window(taken_over_at, ttl=ttl)
    handovers = {schedule_id: window} if window is not None else {}
    while pending:
        result, pending = _dispatch_batch(pending, claimant=claimant, grace=grace, handovers=handovers)
        total.add(result)
    return total


@dataclass(frozen=True)
class _Locked:
    """A claimed schedule row as LOCK_CLAIMED_SQL returns it, with the database's `now()`."""

    id: int
    name: str
    spec: timing.ScheduleSpec
    misfire_policy: str
    overlap_policy: str
    last_run_at: datetime | None
    next_run_at: datetime
    directive_id: int | None
    custom_directive_text: str
    task3_scope: str
    job_id: int
    now: datetime

    @classmethod
    def from_row(cls, row: tuple) -> _Locked:
        (
            sid,
            name,
            stype,
            minutes,
            cron_expr,
            tz,
            misfire,
            overlap,
            last,
            nxt,
            directive_id,
            text,
            scope,
            job_id,
            now,
        ) = row
        spec = timing.ScheduleSpec(
            schedule_type=stype, interval_minutes=minutes, cron_expr=cron_expr or "", timezone=tz or "UTC"
        )
        return cls(sid, name, spec, misfire, overlap, last, nxt, directive_id, text or "", scope, job_id, now)


def _dispatch_batch(
    schedule_ids: list[int],
    *,
    claimant: str,
    grace: timedelta,
    handovers: dict[int, tuple[datetime, datetime]],
) -> tuple[DispatchResult, list[int]]:
    """One transaction: lock, plan, insert, advance, release; then publish. Returns (result, unfinished)."""
    result = DispatchResult()
    messages: list[RunMessage] = []
    unfinished_ids: list[int] = []
    log_lines: list[tuple[str, dict]] = []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(LOCK_CLAIMED_SQL, {"ids": schedule_ids, "claimant": claimant})
            locked = [_Locked.from_row(row) for row in cursor.fetchall()]
            locked_ids = {s.id for s in locked}
            missing = [sid for sid in schedule_ids if sid not in locked_ids]
            if missing:
                # Still ours but locked by someone else: keep the claim, the caller retries it.
                cursor.execute(BUSY_SQL, {"ids": missing, "claimant": claimant})
                busy = {row[0] for row in cursor.fetchall()}
                if busy:
                    result.busy += sorted(busy)
                    logger.warning(
                        "claimed schedules locked by another session; retried later",
                        extra={"claimant": claimant, "count": len(busy), "schedule_ids": sorted(busy)},
                    )
                # Not ours any more (expired and taken over) or disabled meanwhile: give back what is ours.
                gone = [sid for sid in missing if sid not in busy]
                if gone:
                    cursor.execute(RELEASE_SQL, {"ids": gone, "claimant": claimant})
                    result.lost += gone
            if not locked:
                return result, []
            needs_count = [s.id for s in locked if s.overlap_policy != OverlapPolicy.ALLOW]
            counts: dict[int, int] = {}
            if needs_count:
                cursor.execute(UNFINISHED_SQL, {"ids": needs_count})
                counts = dict(cursor.fetchall())

        jobs = Job.objects.in_bulk({s.job_id for s in locked})
        directives = Directive.objects.in_bulk({s.directive_id for s in locked if s.directive_id is not None})
        budget = SLOTS_PER_TRANSACTION
        planned: list[tuple[_Locked, SlotPlan]] = []
        for s in locked:
            if budget <= 0:
                unfinished_ids.append(s.id)  # still claimed; the next transaction takes it
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
                    grace=grace,
                    job_enabled=jobs[s.job_id].enabled,
                    max_slots=budget,
                    handover=handovers.get(s.id),
                )
            except Exception:
                # A schedule whose timing cannot be computed keeps its claim: it is retried once the TTL
                # passes (a natural back-off) and never blocks the others in this batch.
                logger.exception("slot planning failed", extra={"schedule_id": s.id, "schedule": s.name})
                result.failed.append(s.id)
                continue
            budget -= len(plan.decisions)
            planned.append((s, plan))
            if plan.decisions and plan.next_run_at <= s.now:
                unfinished_ids.append(s.id)  # cut by the budget: more slots are due

        # Runs first (one INSERT), in decision order, through the orchestrator's launch path.
        launches = [
            {
                "job": jobs[s.job_id],
                "directive": directives.get(s.directive_id) if s.directive_id is not None else None,
                "custom_directive_text": s.custom_directive_text,
                "trigger": Trigger.SCHEDULE,
                "task3_scope": s.task3_scope,
                "task_id": str(uuid.uuid4()),
            }
            for s, plan in planned
            for decision in plan.decisions
            if decision.dispatch
        ]
        run_iter = iter(OrchestratorService.launch_many(launches))
        columns: dict[str, list] = {
            k: [] for k in ("schedule_ids", "run_ids", "slots", "statuses", "task_ids", "reasons")
        }
        run_for: dict[tuple[int, datetime], Run] = {}
        for s, plan in planned:
            for decision in plan.decisions:
                run = next(run_iter) if decision.dispatch else None
                columns["schedule_ids"].append(s.id)
                columns["run_ids"].append(run.pk if run else None)
                columns["slots"].append(decision.slot)
                columns["statuses"].append(ScheduledRunStatus.QUEUED if run else ScheduledRunStatus.SKIPPED)
                columns["task_ids"].append(run.task_id if run else "")
                columns["reasons"].append(decision.reason)
                if run is not None:
                    run_for[(s.id, decision.slot)] = run

        with connection.cursor() as cursor:
            inserted: dict[tuple[int, datetime], int] = {}
            if columns["slots"]:
                cursor.execute(INSERT_SLOTS_SQL, columns)
                inserted = {(sid, slot): srid for srid, sid, slot in cursor.fetchall()}
            # A conflict means the slot already exists (never expected under a held claim and the
            # high-water mark, but the constraint is the last word): drop the run made for it.
            orphans = [run.pk for key, run in run_for.items() if key not in inserted]
            if orphans:
                Run.objects.filter(pk__in=orphans).delete()
                logger.warning(
                    "slots already dispatched", extra={"count": len(orphans), "claimant": claimant}
                )
            if planned:
                # Schedules cut by the budget keep their claim for the next transaction.
                keep = set(unfinished_ids)
                cursor.execute(
                    ADVANCE_SQL,
                    {
                        "ids": [s.id for s, _ in planned],
                        "last": [plan.last_slot for _, plan in planned],
                        "next": [plan.next_run_at for _, plan in planned],
                        "keep": [s.id in keep for s, _ in planned],
                        "claimant": claimant,
                    },
                )

    # Committed: count what was written and build the messages.
    for s, plan in planned:
        job = jobs[s.job_id]
        for decision in plan.decisions:
            key = (s.id, decision.slot)
            if key not in inserted:
                continue
            slot = decision.slot.isoformat()
            if decision.dispatch:
                run = run_for[key]
                result.dispatched += 1
                messages.append(
                    RunMessage(
                        task_id=run.task_id,
                        run_id=run.pk,
                        scheduled_run_id=inserted[key],
                        job_key=job.key,
                        queue=job.queue or f"jobs.{job.key}",
                    )
                )
                log_lines.append(("slot dispatched", {"schedule_id": s.id, "slot": slot, "run_id": run.pk}))
            else:
                result.skipped += 1
                log_lines.append(
                    ("slot skipped", {"schedule_id": s.id, "slot": slot, "reason": decision.reason})
                )
    # Only now, committed, does anything reach the broker.
    for message, extra in log_lines:
        logger.info(message, extra={**extra, "claimant": claimant})
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
    return result, unfinished_ids


# --- Manual paths (API and admin) -----------------------------------------------------------------


def message_for(job: Job, run: Run, scheduled_run: ScheduledRun | None) -> RunMessage:
    return RunMessage(
        task_id=run.task_id,
        run_id=run.pk,
        scheduled_run_id=scheduled_run.pk if scheduled_run is not None else None,
        job_key=job.key,
        queue=job.queue or f"jobs.{job.key}",
    )


def launch_run(
    *,
    job: Job,
    directive=None,
    custom_directive_text: str = "",
    trigger: str = Trigger.MANUAL,
    task3_scope: str,
) -> Run:
    """Create a `Run` with its Celery task id through the orchestrator (the one launch path)."""
    return OrchestratorService.launch(
        job=job,
        directive=directive,
        custom_directive_text=custom_directive_text,
        trigger=trigger,
        task3_scope=task3_scope,
        task_id=str(uuid.uuid4()),
    )


@transaction.atomic
def run_now(schedule: Schedule) -> ScheduledRun:
    """Launch the schedule's job now, outside its slots. Works on a disabled schedule; caps still apply."""
    run = launch_run(
        job=schedule.job,
        directive=schedule.directive,
        custom_directive_text=schedule.custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=schedule.task3_scope,
    )
    scheduled_run = ScheduledRun.objects.create(
        schedule=schedule,
        run=run,
        trigger=Trigger.MANUAL,
        scheduled_for=timezone.now(),
        status=ScheduledRunStatus.QUEUED,
        task_id=run.task_id,
    )
    publish_on_commit([message_for(schedule.job, run, scheduled_run)])
    return scheduled_run


@transaction.atomic
def launch_manual_run(*, job: Job, directive=None, custom_directive_text: str = "", task3_scope: str) -> Run:
    """POST /api/runs/: a manual launch with no schedule."""
    run = launch_run(
        job=job,
        directive=directive,
        custom_directive_text=custom_directive_text,
        trigger=Trigger.MANUAL,
        task3_scope=task3_scope,
    )
    publish_on_commit([message_for(job, run, None)])
    return run
