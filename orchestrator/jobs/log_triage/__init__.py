"""`log_triage`: collect new log lines, triage them for security signals, write a report.

collect.py (task 1), detectors.py (the rules, pure), triage.py (task 2) with scoring.py (the optional
LLM step), respond.py (task 3). Settings: `CYBER_BRAIN_LOGS`, `UPLOADS_DIR`, `LLM_ENDPOINT`,
`LLM_MODEL`, `LLM_ALLOWED_HOSTS`, and optional `LOG_TRIAGE_MAX_BYTES_PER_RUN` (64 MiB),
`LOG_TRIAGE_MAX_LINE_BYTES` (8 KiB), `LOG_TRIAGE_REPORT_SEVERITY` (`medium`), `LOG_TRIAGE_THRESHOLDS`
(a dict overriding `detectors.Thresholds`), `LOG_TRIAGE_LLM_BATCH` (20), `LLM_TIMEOUT_SECONDS` (30).
"""

from __future__ import annotations

from orchestrator.jobs.log_triage.collect import collect
from orchestrator.jobs.log_triage.respond import respond
from orchestrator.jobs.log_triage.triage import triage
from orchestrator.jobs.registry import JobSpec, TaskSpec

JOB = JobSpec(
    key="log_triage",
    name="Log triage",
    description="Reads new log lines, detects security signals and writes a triage report.",
    tasks=(TaskSpec("collect", collect), TaskSpec("triage", triage), TaskSpec("respond", respond)),
    timeout_seconds=900,
)
