"""The claim/lease SQL and nothing else: which scheduler instance holds which due schedule, until when.

A claim is a lease on a `Schedule` row: `claimed_by` names the instance, `claimed_until` (the database
clock plus a TTL) says when another instance may take it over if the holder died. All times come from
PostgreSQL's `now()`, never the host's clock, so instances with skewed clocks still agree on what is due.
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


def seconds_until_due() -> float | None:
    """Seconds (database clock) until the earliest schedule becomes claimable; None if none is enabled."""
    with connection.cursor() as cursor:
        cursor.execute(SECONDS_UNTIL_DUE_SQL)
        (value,) = cursor.fetchone()
    return None if value is None else float(value)
