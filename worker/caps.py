"""Caps and parking: which caps a run takes, taking them, and waking the runs parked behind a full one.

The lease sets themselves live in Redis (worker/semaphore.py); this module decides what a run asks for
(docs/ARCHITECTURE.md, guarantee 6), rebuilds Redis's view from the database when Redis lost it, and
publishes the messages of parked runs again when a slot frees.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict

import redis
from django.conf import settings

from orchestrator.models import Job, Run, RunStatus
from schedules import runstate
from schedules.models import OverlapPolicy, Schedule, ScheduledRun
from schedules.publishing import RunMessage, send_messages
from worker.semaphore import (
    GLOBAL_SCOPE,
    Cap,
    Grant,
    job_scope,
    schedule_scope,
    semaphore_acquire,
    semaphore_rebuild,
    semaphore_release,
    semaphore_sweep_parked,
)

logger = logging.getLogger(__name__)


def lease_owner(run_id: int, worker: str) -> str:
    """The semaphore lease owner of one delivery; computable from the Run row after the start."""
    return f"run:{run_id}@{worker}"


def waiter_id(run_id: int) -> str:
    # Stable across deliveries and retries: the run keeps its place in line whoever polls for it.
    return f"run:{run_id}"


def caps_for(job: Job, schedule: Schedule | None) -> list[Cap]:
    """The caps a run takes, narrow to wide: per schedule, per job, then global.

    Limits: one at a time per schedule unless its `overlap_policy` is `allow` (guarantee 6: with
    `buffer_one` the waiting run starts only once the one before it ends); the schedule's
    `max_per_job` / `max_global`, else `Job.max_concurrency` (per job), else `SCHEDULER_MAX_GLOBAL`
    (global). A limit of None means no such cap.
    """
    per_job = (schedule and schedule.max_per_job) or job.max_concurrency
    global_ = (schedule and schedule.max_global) or getattr(settings, "SCHEDULER_MAX_GLOBAL", None)
    caps = []
    if schedule is not None and schedule.overlap_policy != OverlapPolicy.ALLOW:
        caps.append(
            Cap(
                scope=schedule_scope(schedule.pk),
                limit=1,
                label=f"previous run of the schedule (overlap_policy {schedule.overlap_policy})",
                subject=schedule.name,
            )
        )
    if per_job:
        caps.append(Cap(scope=job_scope(job.key), limit=int(per_job), label="per-job cap", subject=job.key))
    if global_:
        caps.append(Cap(scope=GLOBAL_SCOPE, limit=int(global_), label="global cap"))
    return caps


def caps_for_run(run_id: int) -> list[Cap]:
    run = Run.objects.select_related("job").get(pk=run_id)
    scheduled = ScheduledRun.objects.select_related("schedule").filter(run_id=run_id).order_by("-id").first()
    return caps_for(run.job, scheduled.schedule if scheduled is not None else None)


def rebuild_leases() -> int:
    """Put the database's running runs back into Redis's lease sets (after Redis lost lease state);
    return the lease floor they were rebuilt to."""
    floor = runstate.running_lease_floor()
    running = ScheduledRun.objects.select_related("schedule").filter(run__status=RunStatus.RUNNING)
    schedules = {sr.run_id: sr.schedule for sr in running}
    holders = [
        (run.pk, lease_owner(run.pk, run.worker), caps_for(run.job, schedules.get(run.pk)))
        for run in Run.objects.filter(status=RunStatus.RUNNING).select_related("job").order_by("id")
    ]
    semaphore_rebuild(holders, floor=floor)
    return floor


def semaphore_take(caps: list[Cap], *, owner: str, run_id: int, due, park: str, floor: int) -> Grant:
    """Acquire the run's caps (parking the run's message when one is full); a Redis behind the
    database is rebuilt first, then asked again. `floor`: runstate.running_lease_floor()."""
    acquire = functools.partial(
        semaphore_acquire, caps, owner=owner, waiter=waiter_id(run_id), due=due, run_id=run_id, park=park
    )
    grant = acquire(floor=floor)
    if grant.rebuild:
        grant = acquire(floor=rebuild_leases())
    return grant


def park_message(
    message: RunMessage, *, limits: tuple[float | None, float | None], schedule_name: str | None
) -> str:
    """What a parked run keeps in Redis: its message, with the job's time limits and the schedule's name
    read by this delivery, so that its wake-up publishes without reading them again."""
    return json.dumps(
        {**asdict(message), "limits": list(limits), "schedule": schedule_name}, separators=(",", ":")
    )


def wake(messages: list[str], *, countdown: float | None = None) -> int:
    """Publish the messages of parked runs a release (or the safety sweep) woke; return how many.
    `countdown`: not before so many seconds (a rate limit's next start, worker/ratelimit.py).

    A wake-up that cannot be published is not lost for good: the sweep wakes the run again once the
    woken mark expires (`semaphore.wake_ms`)."""
    if not messages:
        return 0
    runs, limits, names = [], {}, {}
    # Read the current limits instead when a message carries none (parked by an older worker) or two
    # of one job disagree (its limits were edited between two parkings); a name it lacks is read too.
    stale = False
    try:
        for raw in messages:
            item = json.loads(raw)
            carried, name = item.pop("limits", None), item.pop("schedule", None)
            run = RunMessage(**item)
            runs.append(run)
            stale |= carried is None or limits.setdefault(run.job_key, tuple(carried)) != tuple(carried)
            if name is not None:
                names[run.scheduled_run_id] = name
        send_messages(runs, limits=None if stale else limits, names=names, countdown=countdown)
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
