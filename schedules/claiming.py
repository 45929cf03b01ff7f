"""The claim/lease SQL and nothing else: which scheduler instance holds which due schedule, until when.

A claim is a lease on a `Schedule` row: `claimed_by` names the instance, `claimed_until` (the database
clock plus a TTL) says when another instance may take it over if the holder died. All times come from
PostgreSQL's `now()`, never the host's clock, so instances with skewed clocks still agree on what is due.

Every statement that reads or writes `claimed_by`/`claimed_until` lives here (the dispatch's lock and
its advance-and-release too), so the lease rules can be read in one place.

The NOTIFY trigger `schedule_wake_on_update` (schedules/migrations/0002_scheduler_wakeup.py) depends on
the shape of these writes: it stays silent for an UPDATE that clears `claimed_by` *and* moves
`next_run_at` in one statement (the dispatch's own advance, ADVANCE_SQL), and wakes the sleeping
schedulers for a claim given back without moving `next_run_at` (RELEASE_CLAIMS_SQL, RELEASE_ALL_SQL:
that row is still due). Splitting the advance into two statements would wake every instance on every
dispatch; folding a release into an advance would hide a row that is still due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import connection

# The due predicate is written exactly as the partial index `schedule_due_idx` is defined
# (GREATEST(next_run_at, claimed_until) WHERE enabled) so the planner range-scans it. GREATEST ignores
# NULLs: an unclaimed row sorts by next_run_at, a claimed one by the later of the two, so rows held by
# a live claim sort past now() and drop out of the scan instead of being stepped over on every tick.
# SKIP LOCKED lets instances racing for the same rows each take different ones without waiting.
# `id = ANY(ARRAY(...))` (not a bare join or `id IN (...)`) makes the outer UPDATE a primary-key lookup
# of the claimed ids; without it the planner hash-joins against a sequential scan of the whole table on
# every tick. The join with `picked` only carries each row's claim as it was before this statement:
# a claimed_until still set is an expired claim of an instance that died holding it (a release or a
# dispatch clears it), and the time that claim held the row is not lateness (schedules.dispatch).
CLAIM_DUE_SQL = """
WITH picked AS MATERIALIZED (
    SELECT id, claimed_until FROM schedules_schedule
     WHERE enabled AND GREATEST(next_run_at, claimed_until) <= now()
       AND next_run_at IS NOT NULL
     ORDER BY GREATEST(next_run_at, claimed_until)
     LIMIT %(limit)s
     FOR UPDATE SKIP LOCKED)
UPDATE schedules_schedule AS s
   SET claimed_by = %(claimant)s, claimed_until = now() + make_interval(secs => %(ttl)s)
  FROM picked
 WHERE s.id = ANY(ARRAY(SELECT id FROM picked)) AND s.id = picked.id
RETURNING s.id, s.next_run_at, picked.claimed_until
"""

# Release and renewal skip rows another session has locked, as the claim does: a row locked by an
# edit left open must not stall the loop (issue 15.4). A claim not renewed for that reason counts as
# lost to the caller; it stays ours until it expires, and is then taken over like any other.
RELEASE_CLAIMS_SQL = """
UPDATE schedules_schedule
   SET claimed_by = '', claimed_until = NULL
 WHERE id = ANY(ARRAY(SELECT id FROM schedules_schedule
                        WHERE id = ANY(%(ids)s) AND claimed_by = %(claimant)s
                        FOR UPDATE SKIP LOCKED))
RETURNING id
"""

RENEW_CLAIMS_SQL = """
UPDATE schedules_schedule
   SET claimed_until = now() + make_interval(secs => %(ttl)s)
 WHERE id = ANY(ARRAY(SELECT id FROM schedules_schedule
                        WHERE id = ANY(%(ids)s) AND claimed_by = %(claimant)s AND claimed_until > now()
                        FOR UPDATE SKIP LOCKED))
RETURNING id
"""

# When the loop should look again: the earliest instant a row becomes claimable (its slot, or the end
# of someone else's claim), read from the same index as the claim.
SECONDS_UNTIL_DUE_SQL = """
SELECT EXTRACT(EPOCH FROM (min(GREATEST(next_run_at, claimed_until)) - now()))
  FROM schedules_schedule
 WHERE enabled AND next_run_at IS NOT NULL
"""


# The dispatch's lock and claim check in one statement: only rows still claimed by us, unexpired
# (database clock), enabled. Another instance that takes over an expired claim skips this lock. SKIP
# LOCKED: a row someone else has locked (an edit in a transaction left open, a session in psql) must not
# stall the 200 schedules of the batch behind it; it is set aside as busy (STILL_CLAIMED_SQL) and retried.
LOCK_CLAIMED_SQL = """
SELECT s.id, s.name, s.schedule_type, s.interval_minutes, s.cron_expr, s.timezone, s.misfire_policy,
       s.overlap_policy, s.last_run_at, s.next_run_at, s.directive_id, s.custom_directive_text,
       s.task3_scope, s.job_id, s.jitter_seconds, s.start_at, s.end_at, s.max_runs,
       s.scheduled_run_count, s.catchup_window_seconds, s.params, now()
  FROM schedules_schedule s
 WHERE s.id = ANY(%(ids)s) AND s.enabled
   AND s.claimed_by = %(claimant)s AND s.claimed_until > now()
 ORDER BY s.id
   FOR UPDATE SKIP LOCKED
"""

# Of the rows LOCK_CLAIMED_SQL did not return, those still ours: locked by someone else (a plain read,
# which waits on no lock). The others are gone: expired and taken over, or disabled meanwhile.
STILL_CLAIMED_SQL = """
SELECT id FROM schedules_schedule
 WHERE id = ANY(%(ids)s) AND enabled AND claimed_by = %(claimant)s AND claimed_until > now()
"""

# Advance from the slots, count the runs, and release the claim, only where the claim is still ours:
# one statement (the NOTIFY trigger's exemption, see above). A schedule whose catch-up was cut by the
# per-transaction budget (`keep`) stays claimed for the next transaction. Reaching max_runs disables
# the schedule with the note "completed N runs", in the same statement that counts its last run.
ADVANCE_SQL = """
UPDATE schedules_schedule AS s
   SET last_run_at = GREATEST(s.last_run_at, v.last_run_at),
       next_run_at = v.next_run_at,
       scheduled_run_count = s.scheduled_run_count + v.runs,
       enabled = s.enabled AND NOT v.completes,
       paused_note = CASE WHEN v.completes THEN 'completed ' || (s.scheduled_run_count + v.runs) || ' runs'
                          ELSE s.paused_note END,
       paused_at = CASE WHEN v.completes THEN now() ELSE s.paused_at END,
       paused_by = CASE WHEN v.completes THEN 'scheduler' ELSE s.paused_by END,
       claimed_by = CASE WHEN v.keep THEN s.claimed_by ELSE '' END,
       claimed_until = CASE WHEN v.keep THEN s.claimed_until END,
       updated_at = now()
  FROM unnest(%(ids)s::bigint[], %(last)s::timestamptz[], %(next)s::timestamptz[], %(keep)s::boolean[],
              %(runs)s::int[], %(completes)s::boolean[])
       AS v(id, last_run_at, next_run_at, keep, runs, completes)
 WHERE s.id = v.id AND s.claimed_by = %(claimant)s
"""

# Shutdown: give back every claim this instance still holds.
RELEASE_ALL_SQL = """
UPDATE schedules_schedule SET claimed_by = '', claimed_until = NULL
 WHERE claimed_by = %(claimant)s
RETURNING id
"""


@dataclass(frozen=True)
class Claim:
    schedule_id: int
    next_run_at: datetime
    # When the claim this one took over expired (its holder died holding it); None for a free row.
    taken_over_at: datetime | None = None


def claim_due(*, claimant: str, ttl: float, limit: int) -> list[Claim]:
    """Claim up to `limit` due schedules for `claimant` for `ttl` seconds; one statement, autocommitted."""
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_DUE_SQL, {"claimant": claimant, "ttl": float(ttl), "limit": int(limit)})
        rows = cursor.fetchall()
    claims = (Claim(schedule_id=row[0], next_run_at=row[1], taken_over_at=row[2]) for row in rows)
    return sorted(claims, key=_claim_order)


def _claim_order(claim: Claim) -> tuple[datetime, int]:
    return (claim.next_run_at, claim.schedule_id)


def release_claims(*, claimant: str, schedule_ids: list[int]) -> list[int]:
    """Give back claims we hold (SIGTERM, nothing to do); returns the ids that were still ours."""
    if not schedule_ids:
        return []
    with connection.cursor() as cursor:
        cursor.execute(RELEASE_CLAIMS_SQL, {"ids": list(schedule_ids), "claimant": claimant})
        return [row[0] for row in cursor.fetchall()]


def renew(*, claimant: str, schedule_ids: list[int], ttl: float) -> list[int]:
    """Extend claims that are still ours and unexpired; ids missing from the result were lost."""
    if not schedule_ids:
        return []
    with connection.cursor() as cursor:
        cursor.execute(RENEW_CLAIMS_SQL, {"ids": list(schedule_ids), "claimant": claimant, "ttl": float(ttl)})
        return [row[0] for row in cursor.fetchall()]


def lock_claimed(schedule_ids: list[int], *, claimant: str) -> list[tuple]:
    """Lock (FOR UPDATE SKIP LOCKED) the rows among `schedule_ids` still claimed by `claimant`, with
    the columns dispatch needs and the database's `now()` last; inside the caller's transaction."""
    with connection.cursor() as cursor:
        cursor.execute(LOCK_CLAIMED_SQL, {"ids": list(schedule_ids), "claimant": claimant})
        return cursor.fetchall()


def still_claimed(schedule_ids: list[int], *, claimant: str) -> set[int]:
    """The ids among `schedule_ids` still claimed by `claimant` and unexpired (reads; waits on no lock)."""
    with connection.cursor() as cursor:
        cursor.execute(STILL_CLAIMED_SQL, {"ids": list(schedule_ids), "claimant": claimant})
        return {row[0] for row in cursor.fetchall()}


def advance_and_release(
    *,
    claimant: str,
    ids: list[int],
    last: list[datetime | None],
    next_run_at: list[datetime | None],
    keep: list[bool],
    runs: list[int],
    completes: list[bool],
) -> None:
    """ADVANCE_SQL for the locked rows of one dispatch transaction (parallel lists, one entry a row):
    `runs` counted into scheduled_run_count, `completes` (max_runs reached) disables the row."""
    with connection.cursor() as cursor:
        cursor.execute(
            ADVANCE_SQL,
            {
                "ids": ids,
                "last": last,
                "next": next_run_at,
                "keep": keep,
                "runs": runs,
                "completes": completes,
                "claimant": claimant,
            },
        )


def release_all(*, claimant: str) -> int:
    """Give back every claim `claimant` holds (shutdown); returns how many there were."""
    with connection.cursor() as cursor:
        cursor.execute(RELEASE_ALL_SQL, {"claimant": claimant})
        return cursor.rowcount


def seconds_until_due() -> float | None:
    """Seconds (database clock) until the earliest schedule becomes claimable; None if none is enabled."""
    with connection.cursor() as cursor:
        cursor.execute(SECONDS_UNTIL_DUE_SQL)
        (value,) = cursor.fetchone()
    return None if value is None else float(value)
