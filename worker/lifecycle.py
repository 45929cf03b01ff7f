"""The run lifecycle on a worker: take the caps, start (at most once), execute under a heartbeat, finish.

Every status write goes through schedules/runstate.py. This module is the worker's side of guarantees 5
and 7 (docs/ARCHITECTURE.md): caps before the start (worker/caps.py), liveness and fencing while the run
executes (worker/heartbeat.py), and nothing lost at the end: the outcome is kept in Redis
(schedules/runleases.py), then written with retries; a database still away after
`WORKER_FINISH_RETRY_SECONDS` leaves it to the reapers.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

from orchestrator.models import Run, RunStatus
from orchestrator.services import OrchestratorService, TaskFailed, TaskFence
from project.logging import bind_run
from schedules import runleases, runstate
from schedules.dispatch import message_for
from schedules.models import OverlapPolicy
from schedules.publishing import time_limits
from schedules.runstate import ERROR_SUMMARY_MAX, WORKER_LOST
from worker import ratelimit
from worker.caps import caps_for, lease_owner, park_message, release_and_wake, semaphore_take, waiter_id
from worker.heartbeat import Heartbeat
from worker.loading import earlier_slot_queued, load_delivery
from worker.semaphore import semaphore_forget_waiter

logger = logging.getLogger(__name__)

# Database errors worth waiting out (an outage, a lost connection), as opposed to bugs.
DATABASE_AWAY = (OperationalError, InterfaceError)


class CapReached(Exception):
    """A cap is full; the run waits as `throttled`. The message (shown in Flower) says which cap."""


def worker_identity(hostname: str, pid: int) -> str:
    """Who executes a run, `w1@host:4242`: the Celery node name and the pool process id, unique per
    delivery in flight, so the parent can tell which run a dead pool process was executing."""
    return f"{hostname}:{pid}"


@dataclass
class Outcome:
    """What the task should do with the message: return a result, retry later, or drop it."""

    status: str  # succeeded | failed | parked (waits in Redis) | throttled (retry later) | skipped
    run_id: int
    reason: str = ""
    countdown: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)
    # This delivery wrote the run's finish (False: not ours any more, or left in Redis for the reapers).
    written: bool = True

    def result(self) -> dict[str, Any]:
        # A succeeded run's (a failed one raises RunFailed). Small by design: counts only, never LLM text
        # (django-celery-results stores it).
        data: dict[str, Any] = {"run_id": self.run_id, "status": self.status}
        if self.counts:
            data["counts"] = self.counts
        return data


def _summary(exc: BaseException, started: float, soft_limit: float | None) -> str:
    """Why the run failed. Exception types only (and the orchestrator's own summary, which is built from
    types): messages may carry secrets or LLM text."""
    timed_out = soft_limit is not None and time.monotonic() - started >= soft_limit
    seen: BaseException | None = exc
    while seen is not None and not timed_out:
        timed_out = isinstance(seen, SoftTimeLimitExceeded)
        seen = seen.__cause__ or seen.__context__
    if timed_out:
        limit = f"{soft_limit:g}s" if soft_limit else "its time limit"
        return f"timed out after {limit} (Job.timeout_seconds; soft time limit)"
    return str(exc) if isinstance(exc, TaskFailed) else type(exc).__name__


def _counts(stats: dict[str, Any]) -> dict[str, Any]:
    """Numbers only, for the task result."""
    counts: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            counts[key] = value
        elif isinstance(value, dict):
            inner = _counts(value)
            if inner:
                counts[key] = inner
    return counts


def run_execute(
    *,
    run_id: int,
    scheduled_run_id: int | None,
    job_key: str,
    worker: str,
    task_id: str = "",
    soft_limit: float | None = None,
) -> Outcome:
    """Execute one delivery of a run message on this pool process.

    Database errors before the start propagate (the task retries the message); from the start on,
    the run always ends here or is left, recorded, to the reapers.
    """
    # The run (with its job and directive), its scheduled run (with its schedule) and the lease floor,
    # in one query.
    run, scheduled, floor = load_delivery(run_id, scheduled_run_id)
    if run is None:
        logger.warning("run message for an unknown run", extra={"run_id": run_id})
        return Outcome(status="skipped", run_id=run_id, reason="unknown run")
    if scheduled is None:
        scheduled_run_id = None
    # Every log line of this delivery names its run, job, task and schedule (project/logging.py).
    bind_run(run_id=run_id, job=job_key, task_id=task_id, schedule_id=scheduled and scheduled.schedule_id)
    caps = caps_for(run.job, scheduled.schedule if scheduled is not None else None)
    if run.status != RunStatus.QUEUED:
        logger.info("run already taken; message dropped", extra={"run_id": run_id, "status": run.status})
        try:
            semaphore_forget_waiter(caps, waiter=waiter_id(run_id))
            ratelimit.forget(run.job, waiter=waiter_id(run_id))
        except redis.RedisError:
            pass  # the waiter entry expires by itself
        return Outcome(status="skipped", run_id=run_id, reason=f"already {run.status}")
    if (
        scheduled is not None
        and scheduled.schedule.overlap_policy == OverlapPolicy.BUFFER_ALL
        and earlier_slot_queued(scheduled)
    ):
        # buffer_all runs its slots in slot order: one published with it (a catch-up) goes into line first.
        reason = "waiting: an earlier slot of the schedule goes first (overlap_policy buffer_all)"
        countdown = settings.WORKER_THROTTLE_BASE_SECONDS * random.uniform(0.5, 1.0)
        return Outcome(status="throttled", run_id=run_id, reason=reason, countdown=countdown)
    owner = lease_owner(run_id, worker)
    due = scheduled.scheduled_for if scheduled is not None else run.created_at
    park = park_message(
        message_for(run.job, run, scheduled),
        limits=time_limits(run.job.timeout_seconds),
        schedule_name=scheduled.schedule.name if scheduled is not None else None,
    )
    try:
        grant = semaphore_take(caps, owner=owner, run_id=run_id, due=due, park=park, floor=floor)
    except redis.RedisError as exc:
        reason = "waiting: concurrency caps unavailable (Redis unreachable)"
        logger.warning(reason, extra={"run_id": run_id, "error": type(exc).__name__})
        return Outcome(
            status="throttled",
            run_id=run_id,
            reason=reason,
            countdown=settings.WORKER_THROTTLE_MAX_SECONDS * random.uniform(0.5, 1.0),
        )
    if not grant.acquired:
        runstate.run_mark_throttled(run_id, scheduled_run_id, grant.reason)
        if grant.rebuild:
            # Not parked: Redis is being rebuilt from the database; ask again shortly (jittered).
            countdown = settings.WORKER_THROTTLE_BASE_SECONDS * random.uniform(0.5, 1.0)
            return Outcome(status="throttled", run_id=run_id, reason=grant.reason, countdown=countdown)
        logger.info("run parked", extra={"run_id": run_id, "job": job_key, "reason": grant.reason})
        ratelimit.forget(run.job, waiter=waiter_id(run_id))  # a cap holds it now, not the rate
        return Outcome(status="parked", run_id=run_id, reason=grant.reason)
    # Last before the start: a run that will not start gives its caps back, never a rate-limited start.
    member = f"{owner}#{run.attempt}"
    admission, fence = ratelimit.admit(run.job, member=member, waiter=waiter_id(run_id), due=due, park=park)
    if not admission.admitted:
        release_and_wake(caps, owner=owner, run_id=run_id)
        runstate.run_mark_throttled(run_id, scheduled_run_id, admission.reason)
        countdown = settings.WORKER_THROTTLE_MAX_SECONDS * random.uniform(0.5, 1.0)
        status = "throttled" if admission.unavailable else "parked"
        return Outcome(status=status, run_id=run_id, reason=admission.reason, countdown=countdown)

    try:
        attempt = run.attempt = runstate.run_start(
            run_id, scheduled_run_id, worker=worker, lease_seq=grant.seq, attempt=run.attempt
        )
    except BaseException:
        release_and_wake(caps, owner=owner, run_id=run_id)
        raise
    if attempt is None:
        release_and_wake(caps, owner=owner, run_id=run_id)
        logger.info("run already taken; message dropped", extra={"run_id": run_id})
        return Outcome(status="skipped", run_id=run_id, reason="already taken")

    logger.info("run started", extra={"run_id": run_id, "job": job_key, "attempt": attempt, "worker": worker})
    started = time.monotonic()
    heartbeat = Heartbeat(
        run_id=run_id, scheduled_run_id=scheduled_run_id, attempt=attempt, caps=caps, owner=owner, fence=fence
    )
    settled = False
    try:
        with heartbeat:
            status, summary, stats = _execute_started(run, fence, started, soft_limit)
            counts = _counts(stats or {})
            ended, settled = _settle(
                run_id=run_id,
                scheduled_run_id=scheduled_run_id,
                attempt=attempt,
                task_id=task_id,
                status=status,
                summary=summary,
                stats=stats,
            )
    finally:
        fence.settle()  # a rate-limited start no task process confirmed (it failed before) counts now
        # The outcome's copy in Redis goes with the leases once the finish was written (`settled`).
        release_and_wake(caps, owner=owner, run_id=run_id, settled=settled)
    if ended is False:
        # Reaped, cancelled or ended by someone else meanwhile: their outcome stands.
        logger.warning("run ended but was no longer ours", extra={"run_id": run_id})
        return Outcome(
            status="failed", run_id=run_id, reason=fence.reason or WORKER_LOST, counts=counts, written=False
        )
    seconds = round(time.monotonic() - started, 3)
    if status == RunStatus.SUCCEEDED:
        logger.info("run succeeded", extra={"run_id": run_id, "job": job_key, "seconds": seconds})
    else:
        logger.warning("run failed", extra={"run_id": run_id, "job": job_key, "error": summary})
    return Outcome(
        status=str(status),
        run_id=run_id,
        reason=summary,
        counts=counts,
        written=bool(ended),
    )


def _execute_started(
    run: Run, fence: TaskFence, started: float, soft_limit: float | None
) -> tuple[str, str, dict[str, Any] | None]:
    """Run the job; (status, error summary, stats). Raised outside the job itself too (a soft time
    limit landing in a database read, a lost connection), the run must still end."""
    try:
        # The row read before the start serves (with the started attempt): the job reads its directive,
        # scope, params and job from it; its counters are added in the database (F expressions).
        stats = OrchestratorService.execute(run, fence=fence)
    except Exception as exc:  # SystemExit and friends pass: the parent reports a lost worker
        summary = fence.reason or _summary(exc, started, soft_limit)
        return RunStatus.FAILED, summary, getattr(exc, "stats", None)
    return RunStatus.SUCCEEDED, "", stats if isinstance(stats, dict) else {}


def _sleep_through_soft_limit(seconds: float) -> None:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        pass  # the work is done; only the write is late


def _settle(
    *,
    run_id: int,
    scheduled_run_id: int | None,
    attempt: int,
    task_id: str,
    status: str,
    summary: str,
    stats: dict[str, Any] | None,
) -> tuple[bool | None, bool]:
    """Write the outcome: kept in Redis first, then written with retries while the heartbeat holds the
    leases. (True written, False not ours any more, None left to the reapers (the database stayed
    away); whether the copy this call kept in Redis is settled, for the release to remove it).
    """
    try:
        recorded = runleases.outcome_record(
            run_id=run_id,
            scheduled_run_id=scheduled_run_id,
            status=status,
            error_summary=summary,
            stats=stats,
            attempt=attempt,
            task_id=task_id,
        )
    except redis.RedisError:
        recorded = False
    # Without a copy in Redis the outcome exists only here: keep trying until the hard time limit.
    budget = float(settings.WORKER_FINISH_RETRY_SECONDS) if recorded else float("inf")
    retrying = Retrying(
        # The soft time limit can land in the statement: the work is done, only the write is late.
        retry=retry_if_exception_type((*DATABASE_AWAY, SoftTimeLimitExceeded)),
        wait=wait_exponential(multiplier=0.5, max=5.0),
        stop=stop_before_delay(budget),
        sleep=_sleep_through_soft_limit,
        after=lambda _state: connection.close(),
        before_sleep=lambda state: logger.warning(
            "finish write failed; retrying",
            extra={"run_id": run_id, "error": type(state.outcome.exception()).__name__},
        ),
    )
    try:
        ended = retrying(
            runstate.run_finish,
            run_id,
            scheduled_run_id,
            status=status,
            error_summary=summary,
            stats=stats,
            attempt=attempt,
        )
    except RetryError:
        logger.warning(
            "database away; outcome left in Redis for the reapers", extra={"run_id": run_id, "status": status}
        )
        return None, False
    if not ended and recorded:
        # A reaper may have written our own recorded outcome first (the database just came back).
        ended = Run.objects.filter(
            pk=run_id, attempt=attempt, status=status, error_summary=summary[:ERROR_SUMMARY_MAX]
        ).exists()
    # The copy in Redis is removed by the release that follows (one round trip); if that is lost, a
    # reaper finds the run ended and clears it.
    return ended, recorded
