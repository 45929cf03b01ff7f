"""The run lifecycle on a worker: take the caps, start (at most once), heartbeat, finish.

Status writes are conditional UPDATEs, so the database decides every race:
- start: `queued`/`throttled` -> `running` with `attempt = attempt + 1`; a second delivery of the same
  message finds zero rows and does nothing (at most once);
- every later write (heartbeat, finish) is fenced by `status = running AND attempt = <ours>`, so a stale
  worker (frozen, then reaped, then awake again) can never overwrite a newer outcome.
Times come from the database clock (`now()`), the same clock the reaper compares heartbeats against.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.db.models.functions import Now

from orchestrator.models import Job, Run, RunStatus
from orchestrator.services import OrchestratorService
from schedules.models import OverlapPolicy, Schedule, ScheduledRun, ScheduledRunStatus
from worker.semaphore import (
    Cap,
    Grant,
    semaphore_acquire,
    semaphore_forget_waiter,
    semaphore_release,
    semaphore_renew,
)

logger = logging.getLogger(__name__)

ERROR_SUMMARY_MAX = 500
WORKER_LOST = "worker lost"
_WAITING = (ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED)


class WorkerError(Exception):
    """Base for the worker's domain errors."""


class CapReached(WorkerError):
    """A cap is full; the run waits as `throttled`. The message (shown in Flower) says which cap."""


# --- identities --------------------------------------------------------------------------------------


def worker_identity(hostname: str, pid: int) -> str:
    """Who executes a run: the Celery node name and the pool process id (`w1@host:4242`).

    The pid makes it unique per delivery in flight, so the parent process can tell which run a dead
    pool child was executing.
    """
    return f"{hostname}:{pid}"


def lease_owner(run_id: int, worker: str) -> str:
    """The semaphore lease owner of one delivery; computable from the Run row after the start."""
    return f"run:{run_id}@{worker}"


def waiter_id(run_id: int) -> str:
    # Stable across deliveries and retries: the run keeps its place in line whoever polls for it.
    return f"run:{run_id}"


# --- caps ----------------------------------------------------------------------------------------------


def caps_for(job: Job, schedule: Schedule | None) -> list[Cap]:
    """The caps a run takes, narrow to wide: per schedule, per job, then global.

    Limits: one at a time per schedule unless its `overlap_policy` is `allow` (DESIGN 6.6: with
    `buffer_one` the waiting run starts only once the one before it ends); the schedule's
    `max_per_job` / `max_global`, else `Job.max_concurrency` (per job), else `SCHEDULER_MAX_GLOBAL`
    (global). A limit of None means no such cap.
    """
    per_job = schedule.max_per_job if schedule is not None and schedule.max_per_job else job.max_concurrency
    global_ = (
        schedule.max_global
        if schedule is not None and schedule.max_global
        else getattr(settings, "SCHEDULER_MAX_GLOBAL", None)
    )
    caps = []
    if schedule is not None and schedule.overlap_policy != OverlapPolicy.ALLOW:
        caps.append(
            Cap(
                scope=f"schedule:{schedule.pk}",
                limit=1,
                label=f"previous run of the schedule (overlap_policy {schedule.overlap_policy})",
                subject=schedule.name,
            )
        )
    if per_job:
        caps.append(Cap(scope=f"job:{job.key}", limit=int(per_job), label="per-job cap", subject=job.key))
    if global_:
        caps.append(Cap(scope="global", limit=int(global_), label="global cap"))
    return caps


def caps_for_run(run_id: int) -> list[Cap]:
    run = Run.objects.select_related("job").get(pk=run_id)
    scheduled = ScheduledRun.objects.select_related("schedule").filter(run_id=run_id).order_by("-id").first()
    return caps_for(run.job, scheduled.schedule if scheduled is not None else None)


def throttle_countdown(grant: Grant) -> float:
    """Jittered backoff: the head of the line polls often, runs far behind it poll less."""
    base = settings.WORKER_THROTTLE_BASE_SECONDS
    cap = settings.WORKER_THROTTLE_MAX_SECONDS
    if grant.warming_up_ms:
        return max(base, grant.warming_up_ms / 1000) * random.uniform(1.0, 1.5)
    limit = grant.blocking.limit if grant.blocking is not None else 1
    delay = min(cap, base * (1 + grant.ahead / max(limit, 1)))
    # Full jitter between half and all of the delay spreads retries so they do not arrive in waves.
    return delay * random.uniform(0.5, 1.0)


# --- outcome -------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the task should do with the message: return a result, retry later, or drop it."""

    status: str  # succeeded | failed | throttled | skipped
    run_id: int
    reason: str = ""
    countdown: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        # Small by design: counts only, never LLM text (django-celery-results stores it).
        data: dict[str, Any] = {"run_id": self.run_id, "status": self.status}
        if self.reason:
            data["error"] = self.reason
        if self.counts:
            data["counts"] = self.counts
        return data


# --- lifecycle -----------------------------------------------------------------------------------------


def run_mark_throttled(run_id: int, scheduled_run_id: int | None, reason: str) -> None:
    """Record why the run waits. `published_at` moves too: the retry is a fresh publish, so the outbox
    sweep does not take a waiting run for a lost message."""
    reason = reason[:ERROR_SUMMARY_MAX]
    Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(error_summary=reason, published_at=Now())
    if scheduled_run_id is not None:
        ScheduledRun.objects.filter(pk=scheduled_run_id, status__in=_WAITING).update(
            status=ScheduledRunStatus.THROTTLED, error_summary=reason, published_at=Now()
        )


def run_start(run_id: int, scheduled_run_id: int | None, worker: str) -> int | None:
    """The at-most-once gate. Returns the new attempt, or None when the run is not ours to start."""
    with transaction.atomic():
        taken = Run.objects.filter(pk=run_id, status=RunStatus.QUEUED).update(
            status=RunStatus.RUNNING,
            attempt=F("attempt") + 1,
            started_at=Now(),
            heartbeat_at=Now(),
            finished_at=None,
            worker=worker,
            error_summary="",
        )
        if not taken:
            return None
        if scheduled_run_id is not None:
            mirrored = ScheduledRun.objects.filter(pk=scheduled_run_id, status__in=_WAITING).update(
                status=ScheduledRunStatus.RUNNING,
                started_at=Now(),
                heartbeat_at=Now(),
                finished_at=None,
                worker=worker,
                error_summary="",
            )
            if not mirrored:
                # The slot was settled elsewhere (skipped, failed): do not run it behind its back.
                transaction.set_rollback(True)
                return None
        return Run.objects.values_list("attempt", flat=True).get(pk=run_id)


def run_heartbeat(run_id: int, scheduled_run_id: int | None, attempt: int) -> bool:
    """Stamp heartbeat_at; False when the run is no longer ours (reaped, or finished elsewhere)."""
    with transaction.atomic():
        alive = Run.objects.filter(pk=run_id, status=RunStatus.RUNNING, attempt=attempt).update(
            heartbeat_at=Now()
        )
        if alive and scheduled_run_id is not None:
            ScheduledRun.objects.filter(pk=scheduled_run_id, status=ScheduledRunStatus.RUNNING).update(
                heartbeat_at=Now()
            )
    return bool(alive)


def run_finish(
    run_id: int,
    scheduled_run_id: int | None,
    *,
    status: str,
    error_summary: str = "",
    stats: dict[str, Any] | None = None,
    attempt: int | None = None,
    worker: str | None = None,
) -> bool:
    """End a running run (fenced by attempt, or by worker for the parent process); mirror it."""
    error_summary = error_summary[:ERROR_SUMMARY_MAX]
    fields: dict[str, Any] = {"status": status, "finished_at": Now(), "error_summary": error_summary}
    if stats is not None:
        fields["stats"] = stats
        for counter in ("llm_calls", "llm_prompt_tokens", "llm_completion_tokens"):
            if isinstance(stats.get(counter), int):
                fields[counter] = stats[counter]
    fence: dict[str, Any] = {"pk": run_id, "status": RunStatus.RUNNING}
    if attempt is not None:
        fence["attempt"] = attempt
    if worker is not None:
        fence["worker"] = worker
    with transaction.atomic():
        ended = Run.objects.filter(**fence).update(**fields)
        if ended:
            scheduled = ScheduledRun.objects.filter(status=ScheduledRunStatus.RUNNING)
            scheduled = (
                scheduled.filter(pk=scheduled_run_id)
                if scheduled_run_id is not None
                else scheduled.filter(run_id=run_id)
            )
            scheduled.update(status=status, finished_at=Now(), error_summary=error_summary)
    return bool(ended)


class Heartbeat:
    """While a run executes: stamp heartbeat_at and renew its leases every quarter lease.

    The database check comes first and decides: if the run is no longer ours, stop renewing and let the
    leases go (the reaper or another outcome owns it now). If it is ours and Redis lost the leases (a
    restart), put them back so the caps count this run again. If the database cannot be reached, the run
    is still executing here: the leases are renewed all the same, or a PostgreSQL outage longer than a
    lease would free this run's slots for others while it goes on running (found by scripts/soak.py).
    """

    def __init__(
        self, *, run_id: int, scheduled_run_id: int | None, attempt: int, caps: list[Cap], owner: str
    ):
        self.run_id = run_id
        self.scheduled_run_id = scheduled_run_id
        self.attempt = attempt
        self.caps = caps
        self.owner = owner
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        interval = settings.WORKER_LEASE_SECONDS / 4
        try:
            while not self._stop.wait(interval):
                self.beat()
                if self.lost:
                    return
        finally:
            connection.close()  # this thread's own connection

    def beat(self) -> None:
        try:
            alive = run_heartbeat(self.run_id, self.scheduled_run_id, self.attempt)
        except Exception as exc:
            logger.warning(
                "heartbeat write failed", extra={"run_id": self.run_id, "error": type(exc).__name__}
            )
            connection.close()
            alive = None  # unknown, and still executing in this process: keep the leases
        if alive is False:
            self.lost = True
            logger.warning("run no longer ours; stopping heartbeat", extra={"run_id": self.run_id})
            self._release()
            return
        try:
            _, reasserted = semaphore_renew(self.caps, owner=self.owner, reassert=True)
        except redis.RedisError as exc:
            logger.warning("lease renewal failed", extra={"run_id": self.run_id, "error": type(exc).__name__})
            return
        if reasserted:
            logger.warning(
                "leases re-asserted after loss", extra={"run_id": self.run_id, "count": reasserted}
            )

    def _release(self) -> None:
        try:
            semaphore_release(self.caps, owner=self.owner)
        except redis.RedisError:
            pass  # they expire within one lease TTL anyway


def _timed_out(exc: BaseException, started: float, soft_limit: float | None) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SoftTimeLimitExceeded):
            return True
        seen = seen.__cause__ or seen.__context__
    return soft_limit is not None and time.monotonic() - started >= soft_limit


def _failure_summary(exc: BaseException) -> str:
    # Exception types only (and the orchestrator's own summary, which is built from types): messages
    # may carry secrets or LLM text.
    from orchestrator.services import TaskFailed

    if isinstance(exc, TaskFailed):
        return str(exc)
    return type(exc).__name__


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
    *, run_id: int, scheduled_run_id: int | None, job_key: str, worker: str, soft_limit: float | None = None
) -> Outcome:
    """Execute one delivery of a run message on this pool process."""
    run = Run.objects.select_related("job", "directive").filter(pk=run_id).first()
    if run is None:
        logger.warning("run message for an unknown run", extra={"run_id": run_id})
        return Outcome(status="skipped", run_id=run_id, reason="unknown run")
    scheduled = None
    if scheduled_run_id is not None:
        scheduled = ScheduledRun.objects.select_related("schedule").filter(pk=scheduled_run_id).first()
        if scheduled is None:
            scheduled_run_id = None
    caps = caps_for(run.job, scheduled.schedule if scheduled is not None else None)
    if run.status != RunStatus.QUEUED:
        logger.info("run already taken; message dropped", extra={"run_id": run_id, "status": run.status})
        try:
            semaphore_forget_waiter(caps, waiter=waiter_id(run_id))
        except redis.RedisError:
            pass  # the waiter entry expires by itself
        return Outcome(status="skipped", run_id=run_id, reason=f"already {run.status}")
    owner = lease_owner(run_id, worker)
    due = scheduled.scheduled_for if scheduled is not None else run.created_at
    try:
        grant = semaphore_acquire(caps, owner=owner, waiter=waiter_id(run_id), due=due)
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
        run_mark_throttled(run_id, scheduled_run_id, grant.reason)
        logger.info("run throttled", extra={"run_id": run_id, "job": job_key, "reason": grant.reason})
        return Outcome(
            status="throttled", run_id=run_id, reason=grant.reason, countdown=throttle_countdown(grant)
        )

    attempt = run_start(run_id, scheduled_run_id, worker)
    if attempt is None:
        semaphore_release(caps, owner=owner)
        logger.info("run already taken; message dropped", extra={"run_id": run_id})
        return Outcome(status="skipped", run_id=run_id, reason="already taken")

    logger.info("run started", extra={"run_id": run_id, "job": job_key, "attempt": attempt, "worker": worker})
    started = time.monotonic()
    try:
        return _execute_started(run, scheduled_run_id, job_key, attempt, caps, owner, started, soft_limit)
    except Exception as exc:
        # Raised outside the job itself (a soft time limit landing in a database write, a lost
        # connection): the run must still end. The finish is fenced, so an outcome already written stands.
        summary = _summary(exc, started, soft_limit)
        run_finish(run_id, scheduled_run_id, status=RunStatus.FAILED, error_summary=summary, attempt=attempt)
        logger.warning("run failed", extra={"run_id": run_id, "job": job_key, "error": summary})
        return Outcome(status="failed", run_id=run_id, reason=summary)
    finally:
        try:
            semaphore_release(caps, owner=owner)
        except redis.RedisError:
            logger.warning("lease release failed; it expires by itself", extra={"run_id": run_id})


def _summary(exc: BaseException, started: float, soft_limit: float | None) -> str:
    if _timed_out(exc, started, soft_limit):
        limit = f"{soft_limit:g}s" if soft_limit else "its time limit"
        return f"timed out after {limit} (Job.timeout_seconds)"
    return _failure_summary(exc)


def _execute_started(
    run: Run,
    scheduled_run_id: int | None,
    job_key: str,
    attempt: int,
    caps: list[Cap],
    owner: str,
    started: float,
    soft_limit: float | None,
) -> Outcome:
    run_id = run.pk
    run.refresh_from_db()
    heartbeat = Heartbeat(
        run_id=run_id, scheduled_run_id=scheduled_run_id, attempt=attempt, caps=caps, owner=owner
    )
    with heartbeat:
        try:
            stats = OrchestratorService.execute(run)
        except Exception as exc:  # SystemExit and friends pass: the parent reports a lost worker
            summary = _summary(exc, started, soft_limit)
            run_finish(
                run_id,
                scheduled_run_id,
                status=RunStatus.FAILED,
                error_summary=summary,
                stats=getattr(exc, "stats", None),
                attempt=attempt,
            )
            logger.warning("run failed", extra={"run_id": run_id, "job": job_key, "error": summary})
            return Outcome(status="failed", run_id=run_id, reason=summary)
    stats = stats if isinstance(stats, dict) else {}
    ended = run_finish(run_id, scheduled_run_id, status=RunStatus.SUCCEEDED, stats=stats, attempt=attempt)
    if not ended:
        # Reaped or ended by someone else meanwhile: their outcome stands.
        logger.warning("run finished but was no longer ours", extra={"run_id": run_id})
        return Outcome(status="failed", run_id=run_id, reason=WORKER_LOST, counts=_counts(stats))
    seconds = round(time.monotonic() - started, 3)
    logger.info("run succeeded", extra={"run_id": run_id, "job": job_key, "seconds": seconds})
    return Outcome(status="succeeded", run_id=run_id, counts=_counts(stats))


# --- the worker's parent process ---------------------------------------------------------------------


def run_end_from_parent(*, run_id: int, worker: str, reason: str) -> bool:
    """End the run a pool child was executing when it died or hit the hard time limit.

    Fenced by `worker` (node name + the child's pid): only the delivery that child started is ended, never
    a run another process took. Its leases are released at once instead of waiting for them to expire.
    """
    ended = run_finish(run_id, None, status=RunStatus.FAILED, error_summary=reason, worker=worker)
    try:
        semaphore_release(caps_for_run(run_id), owner=lease_owner(run_id, worker))
    except (redis.RedisError, Run.DoesNotExist):
        pass
    if ended:
        logger.warning("run ended by the worker's parent", extra={"run_id": run_id, "reason": reason})
    return ended


_limits_lock = threading.Lock()
_limits_cache: dict[str, tuple[float, int | None]] = {}
_LIMITS_TTL = 30.0


def job_soft_limit(job_key: str) -> int | None:
    """Job.timeout_seconds, cached briefly: the parent consults it for every message it hands out."""
    now = time.monotonic()
    with _limits_lock:
        cached = _limits_cache.get(job_key)
        if cached is not None and now - cached[0] < _LIMITS_TTL:
            return cached[1]
    timeout = Job.objects.filter(key=job_key).values_list("timeout_seconds", flat=True).first()
    with _limits_lock:
        _limits_cache[job_key] = (now, timeout)
    return timeout


def job_time_limits(job_key: str) -> tuple[float | None, float | None]:
    """(hard, soft) limits for a run of this job, Celery's order."""
    soft = job_soft_limit(job_key) if job_key else None
    if not soft:
        return (None, None)
    return (float(soft + settings.WORKER_HARD_LIMIT_GRACE_SECONDS), float(soft))
