"""The Redis side of a run's life: its liveness lease and its pending outcome.

Liveness is the lease, not the database. While a run executes, its worker keeps `cb:run:<id>:lease`
alive (set with the run's concurrency leases when the run is admitted, renewed by its heartbeat every
quarter lease, deleted when it ends; see worker/semaphore.py, which writes it inside the same Lua scripts
as the cap leases). The reaper (schedules/runstate.py, called by every scheduler and every worker) fails a
run "worker lost" only when that key has expired, so a run whose worker is alive is never reaped however
long PostgreSQL is unreachable: its `heartbeat_at` may be stale, its lease is not.

An outcome a worker could not write to PostgreSQL (the database was away when the run ended) is kept in
the hash `cb:run:outcomes` until some reaper pass writes it, fenced like any finish: nothing is lost and
nothing is written twice.

After Redis lost its data every liveness key is gone at once, including those of live runs, which put
theirs back with their next heartbeat (a quarter lease). So absence counts as death only once the epoch
key `cb:run:epoch` (set when first seen missing, Redis server clock) is one lease old.

This module is the contract only; `schedules` never imports `worker`.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import redis
from django.conf import settings

from project import redisconn

KEY_PREFIX = "cb:run"
OUTCOMES_KEY = f"{KEY_PREFIX}:outcomes"
EPOCH_KEY = f"{KEY_PREFIX}:epoch"
# The hash expires this long after its last record: an outcome nobody could write within a week is lost.
OUTCOME_TTL_SECONDS = 7 * 24 * 3600


def run_lease_key(run_id: int) -> str:
    return f"{KEY_PREFIX}:{run_id}:lease"


def lease_seconds() -> float:
    return float(settings.WORKER_LEASE_SECONDS)


@functools.cache
def client() -> redis.Redis:
    """One client per process for all lease traffic (the semaphore's scripts included). redis-py gives a
    forked process connections of its own (its pool checks the pid), so pool children may share it.

    Its socket timeouts are well inside a lease, so a blackholed Redis is noticed in time to stop a run
    before its lease can expire (a heartbeat renews every quarter lease)."""
    timeout = max(0.2, min(5.0, lease_seconds() / 8))
    return redisconn.client(socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=15)


def redis_now_ms() -> int:
    seconds, micros = client().time()
    return seconds * 1000 + micros // 1000


def liveness_trusted() -> bool:
    """True when a missing lease key means the run's worker stopped renewing it (not a Redis loss)."""
    conn = client()
    now = redis_now_ms()
    conn.set(EPOCH_KEY, now, nx=True)
    epoch = int(conn.get(EPOCH_KEY) or now)
    return now - epoch >= lease_seconds() * 1000


def runs_alive(run_ids: list[int]) -> set[int]:
    """The runs among `run_ids` whose liveness lease is still held."""
    if not run_ids:
        return set()
    pipe = client().pipeline(transaction=False)
    for run_id in run_ids:
        pipe.exists(run_lease_key(run_id))
    return {run_id for run_id, alive in zip(run_ids, pipe.execute(), strict=True) if alive}


# --- pending outcomes ----------------------------------------------------------------------------------


def outcome_record(
    *,
    run_id: int,
    scheduled_run_id: int | None,
    status: str,
    error_summary: str,
    stats: dict[str, Any] | None,
    attempt: int | None = None,
    worker: str | None = None,
    task_id: str = "",
    replace: bool = False,
) -> bool:
    """Keep an outcome until it is written; the first recorded outcome of a run wins (HSETNX) unless
    `replace` (a hard time limit overrules what the killed process had recorded).

    Fenced like the write it stands for: by `attempt` (the pool process) or by `worker` (the worker's
    parent, which does not know the attempt). Raises redis.RedisError when Redis is unreachable.
    """
    record = {
        "run_id": run_id,
        "scheduled_run_id": scheduled_run_id,
        "status": status,
        "error_summary": error_summary,
        "stats": stats,
        "attempt": attempt,
        "worker": worker,
        "task_id": task_id,
    }
    pipe = client().pipeline(transaction=True)
    store = pipe.hset if replace else pipe.hsetnx
    store(OUTCOMES_KEY, str(run_id), json.dumps(record))
    pipe.expire(OUTCOMES_KEY, OUTCOME_TTL_SECONDS)
    added, _ = pipe.execute()
    return bool(added)


def outcomes_pending(run_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
    """Recorded outcomes not yet written to PostgreSQL (all, or those of `run_ids`)."""
    if run_ids is None:
        raw = client().hgetall(OUTCOMES_KEY)
    elif run_ids:
        raw = dict(zip(run_ids, client().hmget(OUTCOMES_KEY, run_ids), strict=True))
    else:
        return {}
    return {int(key): json.loads(value) for key, value in raw.items() if value is not None}


def outcome_clear(run_id: int) -> None:
    client().hdel(OUTCOMES_KEY, str(run_id))
