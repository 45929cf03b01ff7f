"""The slot policy (schedules.slots), pure: misfire and overlap policies, catch-up, hand-overs, DST,
and the timing of issue 16 (jitter, bounds, max_runs, catch-up window). No database, no clock.

Moved here from tests/integration/test_dispatch.py with the policy itself (issue 15's structure).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schedules import timing
from schedules.slots import (
    JOB_DISABLED_REASON,
    MAX_BUFFERED_SLOTS,
    MISSED_REASON,
    OVERLAP_BUFFER_ALL_REASON,
    OVERLAP_BUFFER_REASON,
    OVERLAP_SKIP_REASON,
    OVERLAP_SUPERSEDED_REASON,
    plan_slots,
)

GRACE = timedelta(seconds=60)


# --- pure: plan_slots ------------------------------------------------------------------------------

SPEC10 = timing.ScheduleSpec(schedule_type="interval", interval_minutes=10)
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def plan(**kw):
    args = {
        "next_run_at": T0,
        "last_run_at": None,
        "now": T0 + timedelta(minutes=35),
        "misfire_policy": "run_once",
        "overlap_policy": "allow",
        "unfinished": 0,
        "grace": GRACE,
    }
    args.update(kw)
    return plan_slots(SPEC10, **args)


def test_plan__on_time_slot_runs_and_next_comes_from_the_slot():
    p = plan(now=T0 + timedelta(seconds=7))
    assert [(d.slot, d.dispatch) for d in p.decisions] == [(T0, True)]
    assert p.next_run_at == T0 + timedelta(minutes=10)  # from the slot, not from now (+7 s)


def test_plan__run_once_runs_only_the_latest_missed_slot():
    p = plan(misfire_policy="run_once")
    assert [(d.slot, d.dispatch) for d in p.decisions] == [(T0 + timedelta(minutes=30), True)]
    assert p.next_run_at == T0 + timedelta(minutes=40)


def test_plan__skip_runs_none_and_records_the_latest_missed_slot():
    p = plan(misfire_policy="skip")
    assert [(d.slot, d.dispatch, d.reason) for d in p.decisions] == [
        (T0 + timedelta(minutes=30), False, MISSED_REASON)
    ]


def test_plan__run_all_runs_each_missed_slot_at_most_100():
    p = plan(misfire_policy="run_all")
    assert [d.slot for d in p.decisions] == [T0 + timedelta(minutes=m) for m in (0, 10, 20, 30)]
    long = plan(misfire_policy="run_all", now=T0 + timedelta(minutes=10 * 150 + 1))
    assert len(long.decisions) == 100
    assert long.decisions[-1].slot == T0 + timedelta(minutes=1500)


def test_plan__never_creates_a_slot_at_or_before_last_run_at():
    p = plan(misfire_policy="run_all", last_run_at=T0 + timedelta(minutes=20))
    assert [d.slot for d in p.decisions] == [T0 + timedelta(minutes=30)]


def test_plan__overlap_policies():
    now = T0 + timedelta(seconds=1)
    assert plan(now=now, overlap_policy="skip", unfinished=1).decisions[0].reason == OVERLAP_SKIP_REASON
    assert plan(now=now, overlap_policy="buffer_one", unfinished=1).decisions[0].dispatch
    assert (
        plan(now=now, overlap_policy="buffer_one", unfinished=2).decisions[0].reason == OVERLAP_BUFFER_REASON
    )
    assert plan(now=now, overlap_policy="allow", unfinished=5).decisions[0].dispatch
    # buffer_one during a catch-up: one runs, one waits behind it, the rest are recorded as skipped
    p = plan(misfire_policy="run_all", overlap_policy="buffer_one")
    assert [d.dispatch for d in p.decisions] == [True, True, False, False]


def test_plan__buffer_all_queues_every_overlapping_slot_up_to_100_waiting():
    now = T0 + timedelta(seconds=1)
    assert plan(now=now, overlap_policy="buffer_all", unfinished=MAX_BUFFERED_SLOTS).decisions[0].dispatch
    refused = plan(now=now, overlap_policy="buffer_all", unfinished=MAX_BUFFERED_SLOTS + 1).decisions[0]
    assert (refused.dispatch, refused.reason) == (False, OVERLAP_BUFFER_ALL_REASON)
    # During a catch-up every slot runs (buffered behind each other), until 100 wait.
    p = plan(misfire_policy="run_all", overlap_policy="buffer_all", unfinished=1)
    assert [d.dispatch for d in p.decisions] == [True, True, True, True]
    p = plan(misfire_policy="run_all", overlap_policy="buffer_all", unfinished=MAX_BUFFERED_SLOTS - 1)
    assert [d.dispatch for d in p.decisions] == [True, True, False, False]


@pytest.mark.parametrize("policy", ["cancel_other", "terminate_other"])
def test_plan__cancelling_policies_dispatch_the_new_slot_and_only_the_latest_of_a_catch_up(policy):
    now = T0 + timedelta(seconds=1)
    # The unfinished run does not hold the new slot back: the dispatch cancels it.
    assert plan(now=now, overlap_policy=policy, unfinished=3).decisions[0].dispatch
    p = plan(misfire_policy="run_all", overlap_policy=policy)
    assert [d.dispatch for d in p.decisions] == [False, False, False, True]
    assert {d.reason for d in p.decisions[:3]} == {OVERLAP_SUPERSEDED_REASON.format(policy=policy)}


def test_plan__disabled_job_records_skipped_slots():
    p = plan(now=T0 + timedelta(seconds=1), job_enabled=False)
    assert [(d.dispatch, d.reason) for d in p.decisions] == [(False, JOB_DISABLED_REASON)]


def test_plan__cut_by_budget_keeps_the_rest_due():
    p = plan(misfire_policy="run_all", max_slots=3)
    assert len(p.decisions) == 3
    assert p.next_run_at == T0 + timedelta(minutes=30)


NY_0230 = timing.ScheduleSpec(schedule_type="cron", cron_expr="30 2 * * *", timezone="America/New_York")


def _walk(first: datetime, days: int) -> list[datetime]:
    """Dispatch day after day as the scheduler would: each pass a second after the slot."""
    out, next_run_at, last = [], first, None
    for _ in range(days):
        p = plan_slots(
            NY_0230,
            next_run_at=next_run_at,
            last_run_at=last,
            now=next_run_at + timedelta(seconds=1),
            misfire_policy="run_once",
            overlap_policy="allow",
            unfinished=0,
            grace=GRACE,
        )
        out += [d.slot for d in p.decisions]
        last, next_run_at = p.last_slot, p.next_run_at
    return out


def test_dst__daily_0230_new_york_across_spring_forward():
    slots = _walk(datetime(2026, 3, 7, 7, 30, tzinfo=UTC), 3)
    # 02:30 does not exist on 2026-03-08: the first valid instant after it, 03:00 EDT = 07:00Z.
    assert slots == [
        datetime(2026, 3, 7, 7, 30, tzinfo=UTC),
        datetime(2026, 3, 8, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC),
    ]


def test_dst__daily_0230_new_york_across_fall_back():
    slots = _walk(datetime(2026, 10, 31, 6, 30, tzinfo=UTC), 3)
    assert slots == [
        datetime(2026, 10, 31, 6, 30, tzinfo=UTC),
        datetime(2026, 11, 1, 7, 30, tzinfo=UTC),  # 02:30 EST (01:xx repeats, 02:30 does not)
        datetime(2026, 11, 2, 7, 30, tzinfo=UTC),
    ]


# --- a dead claimant's hold is not lateness (issue 15.1) --------------------------------------------

SPEC1 = timing.ScheduleSpec(schedule_type="interval", interval_minutes=1)


def plan1(**kw):
    args = {"last_run_at": None, "overlap_policy": "allow", "unfinished": 0, "grace": GRACE}
    args.update(kw)
    return plan_slots(SPEC1, **args)


@pytest.mark.parametrize("policy", ["skip", "run_once", "run_all"])
def test_plan__slots_held_by_a_dead_claimant_are_not_missed(policy):
    # Claimed 5 s after its slot by an instance that died; its 120 s claim expired at T0 + 125 s.
    handover = (T0 + timedelta(seconds=5), T0 + timedelta(seconds=125))
    p = plan1(next_run_at=T0, now=T0 + timedelta(seconds=126), misfire_policy=policy, handover=handover)
    assert [(d.slot, d.dispatch) for d in p.decisions] == [
        (T0, True),
        (T0 + timedelta(minutes=1), True),
        (T0 + timedelta(minutes=2), True),
    ]
    assert p.next_run_at == T0 + timedelta(minutes=3)


def test_plan__a_hand_over_long_ago_still_leaves_a_downtime_missed():
    # The dead claim expired 10 minutes ago and no scheduler ran since: a real downtime.
    handover = (T0, T0 + timedelta(minutes=2))
    now = T0 + timedelta(minutes=12, seconds=5)
    skip = plan1(next_run_at=T0, now=now, misfire_policy="skip", handover=handover)
    assert [(d.slot, d.dispatch) for d in skip.decisions] == [
        (T0 + timedelta(minutes=11), False),
        (T0 + timedelta(minutes=12), True),
    ]
    once = plan1(next_run_at=T0, now=now, misfire_policy="run_once", handover=handover)
    assert [d.slot for d in once.decisions] == [T0 + timedelta(minutes=12)]


def test_plan__slots_already_missed_when_the_dead_claimant_took_them_stay_missed():
    # Down an hour, then the first instance back claimed at T0 + 60 min and died: the hour counts.
    handover = (T0 + timedelta(minutes=60), T0 + timedelta(minutes=62))
    now = T0 + timedelta(minutes=62, seconds=1)
    p = plan1(next_run_at=T0, now=now, misfire_policy="skip", handover=handover)
    # Slot 59 had waited a minute when that claim was taken (+1 s after it expired): missed. Slots
    # 60.. came due under the dead claim or just after: on time.
    assert [(d.slot, d.dispatch) for d in p.decisions] == [
        (T0 + timedelta(minutes=59), False),
        (T0 + timedelta(minutes=60), True),
        (T0 + timedelta(minutes=61), True),
        (T0 + timedelta(minutes=62), True),
    ]


def test_plan__a_minute_cron_a_month_behind_decides_only_the_latest_slots():
    spec = timing.ScheduleSpec(schedule_type="cron", cron_expr="* * * * *", timezone="America/New_York")
    now = datetime(2026, 3, 31, 12, 0, 30, tzinfo=UTC)
    first = now.replace(second=0) - timedelta(days=30)  # across the spring-forward of 2026-03-08
    common = {"next_run_at": first, "last_run_at": None, "now": now, "overlap_policy": "allow"}
    once = plan_slots(spec, misfire_policy="run_once", unfinished=0, grace=GRACE, **common)
    assert [(d.slot, d.dispatch) for d in once.decisions] == [(now.replace(second=0), True)]
    skip = plan_slots(spec, misfire_policy="skip", unfinished=0, grace=GRACE, **common)
    assert [(d.slot, d.dispatch) for d in skip.decisions] == [
        (now.replace(second=0) - timedelta(minutes=1), False),
        (now.replace(second=0), True),
    ]
    run_all = plan_slots(spec, misfire_policy="run_all", unfinished=0, grace=GRACE, **common)
    assert [d.slot for d in run_all.decisions] == [
        now.replace(second=0) - timedelta(minutes=99 - i) for i in range(100)
    ]
    assert (
        once.next_run_at
        == skip.next_run_at
        == run_all.next_run_at
        == now.replace(second=0) + timedelta(minutes=1)
    )


# --- issue 16: jitter, bounds, max_runs, catch-up window --------------------------------------------

JITTERED = timing.ScheduleSpec(schedule_type="interval", interval_minutes=10, jitter_seconds=300, key="j")


def jittered_slot(minutes: int) -> datetime:
    """A slot of JITTERED's grid (the epoch grid: whole ten minutes)."""
    return T0 + timedelta(minutes=minutes)


def plan_j(**kw):
    args = {
        "last_run_at": None,
        "misfire_policy": "run_once",
        "overlap_policy": "allow",
        "unfinished": 0,
        "grace": GRACE,
    }
    args.update(kw)
    return plan_slots(JITTERED, **args)


def test_jitter__a_slot_runs_at_its_dispatch_time_keyed_on_the_slot_and_next_is_the_next_dispatch_time():
    slot = jittered_slot(0)
    due = timing.dispatch_at(JITTERED, slot)
    assert slot <= due < slot + timedelta(seconds=300)
    p = plan_j(next_run_at=due, now=due)
    assert [(d.slot, d.dispatch) for d in p.decisions] == [(slot, True)]
    assert p.next_run_at == timing.dispatch_at(JITTERED, slot + timedelta(minutes=10))


def test_jitter__a_passed_slot_whose_dispatch_time_has_not_come_is_not_due():
    # Twenty minutes behind: slots 0 and 10 have passed; slot 20's dispatch time may not have.
    slots = [jittered_slot(m) for m in (0, 10, 20)]
    now = slots[2] + timedelta(seconds=1)
    p = plan_j(next_run_at=timing.dispatch_at(JITTERED, slots[0]), now=now, misfire_policy="run_all")
    assert timing.dispatch_at(JITTERED, slots[2]) > now  # slot 20's offset is 163 s with key "j"
    assert [d.slot for d in p.decisions] == slots[:2]
    assert p.next_run_at == timing.dispatch_at(JITTERED, slots[2])


def test_jitter__lateness_counts_from_the_end_of_the_jitter_window():
    # Dispatched 4 min after its dispatch time with a 60 s grace: late, but within slot + jitter + grace.
    slot = jittered_slot(0)
    now = slot + timedelta(seconds=300 + 59)
    p = plan_j(next_run_at=timing.dispatch_at(JITTERED, slot), now=now, misfire_policy="skip")
    assert [(d.slot, d.dispatch) for d in p.decisions] == [(slot, True)]
    p = plan_j(
        next_run_at=timing.dispatch_at(JITTERED, slot), now=now + timedelta(seconds=2), misfire_policy="skip"
    )
    assert [(d.slot, d.dispatch, d.reason) for d in p.decisions] == [(slot, False, MISSED_REASON)]


def test_jitter__a_next_run_at_set_off_the_grid_waits_for_the_next_grid_slots_dispatch_time():
    off = jittered_slot(3)
    p = plan_j(next_run_at=off, now=off)
    assert p.decisions == []
    assert p.next_run_at == timing.dispatch_at(JITTERED, jittered_slot(10))


def test_end_at__no_slot_after_it_and_then_no_next_run():
    end = T0 + timedelta(minutes=15)
    spec = timing.ScheduleSpec(schedule_type="interval", interval_minutes=10, end_at=end)
    p = plan_slots(
        spec, next_run_at=T0, last_run_at=None, now=T0 + timedelta(minutes=35), misfire_policy="run_all",
        overlap_policy="allow", unfinished=0, grace=GRACE,
    )  # fmt: skip
    assert [d.slot for d in p.decisions] == [T0, T0 + timedelta(minutes=10)]
    assert p.next_run_at is None
    ended = plan_slots(
        spec, next_run_at=T0 + timedelta(minutes=20), last_run_at=T0 + timedelta(minutes=10),
        now=T0 + timedelta(minutes=35), misfire_policy="run_once", overlap_policy="allow", unfinished=0,
        grace=GRACE,
    )  # fmt: skip
    assert (ended.decisions, ended.next_run_at) == ([], None)


@pytest.mark.parametrize(("runs_left", "expected"), [(1, 1), (2, 2), (5, 4)])
def test_runs_left__the_plan_ends_at_the_last_run_max_runs_allows(runs_left, expected):
    p = plan(misfire_policy="run_all", runs_left=runs_left)
    assert p.dispatched == expected
    assert p.completed == (runs_left <= 4)
    assert p.next_run_at == p.last_slot + timedelta(minutes=10)


def test_runs_left__skipped_slots_do_not_count_as_runs():
    p = plan(misfire_policy="run_all", runs_left=1, overlap_policy="skip", unfinished=1)
    assert [d.dispatch for d in p.decisions] == [False, False, False, False]
    assert not p.completed


def test_runs_left__none_left_decides_nothing():
    p = plan(runs_left=0)
    assert (p.decisions, p.completed) == ([], True)


def test_catchup_window__a_longer_grace_runs_what_the_default_would_record_missed():
    default = plan(misfire_policy="skip")
    assert [d.dispatch for d in default.decisions] == [False]
    wide = plan(misfire_policy="skip", grace=timedelta(hours=1))
    assert [d.dispatch for d in wide.decisions] == [True, True, True, True]
