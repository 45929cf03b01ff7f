"""Shared pieces of the benchmark scripts: databases, process stats, queue sampling, percentiles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def celery_delivery_conf(**extra) -> dict:
    """The delivery settings that shape a Celery worker's throughput, as ours has them (project/celery.py):
    the same prefetch multiplier (WORKER_PREFETCH_MULTIPLIER, default 1), late acks, task events, JSON.
    The bare and incumbent apps of the benchmarks take these, so the figures compare run paths, not
    Celery configurations."""
    return {
        "worker_prefetch_multiplier": int(os.environ.get("WORKER_PREFETCH_MULTIPLIER", "1")),
        "task_acks_late": True,
        "worker_send_task_events": True,
        "task_send_sent_event": False,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        **extra,
    }


def admin_dsn() -> dict:
    return {
        "host": os.environ.get("POSTGRES_HOST", "127.0.0.1"),
        "port": os.environ.get("POSTGRES_PORT", "5432"),
        "user": os.environ.get("POSTGRES_USER", "postgres"),
        "password": os.environ.get("POSTGRES_PASSWORD", ""),
        "dbname": "postgres",
    }


def recreate_database(name: str) -> None:
    conn = psycopg2.connect(**admin_dsn())
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def bench_env(settings_module: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": settings_module,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "WARNING",
        }
    )
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), *args], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )


@dataclass
class ProcStats:
    cpu_seconds: float
    peak_rss_mb: float


def proc_stats(pid: int) -> ProcStats:
    """CPU time (user + system) and peak resident memory of a live process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0.0
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return ProcStats(cpu_seconds=cpu, peak_rss_mb=peak)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class QueueTrace:
    """When the queue reached each length: (seconds since start, length) pairs."""

    start: float
    points: list[tuple[float, int]] = field(default_factory=list)

    def time_to_reach(self, count: int) -> float | None:
        for seconds, length in self.points:
            if length >= count:
                return seconds
        return None

    def arrival_times(self, count: int) -> list[float]:
        """Seconds after start at which message k (1-based) was first seen, for k = 1..count."""
        times, k = [], 1
        for seconds, length in self.points:
            while k <= min(length, count):
                times.append(seconds)
                k += 1
        return times


def trace_queue(
    client: redis.Redis, queue: str, *, expected: int, settle: float, timeout: float, period: float = 0.01
) -> QueueTrace:
    """Sample LLEN until the queue holds `expected` messages and has not grown for `settle` seconds."""
    start = time.monotonic()
    trace = QueueTrace(start=start)
    last_length, last_change = -1, start
    while True:
        now = time.monotonic()
        length = client.llen(queue)
        if length != last_length:
            trace.points.append((now - start, length))
            last_length, last_change = length, now
        if length >= expected and now - last_change >= settle:
            return trace
        if now - start > timeout:
            return trace
        time.sleep(period)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def read_statements(path: Path) -> int | None:
    import json

    try:
        return json.loads(path.read_text())["statements"]
    except (OSError, ValueError, KeyError):
        return None
