"""Cancelling runs: `POST /api/runs/{id}/cancel`, the admin and dashboard buttons, and the overlap
policies that cancel (`cancel_other`, `terminate_other`; schedules/dispatch.py).

A run that has not started (queued, throttled, or waiting for its next attempt: its Run is `queued`) ends
`cancelled` at once (runstate.run_cancel). Its start gate takes only `queued` runs, so it never starts;
its message is published once more, so that a worker drops it now and takes its place in the caps'
waiting line away (worker/lifecycle.py) instead of leaving it to hold that place until it expires.

A running run is asked to stop. Its Run gets `cancel_requested_at`, `cancel_deadline` (now + the grace)
and `cancelled_by` in the database, then, after the commit, the request goes out on Redis: a message on
`CANCEL_CHANNEL` and a key per run (for a pool process that subscribes late). The pool process executing
the run hears it within about a second (worker/cancelwatch.py), SIGTERMs the run's task process group,
SIGKILLs it at the deadline, and its finish writes `cancelled` (runstate's finish ends a run asked to
cancel `cancelled`, unless it succeeded first), freeing its slots. Nothing calls from the web host to the
worker: the database and Redis carry the request, so any web host reaches any worker. Should the message
be lost (Redis away at that moment), the run's heartbeat finds the deadline passed (a quarter lease) and
kills it; should the worker be unreachable, its lease expires and the reaper's finish ends the run
`cancelled`, fenced by attempt: a worker that comes back writes nothing over it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import redis
from django.conf import settings
from django.db import connection, transaction

from orchestrator.models import Run, RunStatus
from schedules import runleases, runstate
from schedules.models import ScheduledRun, ScheduledRunStatus
from schedules.publishing import RunMessage, publish_on_commit

logger = logging.getLogger(__name__)

CANCEL_CHANNEL = f"{runleases.KEY_PREFIX}:cancel"
MAX_GRACE_SECONDS = 3600.0
CANCELLED_BY_MAX = 200


class CancelError(Exception):
    """Base for what a cancel refuses."""


class RunNotFound(CancelError):
    pass


class RunFinished(CancelError):
    """The run already ended (409): `status` says how."""

    def __init__(self, run_id: int, status: str) -> None:
        super().__init__(f"Run {run_id} already {status}: only a waiting or running run can be cancelled.")
        self.status = status


@dataclass(frozen=True)
class CancelRequest:
    """What a worker needs to stop a running run: how long its tasks get after SIGTERM, and who asked."""

    run_id: int
    grace: float
    by: str

    def encode(self) -> str:
        return json.dumps({"run_id": self.run_id, "grace": self.grace, "by": self.by})

    @classmethod
    def decode(cls, raw: bytes | str) -> CancelRequest:
        data = json.loads(raw)
        return cls(run_id=int(data["run_id"]), grace=max(0.0, float(data["grace"])), by=str(data["by"]))


def cancel_key(run_id: int) -> str:
    return f"{runleases.KEY_PREFIX}:{run_id}:cancel"


def default_grace() -> float:
    return float(settings.CANCEL_GRACE_SECONDS)


def cancelled_summary(by: str) -> str:
    return f"cancelled by {by}"[: runstate.ERROR_SUMMARY_MAX]


# Ask running runs to stop. A second request keeps the first one's time and author and may only bring
# the deadline closer (a terminate after a cancel); it is sent again, in case the first message was lost.
_REQUEST_SQL = """
UPDATE orchestrator_run
   SET cancel_requested_at = COALESCE(cancel_requested_at, now()),
       cancel_deadline = LEAST(cancel_deadline, now() + make_interval(secs => %(grace)s)),
       cancelled_by = CASE WHEN cancel_requested_at IS NULL THEN %(by)s ELSE cancelled_by END
 WHERE id = ANY(%(ids)s) AND status = 'running'
RETURNING id, GREATEST(0, EXTRACT(EPOCH FROM cancel_deadline - now()))::float8, cancelled_by
"""


def cancel_runs(run_ids: list[int], *, by: str, grace: float | None = None) -> tuple[list[int], list[int]]:
    """Cancel runs: those not started end `cancelled` now, those running are asked to stop within
    `grace` seconds (default CANCEL_GRACE_SECONDS; 0 = SIGKILL at once). Runs already ended are left
    alone. Returns (cancelled now, asked to stop). The requests go out when the caller's transaction
    commits."""
    grace = default_grace() if grace is None else float(grace)
    by = (by or "unknown")[:CANCELLED_BY_MAX]
    with transaction.atomic():
        cancelled = runstate.run_cancel(run_ids, cancelled_summary(by), by=by)
        left = [run_id for run_id in run_ids if run_id not in set(cancelled)]
        requests = []
        if left:
            with connection.cursor() as cursor:
                cursor.execute(_REQUEST_SQL, {"ids": left, "grace": grace, "by": by})
                requests = [CancelRequest(run_id=i, grace=g, by=b) for i, g, b in cursor.fetchall()]
        if cancelled:
            _republish(cancelled)
        if requests:
            transaction.on_commit(lambda: send_cancel_requests(requests))
    for request in requests:
        logger.info(
            "run cancel requested", extra={"run_id": request.run_id, "grace": request.grace, "by": by}
        )
    return cancelled, [request.run_id for request in requests]


def cancel_run(run_id: int, *, by: str, grace: float | None = None) -> Run:
    """Cancel one run (see cancel_runs); the Run as it is now: `cancelled`, or `running` with its cancel
    requested. Raises RunNotFound, or RunFinished for a run that already ended."""
    with transaction.atomic():
        run = Run.objects.select_for_update().filter(pk=run_id).first()
        if run is None:
            raise RunNotFound(f"No run {run_id}.")
        if run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            raise RunFinished(run_id, run.status)
        cancel_runs([run_id], by=by, grace=grace)
    return Run.objects.select_related("job", "directive").get(pk=run_id)


def _republish(run_ids: list[int]) -> None:
    """Publish the cancelled runs' messages again (on commit): the worker that takes one drops it at the
    start gate and removes the run from the caps' waiting line, where a throttled run still stands."""
    runs = Run.objects.filter(pk__in=run_ids).exclude(task_id="").select_related("job")
    scheduled = {sr.run_id: sr for sr in ScheduledRun.objects.filter(run_id__in=run_ids).only("id", "run_id")}
    publish_on_commit(
        [
            RunMessage.build(
                run_id=run.pk,
                task_id=run.task_id,
                job_key=run.job.key,
                job_queue=run.job.queue,
                scheduled_run_id=scheduled[run.pk].pk if run.pk in scheduled else None,
            )
            for run in runs
        ]
    )


def send_cancel_requests(requests: list[CancelRequest]) -> None:
    """Tell the workers: a key per run (read by a pool process that subscribes after this), then the
    message. Redis away: logged; the heartbeat (deadline passed) and the reaper (lease expired) still
    end the run."""
    ttl = runleases.lease_seconds() * 4
    try:
        pipe = runleases.client().pipeline(transaction=False)
        for request in requests:
            pipe.set(cancel_key(request.run_id), request.encode(), ex=max(1, math.ceil(request.grace + ttl)))
            pipe.publish(CANCEL_CHANNEL, request.encode())
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning(
            "cancel request not sent; the heartbeat stops the run at its deadline",
            extra={"count": len(requests), "error": type(exc).__name__},
        )


def cancel_unfinished_of_schedule(
    schedule_id: int, *, keep: set[int], by: str, grace: float
) -> tuple[list[int], list[int]]:
    """The overlap policies `cancel_other` (grace) and `terminate_other` (grace 0): cancel the schedule's
    unfinished runs but those in `keep` (the new slot's)."""
    unfinished = ScheduledRun.objects.filter(
        schedule_id=schedule_id,
        status__in=[ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED, ScheduledRunStatus.RUNNING],
        run_id__isnull=False,
    ).values_list("run_id", flat=True)
    others = sorted(set(unfinished) - keep)
    if not others:
        return [], []
    return cancel_runs(others, by=by, grace=grace)
