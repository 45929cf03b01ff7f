"""Task 3, respond: write the run's report for the findings at or above the severity threshold.

`task3_scope` decides what the report acts on: `all` takes every such finding, `allowlist` only those
whose subject matches `Job.task3_allowlist` (IPs, CIDRs, host and user names, path globs); the report
says how many the scope left out. Reports go to `UPLOADS_DIR/reports/<run id>.md` and `.json`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.utils import timezone

from orchestrator.jobs.log_triage.detectors import at_or_above
from orchestrator.jobs.registry import TaskContext

DEFAULT_SEVERITY_THRESHOLD = "medium"
_GLOB_CHARS = frozenset("*?[")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def subject_matches(subject: str, allowlist: Iterable[Any]) -> bool:
    """Whether `subject` is named by an allowlist entry.

    Entries: an IP (`203.0.113.5`), a CIDR (`10.0.0.0/8`), a glob (`/api/*`, `*.example.com`), or an
    exact name: a path, a user (case-sensitive) or a host name (with a dot; case-insensitive).
    """
    subject_ip = _ip(subject)
    for raw in allowlist:
        entry = str(raw).strip()
        if not entry:
            continue
        if _GLOB_CHARS & set(entry):
            if fnmatch.fnmatchcase(subject, entry):
                return True
        elif "/" in entry and not entry.startswith("/"):
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if subject_ip is not None and subject_ip.version == network.version and subject_ip in network:
                return True
        elif (entry_ip := _ip(entry)) is not None:
            if subject_ip is not None and entry_ip == subject_ip:
                return True
        elif entry == subject or ("." in entry and entry.lower() == subject.lower()):
            return True
    return False


def _finding_row(f: Any) -> dict[str, Any]:
    return {
        "id": f.pk,
        "rule": f.rule,
        "severity": f.severity,
        "subject": f.subject,
        "count": f.count,
        "first_seen": f.first_seen.isoformat() if f.first_seen else None,
        "last_seen": f.last_seen.isoformat() if f.last_seen else None,
        "source_file": f.source_file,
        "risk_score": f.risk_score,
    }


def _md(text: Any) -> str:
    # Subjects come from logs: keep them from breaking the table or the Markdown around it.
    return (
        str(text if text is not None else "")
        .replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("`", "\\`")
        .replace("\n", " ")
    )


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Log triage report, run {report['run_id']}",
        "",
        f"- Generated: {report['generated_at']}",
        f"- Job: {report['job']}; scope: {report['task3_scope']}; "
        f"severity threshold: {report['severity_threshold']}",
        f"- Findings in the run: {report['findings_total']}; "
        f"below the threshold: {report['below_threshold']}",
        f"- Reported: {report['reported']}; left out by the scope: {report['left_out_by_scope']}",
        "",
    ]
    if not report["findings"]:
        lines.append("No findings to report.")
    else:
        lines += [
            "| severity | rule | subject | count | first seen | last seen | risk | source |",
            "|---|---|---|---:|---|---|---:|---|",
        ]
        for row in report["findings"]:
            lines.append(
                "| "
                + " | ".join(
                    _md(row[key])
                    for key in (
                        "severity",
                        "rule",
                        "subject",
                        "count",
                        "first_seen",
                        "last_seen",
                        "risk_score",
                        "source_file",
                    )
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def respond(ctx: TaskContext) -> dict[str, Any]:
    from orchestrator.models import Run, Task3Scope

    run = Run.objects.select_related("job").get(pk=ctx.run_id)
    threshold = str(getattr(settings, "LOG_TRIAGE_REPORT_SEVERITY", DEFAULT_SEVERITY_THRESHOLD))
    findings = list(run.findings.order_by("id"))
    actionable = [f for f in findings if at_or_above(f.severity, threshold)]
    if ctx.task3_scope == Task3Scope.ALL:
        in_scope = actionable
    else:
        allowlist = run.job.task3_allowlist if isinstance(run.job.task3_allowlist, list) else []
        in_scope = [f for f in actionable if subject_matches(f.subject, allowlist)]
    report = {
        "run_id": run.pk,
        "job": run.job.key,
        "generated_at": timezone.now().isoformat(),
        "task3_scope": ctx.task3_scope,
        "severity_threshold": threshold,
        "findings_total": len(findings),
        "below_threshold": len(findings) - len(actionable),
        "reported": len(in_scope),
        "left_out_by_scope": len(actionable) - len(in_scope),
        "findings": [_finding_row(f) for f in in_scope],
    }
    reports_dir = Path(settings.UPLOADS_DIR) / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    md_path = reports_dir / f"{run.pk}.md"
    _write_atomically(reports_dir / f"{run.pk}.json", json.dumps(report, indent=2) + "\n")
    _write_atomically(md_path, render_markdown(report))
    return {
        "reported": report["reported"],
        "left_out_by_scope": report["left_out_by_scope"],
        "below_threshold": report["below_threshold"],
        "report_path": str(md_path),
    }
