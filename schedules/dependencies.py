"""Run-after dependencies: a schedule that runs when runs of other schedules end (docs/SCHEDULES.md,
"Run after other schedules"; guarantee 9).

The end of an upstream run is recorded by the database itself: a trigger (migration 0009) inserts an
`UpstreamEnd` row in the transaction that writes the run's final status, whoever writes it (the
worker, the reaper, a cancel), and notifies the schedulers. Every scheduler pass then calls
`fire_dependencies`, which in ONE transaction takes a batch of those rows (`FOR UPDATE SKIP LOCKED`,
so schedulers never wait on each other), inserts the downstream runs with `ON CONFLICT DO NOTHING` on
the unique keys (`scheduledrun_unique_upstream_run`, `scheduledrun_unique_dependency_date`) and
deletes the rows it consumed; the messages are published after the commit, and a publish that fails
or never happens (the scheduler killed right after the commit) is left to the outbox sweep, as for any
slot. A kill before the commit leaves the rows for the next pass; after it, nothing is left to do. So
each upstream end yields exactly one downstream run, whatever is killed when.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from django.db import connection, transaction

from orchestrator.models import Directive, Job, Trigger
from orchestrator.services import OrchestratorService
from schedules.models import RUN_AFTER_STATUSES, RunAfterMode, ScheduledRunStatus
from schedules.publishing import RunMessage, send_messages, stamp_published
from schedules.slots import decide_overlap

logger = logging.getLogger(__name__)

# Upstream ends consumed per transaction: a killed scheduler loses at most this batch's work (rolled
# back, redone by the next pass).
FIRE_BATCH = 200

DISABLED_REASON = "schedule disabled when its upstream run ended"


# --- The graph (pure) -----------------------------------------------------------------------------


def find_cycle(edges: Mapping[int, Iterable[int]], start: int) -> list[int] | None:
    """A path start -> ... -> start following `edges` (downstream -> its upstreams), or None.

    `edges` is the whole run-after graph with the edited schedule's new upstreams in place; only a
    cycle through `start` can be new, since the graph was acyclic before the edit."""
    # Iterative depth-first search: a long chain must not hit the recursion limit.
    path: list[int] = [start]
    stack: list[Iterator] = [iter(sorted(edges.get(start, ())))]
    seen: set[int] = {start}
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            path.pop()
            continue
        if node == start:
            return [*path, start]
        if node in seen:
            continue
        seen.add(node)
        path.append(node)
        stack.append(iter(sorted(edges.get(node, ()))))
    return None


def cycle_message(cycle: list[int], names: Mapping[int, str]) -> str:
    """ "cycle a -> b -> a": the schedules in run-after order (each runs after the next)."""
    return "cycle " + " -> ".join(names.get(node, str(node)) for node in cycle)


def run_after_errors(
    *, schedule_id: int | None, name: str, upstream_ids: list[int], edges: Mapping[int, Iterable[int]],
    names: Mapping[int, str],
) -> list[str]:  # fmt: skip
    """The run_after rules for a schedule whose upstreams become `upstream_ids`: no self-dependency, no
    cycle. `edges` is the current graph (downstream -> upstreams), `names` the schedule names."""
    if schedule_id is not None and schedule_id in upstream_ids:
        return [f"A schedule cannot run after itself: cycle {name} -> {name}."]
    if schedule_id is None:
        return []  # a new schedule has no downstreams yet, so it closes no cycle
    graph = {node: set(ups) for node, ups in edges.items()}
    graph[schedule_id] = set(upstream_ids)
    cycle = find_cycle(graph, schedule_id)
    if cycle is None:
        return []
    return [cycle_message(cycle, {**names, schedule_id: name}) + "."]


def status_errors(value: object) -> list[str]:
    """run_after_statuses: a non-empty list of distinct terminal run statuses."""
    allowed = ", ".join(RUN_AFTER_STATUSES)
    if not isinstance(value, list) or not value:
        return [f"Must be a non-empty list of statuses, each one of {allowed}."]
    bad = [v for v in value if v not in RUN_AFTER_STATUSES]
    if bad:
        return [f"{bad[0]!r} is not a run end; expected each of {allowed}."]
    if len(set(value)) != len(value):
        return ["Must not repeat a status."]
    return []


def graph_edges() -> tuple[dict[int, set[int]], dict[int, str]]:
    """The whole run-after graph (downstream -> upstreams) and the names of the schedules in it.
    One query; the graph is as big as the number of run_after edges, not of schedules."""
    edges: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT d.downstream_id, d.upstream_id, ds.name, us.name FROM schedules_scheduledependency d"
            " JOIN schedules_schedule ds ON ds.id = d.downstream_id"
            " JOIN schedules_schedule us ON us.id = d.upstream_id"
        )
        for down, up, down_name, up_name in cursor.fetchall():
            edges.setdefault(down, set()).add(up)
            names[down], names[up] = down_name, up_name
    return edges, names


# Serialises run_after edits: two concurrent edits could each pass the cycle check alone and close a
# cycle together. A transaction-scoped advisory lock, taken only by edits that change run_after.
RUN_AFTER_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtext('schedules.run_after'))"


def lock_graph() -> None:
    with connection.cursor() as cursor:
        cursor.execute(RUN_AFTER_LOCK_SQL)


# --- The sweep ------------------------------------------------------------------------------------

TAKE_ENDS_SQL = """
SELECT id, scheduled_run_id, schedule_id, status FROM schedules_upstreamend
 ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
"""

# Each consumed end with each downstream that takes its status, and what the downstream run needs.
# Rows lock the downstream schedule (FOR KEY SHARE, as run-now does) so a delete waits for the insert.
CANDIDATES_SQL = """
SELECT e.scheduled_run_id, e.schedule_id, u.scheduled_for, d.id, d.name, d.run_after_mode, d.timezone,
       d.enabled, d.overlap_policy, d.job_id, d.directive_id, d.custom_directive_text, d.task3_scope,
       d.params, d.run_after_statuses, now()
  FROM unnest(%(run_ids)s::bigint[], %(schedule_ids)s::bigint[], %(statuses)s::text[])
       AS e(scheduled_run_id, schedule_id, status)
  JOIN schedules_scheduledrun u ON u.id = e.scheduled_run_id
  JOIN schedules_scheduledependency dep ON dep.upstream_id = e.schedule_id
  JOIN schedules_schedule d ON d.id = dep.downstream_id
 WHERE d.run_after_statuses ? e.status
 ORDER BY d.id, e.scheduled_run_id
   FOR KEY SHARE OF d
"""

# run_after_mode all: every upstream of the downstream has a run scheduled within [lo, hi) (the date in
# the downstream's zone) that ended in one of its statuses. One probe of scheduledrun_history_idx per
# upstream.
ALL_DONE_SQL = """
SELECT NOT EXISTS (
    SELECT 1 FROM schedules_scheduledependency dep
     WHERE dep.downstream_id = %(downstream)s
       AND NOT EXISTS (SELECT 1 FROM schedules_scheduledrun r
                        WHERE r.schedule_id = dep.upstream_id
                          AND r.scheduled_for >= %(lo)s AND r.scheduled_for < %(hi)s
                          AND r.status = ANY(%(statuses)s)))
"""

INSERT_SQL = """
INSERT INTO schedules_scheduledrun
       (schedule_id, run_id, trigger, scheduled_for, status, task_id, worker, error_summary,
        created_at, finished_at, upstream_run_id, dependency_date)
SELECT v.schedule_id, v.run_id, 'dependency', now(), v.status, v.task_id, '', v.reason,
       now(), CASE WHEN v.status = 'skipped' THEN now() END, v.upstream_run_id, v.dependency_date
  FROM unnest(%(schedule_ids)s::bigint[], %(run_ids)s::bigint[], %(statuses)s::text[],
              %(task_ids)s::text[], %(reasons)s::text[], %(upstream_ids)s::bigint[], %(dates)s::date[])
       AS v(schedule_id, run_id, status, task_id, reason, upstream_run_id, dependency_date)
    ON CONFLICT DO NOTHING
RETURNING id, schedule_id, run_id
"""

UNFINISHED_SQL = """
SELECT schedule_id, count(*) FROM schedules_scheduledrun
 WHERE schedule_id = ANY(%(ids)s) AND status IN ('queued', 'throttled', 'running')
 GROUP BY schedule_id
"""


@dataclass(frozen=True)
class _Firing:
    """One downstream run to create: for an upstream run (any) or for a date (all)."""

    downstream: int
    name: str
    upstream_run: int
    dependency_date: date | None
    enabled: bool
    overlap_policy: str
    job_id: int
    directive_id: int | None
    custom_directive_text: str
    task3_scope: str
    params: dict
    now: datetime  # the database's clock


@dataclass
class FireResult:
    consumed: int = 0  # upstream ends taken off the queue
    created: int = 0  # downstream runs inserted (queued or skipped)
    published: int = 0


def date_bounds(day: date, zone: str) -> tuple[datetime, datetime]:
    """The instants [lo, hi) of a local date in `zone` (23 or 25 hours across DST)."""
    tz = ZoneInfo(zone)
    # In UTC: arithmetic on two datetimes of one zone is wall-clock arithmetic in Python.
    lo = datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)
    hi = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz).astimezone(UTC)
    return lo, hi


def local_date(instant: datetime, zone: str) -> date:
    return instant.astimezone(ZoneInfo(zone)).date()


def fire_dependencies(*, limit: int = FIRE_BATCH) -> FireResult:
    """Consume up to `limit` upstream ends and create the downstream runs they call for, in one
    transaction; then publish. Safe with any number of schedulers at once."""
    result = FireResult()
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(TAKE_ENDS_SQL, {"limit": limit})
            ends = cursor.fetchall()
            if not ends:
                return result
            firings = _firings(cursor, ends)
            inserted = _insert(cursor, firings) if firings else []
            cursor.execute("DELETE FROM schedules_upstreamend WHERE id = ANY(%s)", [[e[0] for e in ends]])
    result.consumed = len(ends)
    result.created = len(inserted)
    messages = [m for m in inserted if m is not None]
    if messages:
        try:
            send_messages(messages)
        except Exception as exc:
            logger.warning(
                "publish failed; left for the outbox sweep",
                extra={"count": len(messages), "error": type(exc).__name__},
            )
        else:
            stamp_published(messages)
            result.published = len(messages)
    return result


def _firings(cursor, ends: list[tuple]) -> list[_Firing]:
    cursor.execute(
        CANDIDATES_SQL,
        {
            "run_ids": [e[1] for e in ends],
            "schedule_ids": [e[2] for e in ends],
            "statuses": [e[3] for e in ends],
        },
    )
    firings: list[_Firing] = []
    for (run_id, _up, scheduled_for, down, name, mode, zone, enabled, overlap, job_id, directive_id, text,
         scope, params, statuses, now) in cursor.fetchall():  # fmt: skip
        day = None
        if mode == RunAfterMode.ALL:
            day = local_date(scheduled_for, zone)
            lo, hi = date_bounds(day, zone)
            statuses = _json(statuses)
            cursor.execute(ALL_DONE_SQL, {"downstream": down, "lo": lo, "hi": hi, "statuses": statuses})
            if not cursor.fetchone()[0]:
                continue
        firings.append(
            _Firing(
                downstream=down,
                name=name,
                upstream_run=run_id,
                dependency_date=day,
                enabled=enabled,
                overlap_policy=overlap,
                job_id=job_id,
                directive_id=directive_id,
                custom_directive_text=text or "",
                task3_scope=scope,
                params=_json(params) or {},
                now=now,
            )
        )
    # One run per (downstream, date) under `all`, even when two ends of one batch complete it.
    unique: dict[tuple, _Firing] = {}
    for f in firings:
        key = (f.downstream, f.dependency_date) if f.dependency_date else (f.downstream, f.upstream_run, None)
        unique.setdefault(key, f)
    return list(unique.values())


def _json(value):
    # Raw SQL: jsonb comes back as text (Django leaves its decoding to JSONField).
    return json.loads(value) if isinstance(value, str) else value


def _insert(cursor, firings: list[_Firing]) -> list[RunMessage | None]:
    """Launch the runs (overlap policy and job state decide, as for a slot) and insert the scheduled
    runs; runs whose scheduled run conflicted (already fired) are deleted. Returns a message per
    inserted queued run (None for an inserted skipped one)."""
    ids = sorted({f.downstream for f in firings})
    cursor.execute(UNFINISHED_SQL, {"ids": ids})
    unfinished = dict(cursor.fetchall())
    jobs = Job.objects.in_bulk({f.job_id for f in firings})
    directives = Directive.objects.in_bulk({f.directive_id for f in firings if f.directive_id})
    plans: list[tuple[_Firing, bool, str]] = []
    for f in firings:
        if not f.enabled:
            plans.append((f, False, DISABLED_REASON))
            continue
        (decision,) = decide_overlap(
            [f.now],
            overlap_policy=f.overlap_policy,
            unfinished=unfinished.get(f.downstream, 0),
            job_enabled=jobs[f.job_id].enabled,
        )
        if decision.dispatch:
            unfinished[f.downstream] = unfinished.get(f.downstream, 0) + 1
        plans.append((f, decision.dispatch, decision.reason))
    launches = [
        {
            "job": jobs[f.job_id],
            "directive": directives.get(f.directive_id) if f.directive_id else None,
            "custom_directive_text": f.custom_directive_text,
            "trigger": Trigger.DEPENDENCY,
            "task3_scope": f.task3_scope,
            "task_id": str(uuid.uuid4()),
            "params": f.params,
        }
        for f, dispatch, _ in plans
        if dispatch
    ]
    runs = iter(OrchestratorService.launch_many(launches))
    columns: dict[str, list] = {
        k: [] for k in ("schedule_ids", "run_ids", "statuses", "task_ids", "reasons", "upstream_ids", "dates")
    }
    run_of = {}
    for f, dispatch, reason in plans:
        run = next(runs) if dispatch else None
        columns["schedule_ids"].append(f.downstream)
        columns["run_ids"].append(run.pk if run else None)
        columns["statuses"].append(ScheduledRunStatus.QUEUED if run else ScheduledRunStatus.SKIPPED)
        columns["task_ids"].append(run.task_id if run else "")
        columns["reasons"].append(reason)
        columns["upstream_ids"].append(f.upstream_run)
        columns["dates"].append(f.dependency_date)
        if run is not None:
            run_of[run.pk] = (run, jobs[f.job_id], f)
    cursor.execute(INSERT_SQL, columns)
    rows = cursor.fetchall()
    kept = {run_id for _, _, run_id in rows if run_id is not None}
    orphans = [pk for pk in run_of if pk not in kept]
    if orphans:
        # Already fired (a conflict on the unique keys): never a second run.
        cursor.execute("DELETE FROM orchestrator_run WHERE id = ANY(%s)", [orphans])
    messages: list[RunMessage | None] = []
    for srid, sid, run_id in rows:
        if run_id is None:
            messages.append(None)
            logger.info("dependency skipped", extra={"schedule_id": sid, "scheduled_run_id": srid})
            continue
        run, job, f = run_of[run_id]
        messages.append(
            RunMessage.build(
                run_id=run.pk,
                task_id=run.task_id,
                job_key=job.key,
                job_queue=job.queue,
                scheduled_run_id=srid,
            )
        )
        logger.info(
            "dependency fired",
            extra={
                "schedule_id": sid,
                "scheduled_run_id": srid,
                "upstream_run_id": f.upstream_run,
                "run_id": run.pk,
                "job": job.key,
                "task_id": run.task_id,
            },
        )
    return messages
