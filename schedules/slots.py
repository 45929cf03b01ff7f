"""The slot policy, pure: what to do with a schedule's due slots at a given instant.

No database, no clock: `plan_slots` takes the row's timing and the database's `now()` and decides every
due slot (misfire policy, catch-up window, overlap policy, bounds, max_runs); schedules.dispatch applies
the plan inside the transaction that holds the row. Tested exhaustively in tests/unit/test_slots.py.

Jitter (issue 16): a slot S is dispatched at `timing.dispatch_at(S)`, up to `jitter_seconds` after it;
`next_run_at` holds that dispatch time and the plan recovers S from it (`timing.slot_of`). A slot's
lateness counts from the end of its jitter window, so jitter never turns an on-time slot into a missed
one; a slot whose own dispatch time has not come is not due, even when S itself has passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from schedules import timing
from schedules.models import MisfirePolicy, OverlapPolicy

# run_all catches up at most this many missed slots (docs/ARCHITECTURE.md, guarantee 2).
MAX_CATCH_UP_SLOTS = 100

MISSED_REASON = "missed while the scheduler was down (misfire_policy skip)"
OVERLAP_SKIP_REASON = "previous run still unfinished (overlap_policy skip)"
OVERLAP_BUFFER_REASON = "a run is already waiting behind the unfinished one (overlap_policy buffer_one)"
# buffer_all queues every overlapping slot, up to this many waiting behind the unfinished run.
MAX_BUFFERED_SLOTS = 100
OVERLAP_BUFFER_ALL_REASON = (
    f"{MAX_BUFFERED_SLOTS} runs already waiting behind the unfinished one (overlap_policy buffer_all)"
)
# cancel_other and terminate_other: of the slots due at once, the latest cancels the others before they
# start, so they are recorded skipped instead.
CANCELLING_POLICIES = frozenset({OverlapPolicy.CANCEL_OTHER, OverlapPolicy.TERMINATE_OTHER})
OVERLAP_SUPERSEDED_REASON = "superseded by a later slot due at the same time (overlap_policy {policy})"
JOB_DISABLED_REASON = "job disabled"


@dataclass(frozen=True)
class SlotDecision:
    slot: datetime
    dispatch: bool  # False: recorded as `skipped` with `reason`
    reason: str = ""


@dataclass(frozen=True)
class SlotPlan:
    decisions: list[SlotDecision]
    # The dispatch time of the first undecided slot (from the slot, never the clock); None when the
    # schedule has no slot left (past end_at).
    next_run_at: datetime | None
    # max_runs reached by this plan: the schedule disables itself.
    completed: bool = False

    @property
    def last_slot(self) -> datetime | None:
        return self.decisions[-1].slot if self.decisions else None

    @property
    def dispatched(self) -> int:
        return sum(1 for decision in self.decisions if decision.dispatch)


def missed_before(*, now: datetime, grace: timedelta, handover: tuple[datetime, datetime] | None) -> datetime:
    """The instant before which a due slot counts as *missed*, for a schedule dispatched at `now`.

    A slot is missed when it waited longer than `grace` for a live scheduler. Time the row spent held
    by a claimant that died (`handover`: from when that claim was taken until it expired) is not
    waiting for a live scheduler: the claim TTL is routinely longer than the grace (120 s against
    60 s by default), and without this a SIGKILLed instance would make its peer record healthy slots
    as missed (docs/ARCHITECTURE.md, guarantee 2). Waiting before that claim was taken, or after it expired,
    still counts,
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


def _due_slots(
    spec: timing.ScheduleSpec, *, first: datetime, now: datetime, cutoff: datetime, misfire_policy: str
) -> tuple[list[datetime], list[datetime], datetime | None]:
    """(missed, on_time, after): the due slots from `first`, split at `cutoff`, and the first slot after
    them (None: none is left in the range). Only the latest missed slot is looked at unless the policy
    runs them all (issue 15.3)."""
    if misfire_policy == MisfirePolicy.RUN_ALL:
        due, after = timing.missed_slots(spec, first=first, now=now, limit=MAX_CATCH_UP_SLOTS)
        missed = [slot for slot in due if slot < cutoff]
        on_time = [slot for slot in due if slot >= cutoff]
    else:
        split = timing.split_due(spec, first=first, now=now, missed_before=cutoff, limit=MAX_CATCH_UP_SLOTS)
        on_time, after = list(split.on_time), split.following
        missed = [split.latest_missed] if split.latest_missed is not None else []
    # With jitter the newest slot may have passed while its dispatch time has not: it is not due yet.
    # (Jitter is at most the shortest gap, so only the newest one can be in that state.)
    newest = on_time[-1] if on_time else (missed[-1] if missed else None)
    if newest is not None and spec.jitter_seconds and timing.dispatch_at(spec, newest) > now:
        (on_time if on_time else missed).pop()
        after = newest
    return missed, on_time, after


# The run times a next_allowed schedule walks through per plan: a far longer downtime is caught up from
# its last stretch (the run times before it are the misfire policy's to drop anyway).
MAX_RUN_TIMES_WALKED = 10_000


def _due_run_times(
    spec: timing.ScheduleSpec, *, first: datetime, now: datetime, cutoff: datetime
) -> tuple[list[datetime], list[datetime], datetime | None]:
    """`_due_slots` for calendar_policy next_allowed: the run times (moved ones included) from `first`
    up to `now`, walked forward, split at `cutoff`, the latest MAX_CATCH_UP_SLOTS of them; and the
    first run time after them."""
    due: list[datetime] = []
    current: datetime | None = first
    for _ in range(MAX_RUN_TIMES_WALKED):
        if current is None or current > now:
            break
        due.append(current)
        if len(due) > MAX_CATCH_UP_SLOTS:
            del due[0]
        current = timing.next_run_time(spec, after=current)
    else:
        if current is not None and current <= now:
            current = timing.next_run_time(spec, after=now)
    missed = [t for t in due if t < cutoff]
    on_time = [t for t in due if t >= cutoff]
    return missed, on_time, current


def decide_overlap(
    to_run: list[datetime], *, overlap_policy: str, unfinished: int, job_enabled: bool
) -> list[SlotDecision]:
    """The overlap policy over the slots to run, in order, counting the runs this plan adds.

    `cancel_other` and `terminate_other` dispatch the last slot only: it cancels the unfinished runs
    (schedules.dispatch), and would cancel the earlier slots of this plan too."""
    decisions: list[SlotDecision] = []
    for index, slot in enumerate(to_run):
        if not job_enabled:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=JOB_DISABLED_REASON))
        elif overlap_policy == OverlapPolicy.SKIP and unfinished > 0:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=OVERLAP_SKIP_REASON))
        elif overlap_policy == OverlapPolicy.BUFFER_ONE and unfinished > 1:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=OVERLAP_BUFFER_REASON))
        elif overlap_policy == OverlapPolicy.BUFFER_ALL and unfinished > MAX_BUFFERED_SLOTS:
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=OVERLAP_BUFFER_ALL_REASON))
        elif overlap_policy in CANCELLING_POLICIES and index < len(to_run) - 1:
            reason = OVERLAP_SUPERSEDED_REASON.format(policy=overlap_policy)
            decisions.append(SlotDecision(slot=slot, dispatch=False, reason=reason))
        else:
            decisions.append(SlotDecision(slot=slot, dispatch=True))
            unfinished += 1
    return decisions


def _cut_at_runs_left(
    decisions: list[SlotDecision], runs_left: int | None
) -> tuple[list[SlotDecision], bool]:
    """Stop after the `runs_left`-th run (max_runs): the slots after it are never decided."""
    if runs_left is None:
        return decisions, False
    dispatched = 0
    for index, decision in enumerate(decisions):
        dispatched += decision.dispatch
        if dispatched >= runs_left:
            return decisions[: index + 1], True
    return decisions, False


def plan_slots(
    spec: timing.ScheduleSpec,
    *,
    next_run_at: datetime | None,
    last_run_at: datetime | None,
    now: datetime,
    misfire_policy: str,
    overlap_policy: str,
    unfinished: int,
    grace: timedelta,
    job_enabled: bool = True,
    max_slots: int | None = None,
    handover: tuple[datetime, datetime] | None = None,
    runs_left: int | None = None,
) -> SlotPlan:
    """Decide every slot of one schedule that is due at `now` (the database clock).

    `next_run_at` is the dispatch time of the first undecided slot (the slot itself without jitter).
    A slot that waited longer than `grace` (the schedule's catch-up window, else the scheduler's) past
    its jitter window for a live scheduler is *missed* (the schedulers were down or far behind; a claim
    held by a dead instance, `handover`, does not count: see `missed_before`). misfire_policy:
    `run_all` runs each missed slot (the latest MAX_CATCH_UP_SLOTS), `run_once` runs only the latest
    one, `skip` runs none and records the latest as `skipped` so history shows the gap. Slots not missed
    always run. overlap_policy then applies to each slot to run, in order, counting the schedule's
    unfinished runs (`unfinished`) plus the ones this plan adds. No slot after `spec.end_at` is decided;
    past it `next_run_at` is None. `runs_left` (max_runs minus the runs so far) ends the plan at its last
    run, `completed`. `max_slots` cuts a long plan; `next_run_at` then points at the first undecided
    slot, which is still due.

    The cost is that of the slots decided, never of the downtime: `run_once` and `skip` look only at
    the on-time slots and the latest missed one (issue 15.3).
    """
    if next_run_at is None or next_run_at > now:
        return SlotPlan(decisions=[], next_run_at=next_run_at)
    if runs_left is not None and runs_left <= 0:
        return SlotPlan(decisions=[], next_run_at=next_run_at, completed=True)
    first = timing.slot_of(spec, next_run_at) if spec.jitter_seconds else next_run_at
    if first is None:  # no slot left before the end of the range (year 9999): no next run
        return SlotPlan(decisions=[], next_run_at=None)
    cutoff = missed_before(now=now, grace=grace, handover=handover)
    if spec.jitter_seconds:
        cutoff -= timedelta(seconds=spec.jitter_seconds)
    if spec.moves:
        missed, on_time, after = _due_run_times(spec, first=first, now=now, cutoff=cutoff)
    else:
        missed, on_time, after = _due_slots(
            spec, first=first, now=now, cutoff=cutoff, misfire_policy=misfire_policy
        )
    if last_run_at is not None:
        # High-water mark: no slot at or before the last dispatched one is ever created again.
        missed = [slot for slot in missed if slot > last_run_at]
        on_time = [slot for slot in on_time if slot > last_run_at]
    if spec.start_at is not None or spec.end_at is not None:
        # Bounds: nothing before start_at (a slot set by hand) and nothing after end_at.
        missed = [slot for slot in missed if timing.within_bounds(spec, slot)]
        on_time = [slot for slot in on_time if timing.within_bounds(spec, slot)]
    if not missed and not on_time:
        return SlotPlan(decisions=[], next_run_at=timing.next_dispatch(spec, after))

    decisions: list[SlotDecision] = []
    if misfire_policy == MisfirePolicy.RUN_ALL:
        to_run = missed + on_time
    elif misfire_policy == MisfirePolicy.SKIP:
        to_run = on_time
        if missed:
            decisions.append(SlotDecision(slot=missed[-1], dispatch=False, reason=MISSED_REASON))
    else:  # run_once
        to_run = on_time or missed[-1:]
    ruled_out: list[SlotDecision] = []
    if spec.calendared and not spec.moves:
        # calendar_policy skip: a slot the calendars rule out is recorded skipped, naming the calendar.
        verdicts = {slot: timing.calendar_verdict(spec, slot) for slot in to_run}
        ruled_out = [SlotDecision(slot=s, dispatch=False, reason=r) for s, r in verdicts.items() if r]
        to_run = [slot for slot in to_run if verdicts[slot] is None]
    decisions += decide_overlap(
        to_run, overlap_policy=overlap_policy, unfinished=unfinished, job_enabled=job_enabled
    )
    if ruled_out:
        decisions = sorted(decisions + ruled_out, key=lambda decision: decision.slot)

    planned = len(decisions)
    decisions, completed = (
        (decisions, False) if runs_left is None else _cut_at_runs_left(decisions, runs_left)
    )
    if max_slots is not None and len(decisions) > max_slots:
        decisions, completed = decisions[:max_slots], False
    if len(decisions) < planned:
        # Cut short: the next undecided slot follows the last decided one (still due, unless completed).
        last = decisions[-1].slot
        after = timing.next_run_time(spec, after=last) if spec.moves else timing.next_slot(spec, after=last)
    return SlotPlan(decisions=decisions, next_run_at=timing.next_dispatch(spec, after), completed=completed)
