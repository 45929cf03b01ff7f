"""Throwaway jobs for test_orchestrator_execute: tasks that crash, hang, hog memory or raise.

Module-level functions, because each task runs in a child process that imports it by name. The
directive text carries a file path where a task records pids for the test to check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from orchestrator.jobs.registry import JobSpec, TaskContext, TaskSpec


def ok(ctx: TaskContext) -> dict[str, Any]:
    return {"items": 3, "ratio": 0.5, "label": "not a count"}


def record_pid(ctx: TaskContext) -> dict[str, Any]:
    with open(ctx.directive_text, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    return {}


def hang_with_grandchild(ctx: TaskContext) -> dict[str, Any]:
    grandchild = subprocess.Popen(["sleep", "300"])
    with open(ctx.directive_text, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {grandchild.pid}\n")
    time.sleep(300)
    return {}


def crash(ctx: TaskContext) -> dict[str, Any]:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def hog_memory(ctx: TaskContext) -> dict[str, Any]:
    blocks = [bytearray(64 * 1024 * 1024) for _ in range(64)]  # 4 GiB, far above the limit
    return {"blocks": len(blocks)}


def raise_error(ctx: TaskContext) -> dict[str, Any]:
    raise ValueError("input line with private words: hunter2")


def _job(key: str, middle, timeout: int = 60, memory: int = 1024) -> JobSpec:
    return JobSpec(
        key=key,
        name=key,
        description="test job",
        tasks=(TaskSpec("first", record_pid), TaskSpec("middle", middle), TaskSpec("last", ok)),
        timeout_seconds=timeout,
        memory_limit_mb=memory,
    )


JOBS = {
    "t_ok": _job("t_ok", ok),
    # The hanging task comes first so that a slow start of an earlier child cannot use up the budget.
    "t_hang": JobSpec(
        key="t_hang",
        name="t_hang",
        description="test job",
        tasks=(TaskSpec("hang", hang_with_grandchild), TaskSpec("middle", ok), TaskSpec("last", ok)),
        timeout_seconds=15,
    ),
    "t_crash": _job("t_crash", crash),
    "t_memory": _job("t_memory", hog_memory, memory=512),
    "t_raise": _job("t_raise", raise_error),
}
