"""The run lifecycle on a worker: take the caps, start (at most once), heartbeat, fence, finish.

Every status write goes through schedules/runstate.py (the one writer of run state, fenced by attempt).
What this module adds is the worker's side of the promises of DESIGN 6.5 and 6.7:

- liveness is the lease: the heartbeat renews the run's Redis leases (caps and liveness) every quarter
  lease whatever PostgreSQL does, so a run whose worker is alive is never reaped;
- fencing: a run the system gave up on stops executing before its slot can go to another run. The
  heartbeat kills the run's task process group when the database says the run is no longer ours, when
  a renewal finds the slot taken, and when Redis has been unreachable for `FENCE_AFTER` of a lease (the
  lease expires at a lease; the kill comes first);
- nothing lost: an outcome is kept in Redis (schedules/runleases.py) before it is written, and written
  with retries; a database still away after `WORKER_FINISH_RETRY_SECONDS` leaves it to the reapers,
  which write it when the database returns.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_before_delay, wait_exponential

from orchestrator.models import Job, Run, RunStatus
from orchestrator.services import OrchestratorService, TaskFence
from orchestrator.taskprocs import processes_of_run
from project.background import BackgroundQueue
from project.dbsession import set_connection_lock_timeout
from project.logging import bind_run
from schedules import runleases, runstate
from schedules.dispatch import message_for
from schedules.models import OverlapPolicy, Schedule, ScheduledRun
from schedules.publishing import RunMessage, send_messages, time_limits
from schedules.runstate import ERROR_SUMMARY_MAX, WORKER_LOST
from worker.loading import load_delivery
from worker.semaphore import (
    Cap,
    Grant,
    semaphore_acquire,
    semaphore_behind,
    semaphore_forget_waiter,
    semaphore_rebuild,
    semaphore_release,
    semaphore_renew,
    semaphore_sweep_parked,
)

logger = logging.getLogger(__name__)

__all__ = ["ERROR_SUMMARY_MAX", "WORKER_LOST"]

# A heartbeat that could not reach Redis for this share of a lease kills its run: the lease (and the slot)
# lapses at one lease, and the kill must land first. Renewals come every quarter lease.
FENCE_AFTER = 0.6
# Database errors worth waiting out (an outage, a lost connection), as opposed to bugs.
DATABASE_AWAY = (OperationalError, InterfaceError)


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


def rebuild_leases() -> int:
    """Put the database's running runs back into Redis's lease sets (after Redis lost lease state)."""
    floor = runstate.running_lease_floor()
    holders = []
    running = Run.objects.filter(status=RunStatus.RUNNING).select_related("job").order_by("id")
    schedules = {
        run_id: schedule
        for run_id, schedule in (
            (sr.run_id, sr.schedule)
            for sr in ScheduledRun.objects.select_related("schedule").filter(run__status=RunStatus.RUNNING)
        )
    }
    for run in running:
        holders.append((run.pk, lease_owner(run.pk, run.worker), caps_for(run.job, schedules.get(run.pk))))
    return semaphore_rebuild(holders, floor=floor)


def semaphore_take(
    caps: list[Cap], *, owner: str, run_id: int, due, park: str = "", floor: int | None = None
) -> Grant:
    """Acquire the run's caps (parking the run's message when one is full); a Redis behind the
    database is rebuilt first, then asked again. `floor`: runstate.running_lease_floor(), if the
    caller read it already (with the run)."""

    def acquire(floor: int | None) -> Grant:
        if floor is None:
            floor = runstate.running_lease_floor()
        return semaphore_acquire(
            caps, owner=owner, waiter=waiter_id(run_id), due=due, run_id=run_id, floor=floor, park=park
        )

    grant = acquire(floor)
    if grant.rebuild:
        rebuild_leases()
        grant = acquire(None)
    return grant


def _load(run_id: int, scheduled_run_id: int | None) -> tuple[Run | None, ScheduledRun | None, int]:
    """The run (with its job and directive), its scheduled run (with its schedule) and the lease floor,
    in one query: what a delivery needs before its start gate (worker/loading.py)."""
    return load_delivery(run_id, scheduled_run_id)


def park_message(
    message: RunMessage, *, limits: tuple[float | None, float | None], schedule_name: str | None
) -> str:
    """What a parked run keeps in Redis: its message, with the job's time limits and the schedule's name
    read by this delivery, so that its wake-up publishes without reading them again."""
    return json.dumps(
        {**asdict(message), "limits": list(limits), "schedule": schedule_name}, separators=(",", ":")
    )


def unpark_messages(
    messages: list[str],
) -> tuple[list[RunMessage], dict[str, tuple[float | None, float | None]] | None, dict[int, str] | None]:
    """The parked runs' messages, and the limits per job and names per scheduled run they carried: None
    for either when a message lacks it (parked by an older worker) or the messages of one job disagree
    (its limits were edited between two parkings), so that the publish reads the current values."""
    runs: list[RunMessage] = []
    limits: dict[str, tuple[float | None, float | None]] | None = {}
    names: dict[int, str] | None = {}
    for raw in messages:
        item = json.loads(raw)
        carried, name = item.pop("limits", None), item.pop("schedule", None)
        message = RunMessage(**item)
        runs.append(message)
        if limits is not None:
            pair = (carried[0], carried[1]) if isinstance(carried, list) and len(carried) == 2 else None
            if pair is None or limits.setdefault(message.job_key, pair) != pair:
                limits = None
        if names is not None and message.scheduled_run_id is not None:
            if isinstance(name, str):
                names[message.scheduled_run_id] = name
            else:
                names = None
    return runs, limits, names


def wake(messages: list[str]) -> int:
    """Publish the messages of parked runs a release (or the safety sweep) woke; return how many.

    A wake-up that cannot be published is not lost for good: the sweep wakes the run again once the
    woken mark expires (`semaphore.wake_ms`)."""
    if not messages:
        return 0
    try:
        runs, limits, names = unpark_messages(messages)
        send_messages(runs, limits=limits, names=names)
    except Exception as exc:
        logger.warning("wake-up publish failed", extra={"count": len(messages), "error": type(exc).__name__})
        return 0
    logger.info("parked runs woken", extra={"count": len(messages)})
    return len(messages)


def release_and_wake(caps: list[Cap], *, owner: str, run_id: int, settled: bool = False) -> None:
    """Give a run's leases back and wake the runs parked behind the slots it freed; `settled`: its
    outcome is written, and its copy in Redis goes too."""
    try:
        released = semaphore_release(caps, owner=owner, run_id=run_id, settled=settled)
    except redis.RedisError:
        logger.warning("lease release failed; it expires by itself", extra={"run_id": run_id})
        return
    wake(released.woken)


def wake_lost_waiters() -> int:
    """The maintenance tick's safety net: wake parked runs a lost wake-up left behind a free slot."""
    return wake(semaphore_sweep_parked())


def check_leases() -> bool:
    """Rebuild the lease sets if Redis lost lease state the database still counts; True if rebuilt."""
    if semaphore_behind(runstate.running_lease_floor()):
        rebuild_leases()
        return True
    return False


def throttle_countdown(grant: Grant) -> float:
    """Jittered backoff: the head of the line polls often, runs far behind it poll less."""
    base = settings.WORKER_THROTTLE_BASE_SECONDS
    cap = settings.WORKER_THROTTLE_MAX_SECONDS
    limit = grant.blocking.limit if grant.blocking is not None else 1
    delay = min(cap, base * (1 + grant.ahead / max(limit, 1)))
    if grant.rebuild:
        delay = base
    # Full jitter between half and all of the delay spreads retries so they do not arrive in waves.
    return delay * random.uniform(0.5, 1.0)


# --- outcome -------------------------------------------------------------------------------------------


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
        # Small by design: counts only, never LLM text (django-celery-results stores it).
        data: dict[str, Any] = {"run_id": self.run_id, "status": self.status}
        if self.reason:
            data["error"] = self.reason
        if self.counts:
            data["counts"] = self.counts
        return data


# --- heartbeat and fencing ---------------------------------------------------------------------------


class _BeatLoop:
    """One thread per process that beats every heartbeat registered with it, each on its own schedule.

    Started on first use (and again in a forked child, which inherits no threads): a run does not pay
    for starting and joining threads, only for two registrations. Each loop has its own thread and its
    own bookkeeping, so a beat blocked on one side (a cut database) never holds up the other's.
    """

    def __init__(
        self,
        name: str,
        beat: Callable[[Heartbeat], float | None],
        idle: Callable[[], None],
        *,
        wait_in_flight: bool,
    ):
        self.name = name
        self._beat = beat  # seconds until the next beat of that heartbeat, or None: no more
        self._idle = idle  # run by the loop's thread when nothing is registered
        # remove() waits for a beat of that heartbeat in progress (the lease loop: no renewal may land
        # after the release); the database loop's beat is harmless late and may block for long.
        self._wait_in_flight = wait_in_flight
        self._cond = threading.Condition()
        self._due: dict[Heartbeat, float] = {}
        self._current: Heartbeat | None = None
        self._pid = 0
        # Until when the thread sleeps (infinity: until woken), or -infinity while it is not asleep and
        # will look at `_due` again anyway: an addition due later than that needs no wake-up, which is
        # the rule for back-to-back runs (each due a quarter lease ahead), two thread switches per run.
        self._asleep_until = -math.inf

    def add(self, heartbeat: Heartbeat, delay: float) -> None:
        with self._cond:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                self._due = {}
                self._current = None
                self._asleep_until = -math.inf
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
            at = time.monotonic() + delay
            self._due[heartbeat] = at
            if at < self._asleep_until:
                self._cond.notify_all()

    def remove(self, heartbeat: Heartbeat) -> None:
        # No wake-up for the schedule: the thread finds the entry gone when its time comes.
        with self._cond:
            self._due.pop(heartbeat, None)
            while self._wait_in_flight and self._current is heartbeat:
                self._cond.wait()

    def _next(self) -> Heartbeat:
        with self._cond:
            while True:
                if not self._due:
                    self._cond.release()
                    try:
                        self._idle()
                    except Exception:
                        pass
                    finally:
                        self._cond.acquire()
                    if not self._due:
                        self._sleep(math.inf)
                    continue
                heartbeat, at = min(self._due.items(), key=lambda item: item[1])
                if at <= time.monotonic():
                    del self._due[heartbeat]
                    self._current = heartbeat
                    return heartbeat
                self._sleep(at)

    def _sleep(self, until: float) -> None:
        """Wait (holding the condition) until `until` on the monotonic clock, or a wake-up."""
        self._asleep_until = until
        try:
            self._cond.wait(None if until == math.inf else max(until - time.monotonic(), 0.0))
        finally:
            self._asleep_until = -math.inf

    def _run(self) -> None:
        while True:
            heartbeat = self._next()
            delay = None
            try:
                if heartbeat.active:
                    delay = self._beat(heartbeat)
            except Exception:
                logger.exception("heartbeat failed", extra={"run_id": heartbeat.run_id})
                delay = heartbeat.lease / 8
            finally:
                with self._cond:
                    self._current = None
                    if delay is not None and heartbeat.active:
                        self._due[heartbeat] = time.monotonic() + delay
                    self._cond.notify_all()


def _lease_beat(heartbeat: Heartbeat) -> float | None:
    heartbeat.renew()
    if heartbeat.fence.reason:
        return None
    # Check again sooner while renewals fail: the deadline must be seen before the lease lapses.
    failing = time.monotonic() - heartbeat.last_renewed > heartbeat.lease / 4
    return heartbeat.lease / (8 if failing else 4)


def _db_beat(heartbeat: Heartbeat) -> float | None:
    try:
        alive = runstate.run_heartbeat(heartbeat.run_id, heartbeat.scheduled_run_id, heartbeat.attempt)
    except DatabaseError as exc:
        # Written again at the next beat once the database is back; the lease decides.
        logger.warning(
            "heartbeat write failed", extra={"run_id": heartbeat.run_id, "error": type(exc).__name__}
        )
        connection.close()
        return heartbeat.lease / 4
    if not alive:
        # A beat still in flight when its run ended (the database loop is not waited for) finds the
        # run finished: that is no fencing.
        if heartbeat.active:
            heartbeat.stop_run("stopped: the run is no longer ours (reaped, cancelled or ended)")
        return None
    return heartbeat.lease / 4


def _close_db_thread_connection() -> None:
    connection.close()  # the database loop's own connection, between runs long enough to beat


_lease_loop = _BeatLoop("run-leases", _lease_beat, lambda: None, wait_in_flight=True)
_db_loop = _BeatLoop("run-heartbeats", _db_beat, _close_db_thread_connection, wait_in_flight=False)


class Heartbeat:
    """While a run executes: renew its Redis leases every quarter lease, stamp heartbeat_at, and fence.

    Two loops, each on its own thread, so that neither side can delay the other: the lease loop talks to
    Redis only (a PostgreSQL outage, or a connect hanging on a blackholed database, must not let the
    leases lapse), the database loop stamps `heartbeat_at` and learns whether the run is still ours.
    The threads are the process's (`_BeatLoop`), not the run's; leaving the `with` block waits for a
    renewal of this run in progress, so that none re-takes a lease after the run released it.
    """

    def __init__(
        self,
        *,
        run_id: int,
        scheduled_run_id: int | None,
        attempt: int,
        caps: list[Cap],
        owner: str,
        fence: TaskFence,
    ):
        self.run_id = run_id
        self.scheduled_run_id = scheduled_run_id
        self.attempt = attempt
        self.caps = caps
        self.owner = owner
        self.fence = fence
        self.last_renewed = time.monotonic()  # the grant itself was a renewal
        self.active = False

    def __enter__(self) -> Heartbeat:
        self.active = True
        _lease_loop.add(self, self.lease / 4)
        _db_loop.add(self, self.lease / 4)
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        _lease_loop.remove(self)  # waits for a renewal in progress: none lands after the release
        _db_loop.remove(self)

    @property
    def lease(self) -> float:
        return float(settings.WORKER_LEASE_SECONDS)

    def renew(self) -> None:
        sent = time.monotonic()
        try:
            renewal = semaphore_renew(self.caps, owner=self.owner, run_id=self.run_id)
        except redis.RedisError as exc:
            silent = time.monotonic() - self.last_renewed
            logger.warning(
                "lease renewal failed",
                extra={"run_id": self.run_id, "error": type(exc).__name__, "silent_s": round(silent, 1)},
            )
            if silent >= FENCE_AFTER * self.lease:
                self.stop_run(f"lease lost: Redis unreachable for {silent:.0f}s")
            return
        if renewal.lost is not None:
            self.stop_run(f"lease lost: {renewal.lost.label} slot taken by another run")
            return
        self.last_renewed = sent
        if renewal.reasserted:
            logger.warning(
                "leases re-asserted after loss", extra={"run_id": self.run_id, "count": renewal.reasserted}
            )

    def stop_run(self, reason: str) -> None:
        """Kill the run's task processes, then let its slots go: in that order (DESIGN 6.5)."""
        if self.fence.reason:
            return
        logger.warning("run fenced: task processes killed", extra={"run_id": self.run_id, "reason": reason})
        self.fence.kill(reason)
        release_and_wake(self.caps, owner=self.owner, run_id=self.run_id)


# --- executing one delivery ----------------------------------------------------------------------------


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


def _summary(exc: BaseException, started: float, soft_limit: float | None) -> str:
    if _timed_out(exc, started, soft_limit):
        limit = f"{soft_limit:g}s" if soft_limit else "its time limit"
        return f"timed out after {limit} (Job.timeout_seconds; soft time limit)"
    return _failure_summary(exc)


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
    run, scheduled, floor = _load(run_id, scheduled_run_id)
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
        except redis.RedisError:
            pass  # the waiter entry expires by itself
        return Outcome(status="skipped", run_id=run_id, reason=f"already {run.status}")
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
            # Not parked: Redis is being rebuilt from the database; ask again shortly.
            return Outcome(
                status="throttled", run_id=run_id, reason=grant.reason, countdown=throttle_countdown(grant)
            )
        logger.info("run parked", extra={"run_id": run_id, "job": job_key, "reason": grant.reason})
        return Outcome(status="parked", run_id=run_id, reason=grant.reason)

    try:
        attempt = runstate.run_start(
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
    fence = TaskFence()
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
        # The row read before the start serves: the job reads the directive, scope and job from it,
        # and the counters it reports are added in the database (F expressions).
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


# --- the worker's parent process ---------------------------------------------------------------------


class ParentWriter(BackgroundQueue):
    """The worker parent's writes, off its event loop: a write blocked on a row lock or a database away
    must not stall the process that hands out messages and enforces time limits.

    Each job is retried with backoff; the outcome it writes is recorded in Redis first, so one the
    parent never gets to write is written by a reaper.
    """

    thread_name = "worker-parent-writer"

    def handle(self, job) -> None:
        self._run(job)

    @staticmethod
    def _run(job) -> None:
        def attempt() -> None:
            # This thread's own connection. Wait a little for a lock, then retry later: one row lock
            # must not hold up the writes queued behind it. (Not a bare session SET: behind PgBouncer
            # it would stay on a server connection other clients then borrow.)
            set_connection_lock_timeout(connection, 2000)
            job()

        retrying = Retrying(
            wait=wait_exponential(multiplier=0.5, max=10.0),
            stop=stop_before_delay(float(settings.WORKER_PARENT_WRITE_RETRY_SECONDS)),
            after=lambda _state: connection.close(),
            before_sleep=lambda state: logger.warning(
                "parent write failed; retrying", extra={"error": type(state.outcome.exception()).__name__}
            ),
        )
        try:
            retrying(attempt)
        except RetryError as exc:
            error = type(exc.last_attempt.exception()).__name__
            logger.error("parent write abandoned", extra={"error": error})


parent_writer = ParentWriter()


# How long the parent's writer waits for a killed pool process and its task processes to be gone before
# it frees their slots anyway (the template kills the task groups when its pool process dies).
PARENT_KILL_WAIT_SECONDS = 5.0


def _wait_gone(pool_pid: int | None, run_id: int, *, timeout: float = PARENT_KILL_WAIT_SECONDS) -> bool:
    """Wait until the pool process and every process of the run are gone from /proc (True), or timeout.

    Celery calls the hard-limit callback before it kills the pool process, and a dead pool process's
    task processes outlive it by a few ms: the slot is freed only after both (DESIGN 6.5).
    """
    deadline = time.monotonic() + timeout
    while True:
        pool_alive = pool_pid is not None and _alive(pool_pid)
        if not pool_alive and not processes_of_run(run_id):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def run_end_from_parent(
    *,
    run_id: int,
    worker: str,
    reason: str,
    task_id: str = "",
    overrule: bool = False,
    pool_pid: int | None = None,
) -> None:
    """End the run a pool process was executing when it died or hit the hard time limit.

    Fenced by `worker` (node name + the pool process id): only the delivery that process started is
    ended, never a run another process took; if that process had already recorded its own outcome (it
    finished, and was killed while writing it), that outcome is written instead, unless `overrule`
    (the hard time limit: the run overran, whatever it had recorded). The write happens on the
    parent's writer thread; its leases are released there.
    """
    try:
        runleases.outcome_record(
            run_id=run_id,
            scheduled_run_id=None,
            status=RunStatus.FAILED,
            error_summary=reason,
            stats=None,
            worker=worker,
            task_id=task_id,
            replace=overrule,
        )
        recorded = True
    except redis.RedisError:
        recorded = False

    def write() -> None:
        if recorded:
            ended = bool(runstate.apply_pending_outcomes([run_id]))
        else:
            ended = runstate.run_finish(
                run_id, None, status=RunStatus.FAILED, error_summary=reason, worker=worker
            )
        try:
            caps = caps_for_run(run_id)
        except Run.DoesNotExist:
            caps = []
        if not _wait_gone(pool_pid, run_id):
            logger.warning("run's processes still alive; slot freed anyway", extra={"run_id": run_id})
        release_and_wake(caps, owner=lease_owner(run_id, worker), run_id=run_id)
        if ended:
            logger.warning("run ended by the worker's parent", extra={"run_id": run_id, "reason": reason})

    parent_writer.submit(write)


def time_limits_of(timelimit: Any) -> tuple[float | None, float | None]:
    """(hard, soft) from a request's `timelimit` (set at publish from Job.timeout_seconds)."""
    if isinstance(timelimit, list | tuple) and len(timelimit) == 2:
        hard, soft = timelimit
        return (float(hard) if hard else None, float(soft) if soft else None)
    return (None, None)


def database_retry_countdown() -> float:
    return settings.WORKER_THROTTLE_MAX_SECONDS * random.uniform(0.1, 0.3)
