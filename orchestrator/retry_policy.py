"""Retry policies, pure: validation, the backoff between attempts, how an ended attempt counts.

A policy is a JSON object on `Job.retry_policy` (the default) and `Schedule.retry_policy` (an override;
null means the job's): `max_attempts` (1 = no retry), `initial_interval_seconds`, `backoff_coefficient`,
`max_interval_seconds` and `retry_on` (any of `failed`, `timed_out`, `worker_lost`). Missing keys take
DEFAULT_POLICY's values. What a retry does in the database is schedules/retries.py's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

OUTCOME_FAILED = "failed"
OUTCOME_TIMED_OUT = "timed_out"
OUTCOME_WORKER_LOST = "worker_lost"
RETRY_ON_CHOICES = (OUTCOME_FAILED, OUTCOME_TIMED_OUT, OUTCOME_WORKER_LOST)

MAX_ATTEMPTS_LIMIT = 100
# A day: a longer wait is a schedule, not a retry.
MAX_INTERVAL_LIMIT = 86400
MAX_COEFFICIENT = 100

DEFAULT_POLICY: dict[str, Any] = {
    "max_attempts": 1,
    "initial_interval_seconds": 10,
    "backoff_coefficient": 2.0,
    "max_interval_seconds": 600,
    "retry_on": list(RETRY_ON_CHOICES),
}

# How worker/ and runstate word the outcomes they write (worker/tasks.py, lifecycle.py, runstate.py).
_TIMED_OUT_PREFIX = "timed out after"
# A run a drained worker ended at WORKER_DRAIN_SECONDS (worker/drain.py) counts as worker_lost.
_WORKER_LOST_PREFIXES = ("worker lost", "worker drained")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def policy_errors(value: Any) -> dict[str, list[str]]:
    """What is wrong with a policy, by key ({} when valid): `{"max_attempts": ["..."]}`."""
    if not isinstance(value, Mapping):
        return {"non_field_errors": ["Expected a JSON object (or null for the job's policy)."]}
    errors: dict[str, list[str]] = {}
    for key in value.keys() - DEFAULT_POLICY.keys():
        errors[str(key)] = [f"Unknown key; expected any of {', '.join(DEFAULT_POLICY)}."]
    policy = {**DEFAULT_POLICY, **value}
    attempts = policy["max_attempts"]
    # JSON Schema's integer: 3.0 is one.
    whole = _number(attempts) and float(attempts).is_integer()
    if not whole or not 1 <= attempts <= MAX_ATTEMPTS_LIMIT:
        errors["max_attempts"] = [f"Must be an integer from 1 (no retry) to {MAX_ATTEMPTS_LIMIT}."]
    for key in ("initial_interval_seconds", "max_interval_seconds"):
        if not _number(policy[key]) or not 0 <= policy[key] <= MAX_INTERVAL_LIMIT:
            errors[key] = [f"Must be a number of seconds from 0 to {MAX_INTERVAL_LIMIT}."]
    coefficient = policy["backoff_coefficient"]
    if not _number(coefficient) or not 1 <= coefficient <= MAX_COEFFICIENT:
        errors["backoff_coefficient"] = [f"Must be a number from 1 (a fixed interval) to {MAX_COEFFICIENT}."]
    retry_on = policy["retry_on"]
    if (
        not isinstance(retry_on, list)
        or not all(isinstance(item, str) and item in RETRY_ON_CHOICES for item in retry_on)
        or len(set(retry_on)) != len(retry_on)
    ):
        errors["retry_on"] = [f"Must be a list of distinct values among {', '.join(RETRY_ON_CHOICES)}."]
    return errors


def policy_normalized(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A valid policy with every key (the defaults for those missing)."""
    policy = {**DEFAULT_POLICY, **(value or {})}
    policy["max_attempts"] = int(policy["max_attempts"])
    return policy


def effective_policy(job_policy: Mapping[str, Any] | None, schedule_policy: Mapping[str, Any] | None) -> dict:
    """The schedule's policy when it has one (null: the job's), with every key."""
    return policy_normalized(schedule_policy if schedule_policy is not None else job_policy)


def retry_delay(policy: Mapping[str, Any], attempt: int) -> float:
    """Seconds to wait after attempt `attempt` (1-based) failed before the next one starts:
    initial * coefficient ** (attempt - 1), capped at max_interval_seconds (the first wait too, should
    the cap be below initial_interval_seconds)."""
    initial = float(policy["initial_interval_seconds"])
    cap = float(policy["max_interval_seconds"])
    coefficient = float(policy["backoff_coefficient"])
    try:
        return min(initial * coefficient ** (attempt - 1), cap)
    except OverflowError:  # far past the cap
        return cap


def attempt_outcome(status: str, error_summary: str) -> str:
    """How an ended attempt counts for `retry_on`: timed_out (a time limit ended it), worker_lost
    (its worker or pool process died, seen by the reaper or the worker's parent, or a drained worker
    ended it), failed (any other
    failure); a run that did not fail keeps its status (succeeded, cancelled)."""
    if status != OUTCOME_FAILED:
        return status  # succeeded, cancelled: never retried
    if error_summary.startswith(_TIMED_OUT_PREFIX):
        return OUTCOME_TIMED_OUT
    if error_summary.startswith(_WORKER_LOST_PREFIXES):
        return OUTCOME_WORKER_LOST
    return OUTCOME_FAILED


def should_retry(policy: Mapping[str, Any], attempt: int, outcome: str) -> bool:
    """Whether attempt `attempt`, ended with `outcome`, gets another attempt."""
    return outcome in policy["retry_on"] and attempt < int(policy["max_attempts"])
