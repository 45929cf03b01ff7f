"""A bare Celery app with one no-op task, the yardstick for our run path (benchmarks/e2e.py).

    BENCH_REDIS_URL=redis://127.0.0.1:6379/13 celery -A benchmarks.bare_celery worker -c 2 -Q bench.noop

`bench.noop` does nothing but count itself: one INCR of `bench:noop:done` on the same Redis, which the
harness polls. No Django, no database, no result backend. The delivery settings that shape throughput
are ours (project/celery.py): the same prefetch multiplier (WORKER_PREFETCH_MULTIPLIER, default 1), late
acks, task events on, JSON; so what separates the two figures is the run path, not the Celery
configuration.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

from benchmarks.common import celery_delivery_conf

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
QUEUE = "bench.noop"
COUNTER = "bench:noop:done"

app = Celery("bare", broker=REDIS_URL)
app.conf.update(celery_delivery_conf(task_ignore_result=True, task_default_queue=QUEUE))

_client: redis.Redis | None = None


@app.task(name="bench.noop")
def noop(*args, **kwargs) -> None:
    global _client
    if _client is None:  # one connection per pool process, made after the fork
        _client = redis.Redis.from_url(REDIS_URL)
    _client.incr(COUNTER)
