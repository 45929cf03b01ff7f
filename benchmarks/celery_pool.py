"""Celery's own pool as the per-task process (issue 30.1): a no-op task with `--max-tasks-per-child 1`.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/6 .venv/bin/python -m benchmarks.celery_pool --tasks 400

Starts a real Celery worker on this module's app (prefork, concurrency 2, Redis broker, rpc result
backend), twice: with `--max-tasks-per-child 1` (billiard replaces the pool process after every task, so
each task runs in a fresh process forked from the worker's main process) and without it (the reference:
long-lived pool processes). The worker's main process imports Django with the project's settings (the
Django fix-up calls django.setup(), as for our worker) and the job modules, before the pool forks. The
task runs the same no-op as benchmarks/task_latency.py's (the `sleep` job's `report`) and returns.

Per worker, after 20 tasks of warm-up: N tasks one at a time (send, wait for the result: tasks/s and
p50/p99 in ms, as task_latency measures), then N sent at once (tasks/s until the last result). Then runs
`benchmarks.task_latency --tasks N` (the template) and prints its line next to them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from celery import Celery
from celery.signals import worker_init

from benchmarks.common import celery_delivery_conf

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/6")
QUEUE = "bench.pool"

app = Celery("bench_pool", broker=REDIS_URL, backend="rpc://")
app.conf.update(celery_delivery_conf(task_default_queue=QUEUE))


@worker_init.connect
def _import_job_modules(**kwargs) -> None:
    """In the worker's main process, after the Django fix-up's django.setup(): what the template preloads."""
    import importlib

    from orchestrator.jobs.registry import all_job_specs

    for name in sorted({task.func.__module__ for spec in all_job_specs() for task in spec.tasks}):
        importlib.import_module(name)


@app.task(name="bench.pool_noop")
def noop() -> dict:
    from orchestrator.jobs.registry import TaskContext
    from orchestrator.jobs.sleep import JOB

    ctx = TaskContext(
        run_id=1, job_key="sleep", directive_text="", task3_scope="allowlist", previous={}, work_dir="/tmp"
    )
    return JOB.tasks[2].func(ctx)  # report: returns at once


def measure(label: str, tasks: int, extra: list[str]) -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).delete(QUEUE)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.celery_pool", "worker", "-P", "prefork", "-c", "2",
         "-Q", QUEUE, "--loglevel", "WARNING", "--without-mingle", "--without-gossip", *extra],
        env=dict(os.environ, BENCH_REDIS_URL=REDIS_URL),
        stdout=subprocess.DEVNULL,  # the banner
    )  # fmt: skip
    try:
        for index in range(20):  # warm-up; the first waits for the worker to start
            noop.apply_async().get(timeout=120 if index == 0 else 30)
        times = []
        started = time.perf_counter()
        for _ in range(tasks):
            t0 = time.perf_counter()
            noop.apply_async().get(timeout=30)
            times.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
        times.sort()
        p50, p99 = 1000 * statistics.median(times), 1000 * times[int(0.99 * len(times))]
        started = time.perf_counter()
        results = [noop.apply_async() for _ in range(tasks)]
        for result in results:
            result.get(timeout=120)
        burst = time.perf_counter() - started
        print(
            f"{label}: one at a time {tasks / total:.1f} tasks/s, p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
            f"{tasks} at once {tasks / burst:.1f} tasks/s",
            flush=True,
        )
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=400)
    args = parser.parse_args()
    measure("celery max-tasks-per-child=1", args.tasks, ["--max-tasks-per-child", "1"])
    measure("celery long-lived pool", args.tasks, [])
    subprocess.run([sys.executable, "-m", "benchmarks.task_latency", "--tasks", str(args.tasks)], check=True)


if __name__ == "__main__":
    from benchmarks.celery_pool import main as module_main  # the worker imports the module by this name

    module_main()
