"""`log_triage`: collect new log lines, triage them for security signals, write a report.

Placeholder tasks until the orchestrator issue fills them in.
"""

from __future__ import annotations

from typing import Any

from orchestrator.jobs.registry import JobSpec, TaskContext, TaskSpec


def collect(ctx: TaskContext) -> dict[str, Any]:
    return {"lines": 0}


def triage(ctx: TaskContext) -> dict[str, Any]:
    return {"findings": 0}


def respond(ctx: TaskContext) -> dict[str, Any]:
    return {"actions": 0}


JOB = JobSpec(
    key="log_triage",
    name="Log triage",
    description="Reads new log lines, detects security signals and writes a triage report.",
    tasks=(TaskSpec("collect", collect), TaskSpec("triage", triage), TaskSpec("respond", respond)),
    timeout_seconds=900,
)
