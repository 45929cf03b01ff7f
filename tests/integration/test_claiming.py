"""The claim/lease SQL against the real PostgreSQL: who gets which due schedule, until when."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schedules.claiming import CLAIM_DUE_SQL, claim_due, release_claims, renew, seconds_until_due
from schedules.models import Schedule
from tests.scheduler_support import db_now, make_schedule, sql

pytestmark = pytest.mark.django_db


def test_claim_due__claims_due_rows_with_a_database_clock_lease():
    due = make_schedule("due")
    make_schedule("future", next_run_at=db_now() + timedelta(minutes=5))

    claims = claim_due(claimant="a:1", ttl=60, limit=10)

    assert [c.schedule_id for c in claims] == [due.pk]
    due.refresh_from_db()
    assert due.claimed_by == "a:1"
    (lease,) = sql("SELECT claimed_until - now() FROM schedules_schedule WHERE id = %s", [due.pk])[0]
    assert timedelta(seconds=59) <= lease <= timedelta(seconds=61)


def test_claim_due__skips_rows_claimed_by_others_until_the_claim_expires():
    s = make_schedule("held")
    assert claim_due(claimant="dead:1", ttl=60, limit=10)

    assert claim_due(claimant="b:2", ttl=60, limit=10) == []

    sql("UPDATE schedules_schedule SET claimed_until = now() - interval '1 second' WHERE id = %s", [s.pk])
    claims = claim_due(claimant="b:2", ttl=60, limit=10)
    assert [c.schedule_id for c in claims] == [s.pk]
    s.refresh_from_db()
    assert s.claimed_by == "b:2"


def test_claim_due__ignores_disabled_and_unscheduled_rows():
    make_schedule("disabled", enabled=False)
    make_schedule("no-next", next_run_at=None)

    assert claim_due(claimant="a:1", ttl=60, limit=10) == []


def test_claim_due__takes_at_most_limit_oldest_first():
    now = db_now()
    for i in range(5):
        make_schedule(f"s{i}", next_run_at=now - timedelta(minutes=i + 1))

    claims = claim_due(claimant="a:1", ttl=60, limit=2)

    assert [Schedule.objects.get(pk=c.schedule_id).name for c in claims] == ["s4", "s3"]
    assert len(claim_due(claimant="b:1", ttl=60, limit=10)) == 3


def test_release_and_renew__only_touch_our_own_claims():
    mine = make_schedule("mine")
    claim_due(claimant="a:1", ttl=60, limit=10)
    theirs = make_schedule("theirs")
    claim_due(claimant="b:1", ttl=60, limit=10)

    assert renew(claimant="a:1", schedule_ids=[mine.pk, theirs.pk], ttl=600) == [mine.pk]
    assert release_claims(claimant="a:1", schedule_ids=[mine.pk, theirs.pk]) == [mine.pk]
    mine.refresh_from_db()
    theirs.refresh_from_db()
    assert (mine.claimed_by, mine.claimed_until) == ("", None)
    assert theirs.claimed_by == "b:1"


def test_renew__refuses_an_expired_claim():
    s = make_schedule("expired")
    claim_due(claimant="a:1", ttl=60, limit=10)
    sql("UPDATE schedules_schedule SET claimed_until = now() - interval '1 second' WHERE id = %s", [s.pk])

    assert renew(claimant="a:1", schedule_ids=[s.pk], ttl=60) == []


def test_seconds_until_due__counts_from_the_database_clock():
    assert seconds_until_due() is None
    make_schedule("later", next_run_at=db_now() + timedelta(seconds=90))
    assert 89 <= seconds_until_due() <= 91


def test_claim_due__uses_the_due_index_and_a_primary_key_update():
    job_id = make_schedule("seed").job_id
    sql(
        """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled, schedule_type,
               interval_minutes, cron_expr, timezone, task3_scope, misfire_policy, overlap_policy,
               next_run_at, claimed_by, created_at, updated_at)
           SELECT 'bulk' || g, %s, '', true, 'interval', 1, '', 'UTC', 'allowlist', 'run_once', 'allow',
                  now() + interval '1 hour', '', now(), now() FROM generate_series(1, 5000) g""",
        [job_id],
    )
    sql("ANALYZE schedules_schedule")
    plan = "\n".join(
        row[0]
        for row in sql(
            "EXPLAIN "
            + CLAIM_DUE_SQL.replace("%(claimant)s", "'x'").replace("%(ttl)s", "1").replace("%(limit)s", "500")
        )
    )
    assert "schedule_due_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_claim_due__says_when_the_claim_it_took_over_expired():
    free = make_schedule("free")
    orphan = make_schedule("orphan")
    sql(
        "UPDATE schedules_schedule SET claimed_by = 'dead:1', claimed_until = now() - interval '3 seconds'"
        " WHERE id = %s",
        [orphan.pk],
    )
    (expired_at,) = sql("SELECT claimed_until FROM schedules_schedule WHERE id = %s", [orphan.pk])[0]

    claims = {c.schedule_id: c for c in claim_due(claimant="b:2", ttl=60, limit=10)}

    assert claims[free.pk].taken_over_at is None
    assert claims[orphan.pk].taken_over_at == expired_at
    orphan.refresh_from_db()
    assert orphan.claimed_by == "b:2"
    assert orphan.claimed_until > expired_at
