"""Liveness of the scheduler and worker processes, for `manage.py health` (Kubernetes probes).

Each loop stamps a small file when it goes round: the scheduler at the start of every pass
(schedules/beat.py), the worker on every Celery heartbeat its event loop sends (`heartbeat_sent`,
connected in monitoring/apps.py). The probe, a separate process in the same container, reads the stamp:
a loop that has not gone round within twice its interval is stuck. A file, not Redis, so that a Redis
or PostgreSQL outage does not make Kubernetes restart every scheduler (their loops keep going round and
back off); the worker's probe checks Redis separately, as the worker cannot work without it.

The files live in HEALTH_DIR (default: a directory of this user's under the system's temporary
directory; in the manifests, an emptyDir at /tmp). One process of a kind per container: two schedulers
sharing a HEALTH_DIR share one stamp.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KINDS = ("scheduler", "worker")


def health_dir() -> Path:
    from django.conf import settings

    configured = settings.HEALTH_DIR
    return (
        Path(configured) if configured else Path(tempfile.gettempdir()) / f"cyber-brain-health-{os.getuid()}"
    )


def stamp_path(kind: str) -> Path:
    return health_dir() / f"{kind}.json"


_warned: set[str] = set()


def record_tick(kind: str, *, interval: float, state: str = "running") -> None:
    """Stamp `kind`'s loop as gone round now. Never raises: a probe file must not break the loop."""
    path = stamp_path(kind)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        body = json.dumps({"at": time.time(), "interval": interval, "pid": os.getpid(), "state": state})
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(body)
        os.replace(partial, path)  # the probe never reads a half-written file
    except OSError as exc:
        if kind not in _warned:
            _warned.add(kind)
            logger.warning("health stamp not written", extra={"path": str(path), "error": type(exc).__name__})


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def check_tick(kind: str, *, now: float | None = None) -> Verdict:
    """Whether `kind`'s loop went round within twice its interval."""
    path = stamp_path(kind)
    try:
        stamp = json.loads(path.read_text())
        at, interval = float(stamp["at"]), float(stamp["interval"])
    except FileNotFoundError:
        return Verdict(False, f"no {kind} has stamped {path} yet")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"{path} unreadable ({type(exc).__name__})")
    age = (time.time() if now is None else now) - at
    pid = stamp.get("pid")
    if isinstance(pid, int) and not _alive(pid):
        return Verdict(False, f"{kind} (pid {pid}) has exited")
    if stamp.get("state") == "draining":
        return Verdict(True, f"{kind} (pid {pid}) is draining since {age:.0f}s ago")
    if age > 2 * interval:
        return Verdict(False, f"{kind} (pid {pid}) last went round {age:.0f}s ago, over 2 x {interval:g}s")
    return Verdict(True, f"{kind} (pid {pid}) went round {age:.1f}s ago (interval {interval:g}s)")


# The worker's receivers (connected in monitoring/apps.py). Celery's event loop sends a heartbeat every
# `Heart.interval` seconds (2 by default), and stops on a warm shutdown: from SIGTERM on the stamp says
# "draining", so the probe does not kill a worker that is letting its runs finish (the pod's
# terminationGracePeriodSeconds bounds that).
_worker_interval = 2.0
_worker_draining = False


def worker_heartbeat(sender, **kwargs) -> None:
    global _worker_interval
    _worker_interval = float(sender.interval)
    # The last heartbeat ("worker-offline") comes after the shutdown began: it must not undo "draining".
    record_tick("worker", interval=_worker_interval, state="draining" if _worker_draining else "running")


def worker_draining(**kwargs) -> None:
    global _worker_draining
    _worker_draining = True
    record_tick("worker", interval=_worker_interval, state="draining")
