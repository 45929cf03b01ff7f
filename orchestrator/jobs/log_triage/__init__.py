"""`log_triage`: collect new log lines, triage them for security signals, write a report.

collect.py (task 1), detectors.py (the rules, pure), triage.py (task 2) with scoring.py (the optional
LLM step), respond.py (task 3). Settings: `CYBER_BRAIN_LOGS`, `UPLOADS_DIR`, `LLM_ENDPOINT`,
`LLM_MODEL`, `LLM_ALLOWED_HOSTS`, and optional `LOG_TRIAGE_MAX_BYTES_PER_RUN` (64 MiB),
`LOG_TRIAGE_MAX_LINE_BYTES` (8 KiB), `LOG_TRIAGE_REPORT_SEVERITY` (`medium`), `LOG_TRIAGE_THRESHOLDS`
(a dict overriding `detectors.Thresholds`), `LOG_TRIAGE_LLM_BATCH` (20), `LLM_TIMEOUT_SECONDS` (30).

Params (a schedule's or a run's, `PARAMS_SCHEMA`): `files`, glob patterns of the files to read (one
without `/` matches a file's name, one with `/` its path under CYBER_BRAIN_LOGS or UPLOADS_DIR; default
every file), and `min_severity`, the lowest severity a finding is stored and reported at (default
`info`: all). A file a run leaves out keeps its cursor: a later run reads it from there.
"""

from __future__ import annotations

from orchestrator.jobs.log_triage.collect import collect
from orchestrator.jobs.log_triage.detectors import SEVERITIES
from orchestrator.jobs.log_triage.respond import respond
from orchestrator.jobs.log_triage.triage import triage
from orchestrator.jobs.registry import JobSpec, TaskSpec

JOB = JobSpec(
    key="log_triage",
    name="Log triage",
    description="Reads new log lines, detects security signals and writes a triage report.",
    tasks=(TaskSpec("collect", collect), TaskSpec("triage", triage), TaskSpec("respond", respond)),
    timeout_seconds=900,
    params_schema={
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": 200},
                "maxItems": 50,
                "description": "Glob patterns of the log files to read: without '/' a file's name"
                " ('auth.log*'), with '/' its path under CYBER_BRAIN_LOGS or UPLOADS_DIR ('nginx/*.log')."
                " Default: every file.",
            },
            "min_severity": {
                "enum": list(SEVERITIES),
                "description": "Store and report only findings at or above this severity (default info).",
            },
        },
        "additionalProperties": False,
    },
)
