"""Per-task latency of a no-op task in a forked task process, the pool process's side included.

    .venv/bin/python -m benchmarks.task_latency --tasks 500                 # the task template
    .venv/bin/python -m benchmarks.task_latency --tasks 500 --forkserver    # multiprocessing's forkserver

Both fork the task from a process that set up Django, imported the job modules and froze the collector
(orchestrator.template._preload); both run `orchestrator.taskrunner.run` (own session and group, parent-
death signal, limits, outcome file) and kill the group afterwards. The forkserver variant adds the ready
handshake after setsid() that a group kill needs. No database is touched (the task is `sleep.report`).
Prints tasks/s and the per-task p50/p99 in ms, after 20 tasks of warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")

if os.environ.get("BENCH_IN_FORKSERVER") == "1":  # imported by the forkserver: preload as the template does
    from orchestrator.template import _preload

    _preload()


def forkserver_task(ready, request: dict) -> None:
    """In the forkserver's child: lead a new session, say so, run the task as the template's child does."""
    from orchestrator import taskrunner

    os.setsid()
    ready.send_bytes(b"\0")
    ready.close()
    os._exit(taskrunner.run(request, template_pid=os.getppid()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=500)
    parser.add_argument("--forkserver", action="store_true")
    args = parser.parse_args()
    import django

    django.setup()
    from django.db import connection

    from orchestrator.jobs.registry import TaskContext
    from orchestrator.jobs.sleep import JOB
    from orchestrator.services import _child_settings, _kill_group, run_task_in_child
    from orchestrator.taskprocs import runner_argv

    task = JOB.tasks[2]  # report: returns at once
    work_dir = tempfile.mkdtemp(prefix="cb-bench-")
    ctx = TaskContext(
        run_id=1, job_key="sleep", directive_text="", task3_scope="allowlist", previous={}, work_dir=work_dir
    )
    if args.forkserver:
        import multiprocessing
        from dataclasses import asdict

        os.environ["BENCH_IN_FORKSERVER"] = "1"
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["benchmarks.task_latency"])
        argv = runner_argv(run_id=1, job_key="sleep", task=task.name)

        def one() -> None:
            payload = {
                "task_ref": task.ref,
                "context": asdict(ctx),
                "result_path": os.path.join(work_dir, "out.json"),
                "memory_limit_mb": 1024,
                "cpu_seconds": 35,
                "db_name": connection.settings_dict["NAME"],
                "settings": _child_settings(),
            }
            request = {"title": " ".join([sys.executable, *argv]), "argv": argv, "payload": payload}
            ready_r, ready_w = mp.Pipe(duplex=False)
            proc = mp.Process(target=forkserver_task, args=(ready_w, request))
            proc.start()
            ready_w.close()
            ready_r.recv_bytes()
            proc.join(30)
            _kill_group(proc.pid)
            assert proc.exitcode == 0, proc.exitcode

    else:

        def one() -> None:
            outcome = run_task_in_child(
                task, ctx, index=0, time_limit=30, memory_limit_mb=1024, run_timeout=30
            )
            assert outcome.ok, outcome

    for _ in range(20):
        one()
    times = []
    started = time.perf_counter()
    for _ in range(args.tasks):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    times.sort()
    print(
        f"{'forkserver' if args.forkserver else 'template'}: {args.tasks / total:.1f} tasks/s, "
        f"p50 {1000 * statistics.median(times):.2f} ms, p99 {1000 * times[int(0.99 * len(times))]:.2f} ms"
    )


if __name__ == "__main__":
    from benchmarks.task_latency import main as module_main  # so that pickled functions name the module

    module_main()
