"""The optional LLM step of triage: a 0-10 risk score per finding, from a local OpenAI-compatible model.

Per batch of findings, one chat request: the run's directive as instructions, the findings (rule,
severity, subject, count, times, file name) as JSON. Only the scores land in the database
(`Finding.risk_score`) and only counters leave this module (calls, tokens, findings scored, notes);
the prompt and the response live in local variables and are dropped.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings

from orchestrator import llm

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 20
_INSTRUCTIONS = (
    "You rate findings of an automated security log triage. For every finding in the user message, "
    "give a risk score from 0 (benign) to 10 (critical, act now). Reply with JSON only, in the form "
    '{"scores": [{"id": <finding id>, "score": <integer 0-10>}]}.'
)
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def build_messages(directive_text: str, findings: Iterable[Any]) -> list[dict[str, str]]:
    rows = [
        {
            "id": f.pk,
            "rule": f.rule,
            "severity": f.severity,
            "subject": f.subject,
            "count": f.count,
            "first_seen": f.first_seen.isoformat() if f.first_seen else None,
            "last_seen": f.last_seen.isoformat() if f.last_seen else None,
            "file": Path(f.source_file).name,
        }
        for f in findings
    ]
    system = f"{directive_text.strip()}\n\n{_INSTRUCTIONS}" if directive_text.strip() else _INSTRUCTIONS
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": json.dumps({"findings": rows})},
    ]


def parse_scores(content: str, ids: set[int]) -> dict[int, int]:
    """Scores by finding id from the model's answer; ids not asked about and non-numbers are ignored."""
    match = _JSON_OBJECT.search(content)
    if not match:
        return {}
    try:
        data = json.loads(match.group(0))
    except ValueError:
        return {}
    items = data.get("scores") if isinstance(data, dict) else None
    scores: dict[int, int] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            finding_id, score = int(item["id"]), round(float(item["score"]))
        except (KeyError, TypeError, ValueError):
            continue
        if finding_id in ids:
            scores[finding_id] = min(10, max(0, score))
    return scores


def score_findings(run_id: int, directive_text: str, endpoint: llm.Endpoint) -> dict[str, Any]:
    """Score the run's findings batch by batch. An unreachable model stops scoring (a note, not a failure)."""
    from orchestrator.models import Finding

    batch_size = int(getattr(settings, "LOG_TRIAGE_LLM_BATCH", DEFAULT_BATCH))
    timeout = float(getattr(settings, "LLM_TIMEOUT_SECONDS", llm.DEFAULT_TIMEOUT))
    model = settings.LLM_MODEL or "local"
    findings = list(Finding.objects.filter(run_id=run_id).order_by("id"))
    counters = {"llm_calls": 0, "llm_prompt_tokens": 0, "llm_completion_tokens": 0, "llm_scored": 0}
    notes: list[str] = []
    unparsed = 0
    for start in range(0, len(findings), batch_size):
        batch = findings[start : start + batch_size]
        try:
            answer = llm.chat(
                endpoint, model=model, messages=build_messages(directive_text, batch), timeout=timeout
            )
        except llm.LLMUnavailable as exc:
            # The exception text names the failure (status, error type), never content.
            logger.warning("llm unavailable, rule-only triage", extra={"run_id": run_id, "reason": str(exc)})
            notes.append("llm_unavailable")
            break
        counters["llm_calls"] += 1
        counters["llm_prompt_tokens"] += answer.prompt_tokens
        counters["llm_completion_tokens"] += answer.completion_tokens
        scores = parse_scores(answer.content, {f.pk for f in batch})
        del answer
        if not scores:
            unparsed += 1
        for finding in batch:
            if finding.pk in scores:
                finding.risk_score = scores[finding.pk]
        Finding.objects.bulk_update([f for f in batch if f.pk in scores], ["risk_score"])
        counters["llm_scored"] += len(scores)
    if unparsed:
        notes.append("llm_unparseable_response")
    logger.info(
        "llm scoring done",
        extra={"run_id": run_id, "llm_calls": counters["llm_calls"], "scored": counters["llm_scored"]},
    )
    return {**counters, "llm_unparsed_batches": unparsed, "notes": notes}
