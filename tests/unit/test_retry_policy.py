"""Retry policies, pure (orchestrator/retry_policy.py): the backoff schedule against an oracle written
from the issue's words, how an ended attempt counts, and the validation that names each wrong key."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.retry_policy import (
    DEFAULT_POLICY,
    MAX_ATTEMPTS_LIMIT,
    MAX_COEFFICIENT,
    MAX_INTERVAL_LIMIT,
    RETRY_ON_CHOICES,
    attempt_outcome,
    effective_policy,
    policy_errors,
    retry_delay,
    should_retry,
)

OUTCOMES = (*RETRY_ON_CHOICES, "succeeded")


@st.composite
def policies(draw):
    initial = draw(st.floats(min_value=0, max_value=MAX_INTERVAL_LIMIT, allow_nan=False))
    return {
        "max_attempts": draw(st.integers(min_value=1, max_value=MAX_ATTEMPTS_LIMIT)),
        "initial_interval_seconds": initial,
        "backoff_coefficient": draw(st.floats(min_value=1, max_value=MAX_COEFFICIENT, allow_nan=False)),
        "max_interval_seconds": draw(st.floats(min_value=0, max_value=MAX_INTERVAL_LIMIT, allow_nan=False)),
        "retry_on": draw(st.lists(st.sampled_from(RETRY_ON_CHOICES), unique=True)),
    }


def oracle(policy, outcomes):
    """The issue's words: an attempt that ends in one of `retry_on` is followed by another, up to
    `max_attempts` in all; the wait after attempt n is min(initial * coefficient^(n-1), max); any other
    ending (a success, an outcome not retried) is the run's last. Waits computed by repeated
    multiplication, not by a power, and capped as they grow."""
    waits, wait = [], float(policy["initial_interval_seconds"])
    for number, outcome in enumerate(outcomes, start=1):
        if outcome not in policy["retry_on"] or number >= policy["max_attempts"]:
            return number, waits
        waits.append(min(wait, policy["max_interval_seconds"]))
        wait = min(wait * policy["backoff_coefficient"], 10 * MAX_INTERVAL_LIMIT)
    return len(outcomes), waits


def simulate(policy, outcomes):
    """What the retry step does (schedules/retries.py), attempt by attempt, with the pure functions."""
    waits = []
    for number, outcome in enumerate(outcomes, start=1):
        if not should_retry(policy, number, outcome):
            return number, waits
        waits.append(retry_delay(policy, number))
    return len(outcomes), waits


@settings(max_examples=500, deadline=None)
@given(policy=policies(), outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=120))
def test_backoff_schedule__matches_the_oracle(policy, outcomes):
    attempts, waits = simulate(policy, outcomes)
    expected_attempts, expected_waits = oracle(policy, outcomes)
    assert attempts == expected_attempts
    assert attempts <= policy["max_attempts"]
    assert len(waits) == len(expected_waits) == attempts - 1 or attempts == len(outcomes)
    for got, expected in zip(waits, expected_waits, strict=True):
        assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-9)
        assert 0 <= got <= policy["max_interval_seconds"]
    assert waits == sorted(waits)  # never shorter than the wait before


@given(policy=policies())
def test_backoff_schedule__every_failure_retried_gives_max_attempts(policy):
    policy["retry_on"] = list(RETRY_ON_CHOICES)
    attempts, waits = simulate(policy, ["failed"] * MAX_ATTEMPTS_LIMIT)
    assert attempts == policy["max_attempts"]
    assert len(waits) == attempts - 1


def test_retry_delay__the_issue_example():
    policy = {
        **DEFAULT_POLICY,
        "initial_interval_seconds": 5,
        "backoff_coefficient": 2,
        "max_interval_seconds": 30,
    }
    assert [retry_delay(policy, n) for n in range(1, 7)] == [5, 10, 20, 30, 30, 30]


@pytest.mark.parametrize(
    ("status", "summary", "outcome"),
    [
        ("succeeded", "", "succeeded"),
        ("cancelled", "cancelled by alice", "cancelled"),
        ("failed", "ValueError", "failed"),
        ("failed", "timed out after 3s (hard time limit; process killed)", "timed_out"),
        ("failed", "timed out after 2s (Job.timeout_seconds; soft time limit)", "timed_out"),
        ("failed", "worker lost (lease of 4s expired)", "worker_lost"),
        ("failed", "worker lost (Worker exited prematurely: signal 9 (SIGKILL) Job: 0.)", "worker_lost"),
        ("failed", "worker drained (still running after WORKER_DRAIN_SECONDS=5)", "worker_lost"),
    ],
)
def test_attempt_outcome__classifies_how_the_attempt_ended(status, summary, outcome):
    assert attempt_outcome(status, summary) == outcome


def test_should_retry__never_a_success_or_a_cancel():
    policy = {**DEFAULT_POLICY, "max_attempts": 5}
    assert should_retry(policy, 1, "failed")
    assert not should_retry(policy, 1, "succeeded")
    assert not should_retry(policy, 1, "cancelled")
    assert not should_retry(policy, 5, "failed")
    assert not should_retry({**policy, "retry_on": ["worker_lost"]}, 1, "timed_out")


def test_effective_policy__the_schedule_overrides_the_job_and_defaults_fill_in():
    assert effective_policy({}, None) == DEFAULT_POLICY
    assert effective_policy({"max_attempts": 3}, None)["max_attempts"] == 3
    assert effective_policy({"max_attempts": 3}, {"max_attempts": 1})["max_attempts"] == 1
    assert effective_policy({"max_attempts": 3}, {})["max_attempts"] == 1


@pytest.mark.parametrize(
    ("policy", "key"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"max_attempts": 2.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_attempts": float("nan")}, "max_attempts"),
        ({"initial_interval_seconds": -1}, "initial_interval_seconds"),
        ({"initial_interval_seconds": "5"}, "initial_interval_seconds"),
        ({"max_interval_seconds": MAX_INTERVAL_LIMIT + 1}, "max_interval_seconds"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"backoff_coefficient": float("inf")}, "backoff_coefficient"),
        ({"retry_on": ["failed", "failed"]}, "retry_on"),
        ({"retry_on": ["crashed"]}, "retry_on"),
        ({"retry_on": "failed"}, "retry_on"),
        ({"retries": 3}, "retries"),
        ([], "non_field_errors"),
    ],
)
def test_policy_errors__name_the_wrong_key(policy, key):
    assert list(policy_errors(policy)) == [key]


def test_policy_errors__a_full_policy_and_an_empty_one_are_valid():
    assert policy_errors({}) == {}
    assert policy_errors(DEFAULT_POLICY) == {}
    assert policy_errors({"max_attempts": 100, "retry_on": [], "initial_interval_seconds": 0}) == {}
    assert policy_errors({"max_attempts": 3.0}) == {}  # JSON Schema's integer
    assert effective_policy({"max_attempts": 3.0}, None)["max_attempts"] == 3
