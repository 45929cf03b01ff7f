"""Task 2, triage: run the detectors over the collected lines, store findings, move the cursors.

Findings and cursor moves commit in one transaction, under an advisory lock that serializes triage
commits, and only for files whose cursor is still where collect saw it: a line is never triaged twice
(two overlapping runs) and never skipped (a run that fails before this commit leaves the cursors).
The optional LLM step runs after the commit; its endpoint is vetted before anything is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from orchestrator import llm
from orchestrator.jobs.log_triage.collect import SPOOL_DIR, read_manifest
from orchestrator.jobs.log_triage.detectors import SEVERITIES, Thresholds, Triage, at_or_above
from orchestrator.jobs.log_triage.scoring import score_findings
from orchestrator.jobs.registry import TaskContext, TaskError

# pg_advisory_xact_lock key: "LOGTRIAG" as a 64-bit integer, held only while a triage commits.
_TRIAGE_LOCK = int.from_bytes(b"LOGTRIAG", "big") & 0x7FFF_FFFF_FFFF_FFFF


def thresholds_from_settings() -> Thresholds:
    overrides = getattr(settings, "LOG_TRIAGE_THRESHOLDS", None) or {}
    return Thresholds(**{key: int(value) for key, value in overrides.items()})


def vet_llm_endpoint(notes: list[str]) -> llm.Endpoint | None:
    """The endpoint to score with, None without one. A refused endpoint fails the run, loudly."""
    if not settings.LLM_ENDPOINT:
        return None
    try:
        return llm.resolve_endpoint(settings.LLM_ENDPOINT, allowed_hosts=list(settings.LLM_ALLOWED_HOSTS))
    except llm.LLMRefused as exc:
        raise TaskError(str(exc)) from None
    except llm.LLMUnavailable:
        notes.append("llm_unavailable")
        return None


def triage(ctx: TaskContext) -> dict[str, Any]:
    from orchestrator.models import Finding, LogCursor

    notes: list[str] = []
    endpoint = vet_llm_endpoint(notes)
    entries = read_manifest(ctx.work_dir)
    engine = Triage(now=timezone.now(), thresholds=thresholds_from_settings())
    spool_dir = Path(ctx.work_dir) / SPOOL_DIR
    raced = 0
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", [_TRIAGE_LOCK])
        current = {
            c.path: c
            for c in LogCursor.objects.select_for_update().filter(path__in=[e.path for e in entries])
        }
        for entry in entries:
            cursor = current.get(entry.path)
            state = [cursor.inode, cursor.offset, cursor.head_hash] if cursor else None
            if state != entry.expected:
                raced += 1  # another run triaged this file since our collect: its lines are not ours
                continue
            with open(spool_dir / entry.spool, encoding="utf-8") as fh:
                for line in fh:
                    engine.feed(entry.path, line)
            values = {
                "inode": entry.inode,
                "offset": entry.end,
                "size": entry.size,
                "head_hash": entry.head_hash,
                "head_len": entry.head_len,
            }
            if cursor is None:
                LogCursor.objects.create(path=entry.path, **values)
            else:
                LogCursor.objects.filter(pk=cursor.pk).update(updated_at=timezone.now(), **values)
        # The run's `min_severity` param: lower findings are not stored (nor reported).
        min_severity = ctx.params.get("min_severity", SEVERITIES[0])
        found = [f for f in engine.findings() if at_or_above(f.severity, min_severity)]
        Finding.objects.bulk_create(
            [
                Finding(
                    run_id=ctx.run_id,
                    rule=f.rule,
                    severity=f.severity,
                    subject=f.subject,
                    count=f.count,
                    first_seen=f.first_seen,
                    last_seen=f.last_seen,
                    source_file=f.source_file[:1024],
                )
                for f in found
            ]
        )
    result: dict[str, Any] = {"lines": engine.lines, "findings": len(found), "files_raced": raced}
    for severity in SEVERITIES:
        result[f"findings_{severity}"] = sum(1 for f in found if f.severity == severity)
    if endpoint is not None and found:
        scored = score_findings(ctx.run_id, ctx.directive_text, endpoint)
        notes.extend(scored.pop("notes"))
        result.update(scored)
    result["notes"] = notes
    return result
