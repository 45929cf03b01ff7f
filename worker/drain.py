"""Graceful drain: a worker told to stop (SIGTERM: what Kubernetes and compose send) ends or hands back every
run it holds (docs/ARCHITECTURE.md, guarantee 7).

Celery's warm shutdown does most of it: the worker takes no new message at once and waits for the runs its
pool processes execute; the messages it holds without executing them (a prefetched one, a throttled run's
retry waiting for its countdown) are unacknowledged (late acks), and go back to the queue when it closes
its broker connection as it exits, for another worker to take. What it lacks is a bound: this module gives
the runs `WORKER_DRAIN_SECONDS`. A run still executing then is ended as a hard time limit ends one
(worker/tasks.py): its failure, "worker drained", is recorded first, its task process groups and then its
pool process are killed, and the parent writes the failure and frees its slots once none of its processes
is left (worker/parent.py), so caps hold. For retries it is a lost worker's run (`worker_lost`: its
reason starts with WORKER_DRAINED).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import psutil
from celery.signals import worker_shutdown, worker_shutting_down
from celery.worker import state
from django.conf import settings

from worker.parent import parent_writer
from worker.routing import RUN_TASK_NAME

logger = logging.getLogger(__name__)

WORKER_DRAINED = "worker drained"
# After the deadline: how long the worker waits for the parent's writes before it exits.
END_WAIT_SECONDS = 30.0

_drain: threading.Thread | None = None


def running_runs() -> list:
    """The run requests this worker's pool processes are executing now."""
    while True:
        try:
            active = list(state.active_requests)  # a set the worker's main thread changes meanwhile
        except RuntimeError:
            continue
        return [r for r in active if r.type == RUN_TASK_NAME and r.worker_pid]


def kill_task_groups(pool_pid: int) -> None:
    """SIGKILL the process groups of the tasks a pool process started (its descendants not in the
    worker's own group: each task leads a group of its own, orchestrator/template.py)."""
    try:
        descendants = psutil.Process(pool_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    groups = set()
    for proc in descendants:
        try:
            groups.add(os.getpgid(proc.pid))
        except OSError:
            pass
    for pgid in groups - {os.getpgid(0)}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def end_drained(request, seconds: float) -> None:
    reason = f"{WORKER_DRAINED} (still running after WORKER_DRAIN_SECONDS={seconds:g})"
    logger.warning("run drained", extra={"run_id": (request.kwargs or {}).get("run_id"), "reason": reason})
    request.end_run(reason, overrule=True)
    try:
        # Frozen first, so that it cannot write an outcome of its own for the task it sees killed.
        os.kill(request.worker_pid, signal.SIGSTOP)
        kill_task_groups(request.worker_pid)
        os.kill(request.worker_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # gone meanwhile: its template has killed its task groups (orchestrator/template.py)


def drain(seconds: float) -> None:
    logger.info("draining", extra={"runs": len(running_runs()), "drain_seconds": seconds})
    deadline = time.monotonic() + seconds
    while running_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    for request in running_runs():
        end_drained(request, seconds)
    parent_writer.drain(END_WAIT_SECONDS)


@worker_shutting_down.connect
def _on_shutting_down(how: str = "", **kwargs) -> None:
    global _drain
    # Warm only: a cold shutdown (SIGQUIT, a second SIGINT) cancels the runs at once itself.
    if how == "Warm" and _drain is None:
        seconds = float(settings.WORKER_DRAIN_SECONDS)
        _drain = threading.Thread(target=drain, args=(seconds,), name="worker-drain", daemon=True)
        _drain.start()


@worker_shutdown.connect
def _on_shutdown(**kwargs) -> None:
    # The pool is gone; the parent's writes for the runs it ended may still be under way.
    if _drain is not None:
        _drain.join(timeout=END_WAIT_SECONDS + 10)
