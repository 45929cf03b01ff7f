"""`sleep`: a job that waits. Used by tests, benchmarks and soak runs.

The directive text gives the seconds to sleep: `2.5`, or `seconds=2.5`; anything else means the default.
"""

from __future__ import annotations

import re
import time
from typing import Any

from orchestrator.jobs.registry import JobSpec, TaskContext, TaskSpec

DEFAULT_SECONDS = 1.0
MAX_SECONDS = 3600.0
_SECONDS = re.compile(r"^\s*(?:seconds\s*=\s*)?(\d+(?:\.\d+)?)\s*$")


def parse_seconds(text: str) -> float:
    match = _SECONDS.match(text or "")
    if not match:
        return DEFAULT_SECONDS
    return min(float(match.group(1)), MAX_SECONDS)


def prepare(ctx: TaskContext) -> dict[str, Any]:
    return {"seconds": parse_seconds(ctx.directive_text)}


def sleep(ctx: TaskContext) -> dict[str, Any]:
    seconds = ctx.previous["prepare"]["seconds"]
    time.sleep(seconds)
    return {"slept_seconds": seconds}


def report(ctx: TaskContext) -> dict[str, Any]:
    return {"ok": 1}


JOB = JobSpec(
    key="sleep",
    name="Sleep",
    description="Sleeps for the seconds its directive names (default 1). For tests and benchmarks.",
    tasks=(TaskSpec("prepare", prepare), TaskSpec("sleep", sleep), TaskSpec("report", report)),
    timeout_seconds=600,
)
