"""The run-after graph rules (schedules/dependencies.py), pure: cycles named in run-after order, self
dependency, the statuses a downstream may wait for, and a local date's bounds across DST."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from schedules.dependencies import date_bounds, find_cycle, local_date, run_after_errors, status_errors

NAMES = {1: "a", 2: "b", 3: "c", 4: "d"}


def test_find_cycle__follows_upstreams_back_to_the_start():
    # a runs after c, c after b, b after a
    assert find_cycle({1: {3}, 3: {2}, 2: {1}}, 1) == [1, 3, 2, 1]


def test_find_cycle__none_in_a_chain_or_a_diamond():
    assert find_cycle({3: {2}, 2: {1}}, 3) is None
    assert find_cycle({4: {2, 3}, 2: {1}, 3: {1}}, 4) is None


def test_find_cycle__ignores_cycles_not_through_the_start():
    # the graph was acyclic before an edit; a cycle elsewhere is not this edit's
    assert find_cycle({1: {2}, 2: {3}, 3: {2}}, 1) is None


def test_find_cycle__a_long_chain_does_not_recurse():
    n = 20_000
    edges = {i: {i + 1} for i in range(1, n)}
    edges[n] = {1}
    cycle = find_cycle(edges, 1)
    assert cycle is not None
    assert (cycle[0], cycle[-1], len(cycle)) == (1, 1, n + 1)


def test_run_after_errors__names_the_cycle():
    edges = {2: {1}, 3: {2}}  # b after a, c after b
    errors = run_after_errors(schedule_id=1, name="a", upstream_ids=[3], edges=edges, names=NAMES)
    assert errors == ["cycle a -> c -> b -> a."]


def test_run_after_errors__self_dependency():
    errors = run_after_errors(schedule_id=2, name="b", upstream_ids=[2], edges={}, names=NAMES)
    assert errors == ["A schedule cannot run after itself: cycle b -> b."]


def test_run_after_errors__a_new_schedule_closes_no_cycle():
    assert (
        run_after_errors(schedule_id=None, name="new", upstream_ids=[1, 2], edges={2: {1}}, names=NAMES) == []
    )


def test_run_after_errors__replacing_upstreams_can_break_a_would_be_cycle():
    # c currently runs after b; editing c to run after d only leaves no cycle even though b runs after c
    edges = {3: {2}, 2: {3}}
    assert run_after_errors(schedule_id=3, name="c", upstream_ids=[4], edges=edges, names=NAMES) == []


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (["succeeded"], True),
        (["succeeded", "failed", "cancelled"], True),
        ([], False),
        (["skipped"], False),
        (["queued"], False),
        ("succeeded", False),
        (None, False),
        (["failed", "failed"], False),
    ],
)
def test_status_errors(value, ok):
    assert (status_errors(value) == []) is ok


def test_date_bounds__a_spring_forward_day_is_23_hours():
    lo, hi = date_bounds(date(2026, 3, 8), "America/New_York")
    assert (hi - lo).total_seconds() == 23 * 3600
    assert lo.astimezone(UTC) == datetime(2026, 3, 8, 5, 0, tzinfo=UTC)


def test_local_date__in_the_downstreams_zone():
    instant = datetime(2026, 3, 1, 16, 0, tzinfo=UTC)
    assert local_date(instant, "Asia/Tokyo") == date(2026, 3, 2)
    assert local_date(instant, "UTC") == date(2026, 3, 1)
