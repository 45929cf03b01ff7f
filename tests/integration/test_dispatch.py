"""Dispatching claimed schedules: one run per slot, misfire and overlap policies, deterministic times.

Slot math runs against the database clock; rows are aged with SQL instead of patching any clock.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from orchestrator.models import Run
from schedules import timing
from schedules.dispatch import dispatch_claimed
from schedules.models import ScheduledRun
from schedules.slots import MISSED_REASON, OVERLAP_BUFFER_REASON, OVERLAP_SKIP_REASON
from tests.scheduler_support import db_now, make_schedule, sql

GRACE = timedelta(seconds=60)
ME = "me:1"
TTL = 60.0  # the claims these tests take (the real path renews them past a third of it)


def claim(schedule, claimant: str = ME, seconds: int = 60) -> None:
    sql(
        "UPDATE schedules_schedule SET claimed_by = %s, claimed_until = now() + make_interval(secs => %s)"
        " WHERE id = %s",
        [claimant, seconds, schedule.pk],
    )


def slots_of(schedule, status: str | None = None) -> list[datetime]:
    rows = ScheduledRun.objects.filter(schedule=schedule, trigger="schedule")
    if status:
        rows = rows.filter(status=status)
    return sorted(rows.values_list("scheduled_for", flat=True))


def minute_floor(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


# --- against PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_dispatch__creates_one_queued_run_and_advances_from_the_slot():
    slot = minute_floor(db_now()) - timedelta(seconds=0)
    s = make_schedule("one", next_run_at=slot, interval_minutes=10)
    claim(s)

    result = dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    assert result.dispatched == 1
    (sr,) = ScheduledRun.objects.filter(schedule=s)
    assert (sr.scheduled_for, sr.status, sr.trigger) == (slot, "queued", "schedule")
    assert sr.run.task_id == sr.task_id
    assert sr.run.trigger == "schedule"
    assert sr.run.custom_directive_text == "0.1"
    s.refresh_from_db()
    assert s.last_run_at == slot
    assert s.next_run_at == slot + timedelta(minutes=10)
    assert (s.claimed_by, s.claimed_until) == ("", None)


@pytest.mark.django_db
def test_dispatch__does_nothing_when_the_claim_is_not_ours_any_more():
    s = make_schedule("taken")
    claim(s, claimant="other:9")
    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 0

    claim(s, claimant=ME)
    sql("UPDATE schedules_schedule SET claimed_until = now() - interval '1 second' WHERE id = %s", [s.pk])
    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 0
    assert not ScheduledRun.objects.filter(schedule=s).exists()


@pytest.mark.django_db
def test_dispatch__an_existing_slot_is_never_inserted_twice():
    slot = minute_floor(db_now())
    s = make_schedule("dup", next_run_at=slot)
    ScheduledRun.objects.create(schedule=s, scheduled_for=slot, status="queued", task_id="first")
    runs_before = Run.objects.count()
    claim(s)

    result = dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    assert result.dispatched == 0
    assert ScheduledRun.objects.filter(schedule=s, scheduled_for=slot).count() == 1
    assert Run.objects.count() == runs_before  # the run made for the conflicting slot is gone
    s.refresh_from_db()
    assert s.next_run_at == slot + timedelta(minutes=10)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("policy", "expected_queued", "expected_skipped"),
    [("run_once", 1, 0), ("skip", 0, 1), ("run_all", 4, 0)],
)
def test_dispatch__misfire_policy_after_downtime(policy, expected_queued, expected_skipped):
    now = db_now()
    first = now - timedelta(minutes=35)
    s = make_schedule(f"down-{policy}", next_run_at=first, misfire_policy=policy)
    claim(s)

    dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    latest = first + timedelta(minutes=30)
    assert len(slots_of(s, "queued")) == expected_queued
    assert len(slots_of(s, "skipped")) == expected_skipped
    assert slots_of(s)[-1] == latest
    if policy == "skip":
        sr = ScheduledRun.objects.get(schedule=s)
        assert (sr.run, sr.error_summary) == (None, MISSED_REASON)
        assert not Run.objects.filter(trigger="schedule").exists()
    s.refresh_from_db()
    assert s.last_run_at == latest
    assert s.next_run_at == first + timedelta(minutes=40)  # on the anchored grid, in the future


@pytest.mark.django_db
def test_dispatch__run_all_catches_up_at_most_100_slots():
    first = minute_floor(db_now()) - timedelta(minutes=150)
    s = make_schedule("catch-up", next_run_at=first, interval_minutes=1, misfire_policy="run_all")
    claim(s)

    dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    slots = slots_of(s, "queued")
    assert len(slots) == 100
    # The latest 100 (the last is the current minute, whichever it is by now), one minute apart.
    assert slots[-1] >= first + timedelta(minutes=150)
    assert slots == [slots[-1] - timedelta(minutes=99 - i) for i in range(100)]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("policy", "unfinished", "dispatched", "reason"),
    [
        ("skip", 1, False, OVERLAP_SKIP_REASON),
        ("buffer_one", 1, True, ""),
        ("buffer_one", 2, False, OVERLAP_BUFFER_REASON),
        ("allow", 2, True, ""),
    ],
)
def test_dispatch__overlap_policy_with_unfinished_runs(policy, unfinished, dispatched, reason):
    slot = minute_floor(db_now())
    s = make_schedule(f"overlap-{policy}-{unfinished}", next_run_at=slot, overlap_policy=policy)
    statuses = ["running", "queued"][:unfinished]
    for i, status in enumerate(statuses):
        ScheduledRun.objects.create(
            schedule=s, trigger="manual", scheduled_for=slot - timedelta(minutes=i + 1), status=status
        )
    claim(s)

    dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    sr = ScheduledRun.objects.get(schedule=s, trigger="schedule", scheduled_for=slot)
    assert (sr.status == "queued") is dispatched
    assert sr.error_summary == reason
    if not dispatched:
        assert sr.status == "skipped"
        assert sr.run is None
    s.refresh_from_db()
    assert s.last_run_at == slot


@pytest.mark.django_db(transaction=True)
def test_dispatch__enable_computes_from_now_so_slots_missed_while_disabled_do_not_run(redis_client):
    # A schedule disabled for an hour: enabling sets next_run_at from now (docs/ARCHITECTURE.md, "API
    # conventions"), so no catch-up.
    from schedules.models import Schedule

    now = db_now()
    s = make_schedule(
        "was-off", enabled=False, next_run_at=now - timedelta(hours=1), misfire_policy="run_all"
    )
    try:
        from schedules.services import enable_schedule  # the API's service, when present
    except ImportError:
        enable_schedule = None
    if enable_schedule is not None:
        enable_schedule(s)
    else:
        Schedule.objects.filter(pk=s.pk).update(
            enabled=True, next_run_at=timing.first_slot(timing.spec_of(s), now=now)
        )
    s.refresh_from_db()
    assert s.enabled
    assert s.next_run_at > now
    claim(s)
    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 0
    assert not ScheduledRun.objects.filter(schedule=s).exists()


@pytest.mark.django_db(transaction=True)
def test_dispatch_claimed__batches_publish_after_commit_with_the_run_task_id(redis_client):
    now = db_now()
    schedules = [make_schedule(f"b{i}", next_run_at=now - timedelta(seconds=5)) for i in range(30)]
    for s in schedules:
        claim(s)

    result = dispatch_claimed([s.pk for s in schedules], claimant=ME, grace=GRACE, ttl=60)

    assert (result.dispatched, result.published) == (30, 30)
    assert redis_client.llen("jobs.sleep") == 30
    messages = [json.loads(raw) for raw in redis_client.lrange("jobs.sleep", 0, -1)]
    by_task = {m["headers"]["id"]: m for m in messages}
    for sr in ScheduledRun.objects.filter(schedule__in=schedules).select_related("run"):
        assert sr.published_at is not None
        assert sr.run.published_at is not None
        header = by_task[sr.task_id]["headers"]
        assert header["task"] == "worker.execute_run"
        kwargs = json.loads(header["kwargsrepr"].replace("'", '"').replace("None", "null"))
        assert kwargs == {"run_id": sr.run_id, "scheduled_run_id": sr.pk, "job_key": "sleep"}


# --- outbox sweep ----------------------------------------------------------------------------------


def _queued_ids(redis_client) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange("jobs.sleep", 0, -1)]


@pytest.mark.django_db(transaction=True)
def test_sweep__publishes_a_committed_run_whose_publish_never_happened(redis_client):
    from schedules.publishing import sweep_outbox

    s = make_schedule("crashed-before-publish")
    run = Run.objects.create(job=s.job, trigger="schedule", task_id="t-crash", custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id="t-crash")

    assert sweep_outbox(grace=60, republish_after=300).published == 0  # within grace: its own publish
    sql("UPDATE schedules_scheduledrun SET created_at = now() - interval '2 minutes' WHERE id = %s", [sr.pk])
    assert sweep_outbox(grace=60, republish_after=300).published == 1

    assert _queued_ids(redis_client) == ["t-crash"]
    sr.refresh_from_db()
    assert sr.published_at is not None
    assert sweep_outbox(grace=60, republish_after=300).published == 0  # once


def _age(sr, *, created: str, published: str) -> None:
    """Move a scheduled run's created_at and published_at into the past (database clock)."""
    sql(
        "UPDATE schedules_scheduledrun SET created_at = now() - %s::interval,"
        " published_at = now() - %s::interval WHERE id = %s",
        [created, published, sr.pk],
    )


@pytest.mark.django_db(transaction=True)
def test_sweep__republishes_a_run_published_long_ago_whose_start_gate_is_closed_backing_off(redis_client):
    """No look inside the broker: published long ago and still `queued` is enough (issue 15.8); the
    wait before the next copy doubles with the run's age, so a message waiting in a long queue gets a
    few copies, not one per sweep."""
    from schedules.dispatch import message_for
    from schedules.publishing import publish_messages, sweep_outbox

    s = make_schedule("lost")
    run = Run.objects.create(job=s.job, trigger="schedule", task_id="t-lost", custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id="t-lost")
    publish_messages([message_for(s.job, run, sr)])
    redis_client.delete("jobs.sleep")  # the message is lost (a purge, a broker restart)

    _age(sr, created="4 minutes", published="4 minutes")
    assert sweep_outbox(grace=60, republish_after=300).published == 0  # not long ago yet

    # Published at age 0, now 10 minutes old: sent again, same task id.
    _age(sr, created="10 minutes", published="10 minutes")
    result = sweep_outbox(grace=60, republish_after=300)
    assert (result.published, result.republished) == (1, 1)
    assert _queued_ids(redis_client) == ["t-lost"]
    assert sweep_outbox(grace=60, republish_after=300).published == 0  # once

    # Last published at age 10 minutes: the next copy waits 10 minutes, not republish_after (5).
    _age(sr, created="16 minutes", published="6 minutes")
    assert sweep_outbox(grace=60, republish_after=300).published == 0
    _age(sr, created="21 minutes", published="11 minutes")
    assert sweep_outbox(grace=60, republish_after=300).published == 1
    assert _queued_ids(redis_client) == ["t-lost", "t-lost"]


@pytest.mark.django_db(transaction=True)
def test_sweep__never_republishes_a_run_whose_start_gate_opened(redis_client):
    """A run a worker started (or parked as throttled) is not a lost message, however old."""
    from schedules.publishing import sweep_outbox
    from schedules.runstate import run_mark_throttled, run_start

    s = make_schedule("started")
    runs = []
    for name in ("t-started", "t-throttled", "t-manual-throttled"):
        run = Run.objects.create(job=s.job, trigger="schedule", task_id=name, custom_directive_text="0.1")
        runs.append(run)
    started = ScheduledRun.objects.create(
        schedule=s, run=runs[0], scheduled_for=db_now(), task_id="t-started"
    )
    throttled = ScheduledRun.objects.create(
        schedule=s, run=runs[1], scheduled_for=db_now() - timedelta(minutes=10), task_id="t-throttled"
    )
    assert run_start(runs[0].pk, started.pk, worker="w:1", lease_seq=None) == 1
    run_mark_throttled(runs[1].pk, throttled.pk, "waiting: cap")
    run_mark_throttled(runs[2].pk, None, "waiting: cap")
    for sr in (started, throttled):
        _age(sr, created="1 hour", published="1 hour")
    sql(
        "UPDATE orchestrator_run SET created_at = now() - interval '1 hour',"
        " published_at = now() - interval '1 hour'"
    )

    assert sweep_outbox(grace=60, republish_after=300).published == 0
    assert _queued_ids(redis_client) == []


@pytest.mark.django_db(transaction=True)
def test_sweep__a_sweeper_killed_between_its_take_and_the_publish_leaves_the_row_due_after_grace(
    redis_client,
):
    """The take's provisional stamp: due again `grace` seconds later, not after the next doubling."""
    from schedules import publishing

    s = make_schedule("killed-sweeper")
    run = Run.objects.create(job=s.job, trigger="schedule", task_id="t-killed", custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id="t-killed")
    params = {"grace": 60.0, "republish_after": 300.0, "limit": 1000}
    internal = {**params, "backlog_after": 300.0, "drained_jobs": []}
    for created in ("2 minutes", "3 hours"):  # both branches of the provisional stamp
        sql(
            "UPDATE schedules_scheduledrun SET created_at = now() - %s::interval, published_at = NULL"
            " WHERE id = %s",
            [created, sr.pk],
        )
        picked = publishing._sweep_candidates(internal, include_manual=False)
        assert len(publishing._take(picked, internal)) == 1  # ... and the sweeper dies here
        assert publishing.sweep_outbox(**params).published == 0
        # 61 seconds later (both stamps moved back rather than the clock forward):
        sql(
            "UPDATE schedules_scheduledrun SET created_at = created_at - interval '61 seconds',"
            " published_at = published_at - interval '61 seconds' WHERE id = %s",
            [sr.pk],
        )
        assert publishing.sweep_outbox(**params).published == 1
    assert _queued_ids(redis_client) == ["t-killed", "t-killed"]


@pytest.mark.django_db(transaction=True)
def test_sweep__publishes_a_manual_api_run_whose_publish_failed(redis_client):
    from schedules.publishing import sweep_outbox

    job = make_schedule("for-job").job
    run = Run.objects.create(job=job, trigger="manual", task_id="t-manual", custom_directive_text="0.1")
    sql("UPDATE orchestrator_run SET created_at = now() - interval '2 minutes' WHERE id = %s", [run.pk])

    assert sweep_outbox(grace=60, republish_after=300).published == 1
    assert _queued_ids(redis_client) == ["t-manual"]
    run.refresh_from_db()
    assert run.published_at is not None


@pytest.mark.django_db(transaction=True)
def test_run_now_and_manual_launch__still_publish_after_commit(redis_client):
    from schedules.dispatch import run_now
    from schedules.services import launch_run_manually

    s = make_schedule("manual", enabled=False)
    sr = run_now(s)
    run = launch_run_manually(job=s.job, custom_directive_text="0.2", task3_scope="allowlist")
    assert sorted(_queued_ids(redis_client)) == sorted([sr.task_id, run.task_id])


@pytest.mark.django_db(transaction=True)
def test_run_now__its_message_names_the_limits_and_the_schedule_and_both_rows_are_stamped_published(
    redis_client, settings
):
    """Run-now publishes a message that carries its job's time limits (the worker applies them per
    message) and its schedule's name (Flower shows it), and stamps the run and its scheduled run as
    published (the outbox sweep republishes only what was not)."""
    from schedules.dispatch import run_now
    from schedules.models import Schedule

    settings.WORKER_HARD_LIMIT_GRACE_SECONDS = 30
    s = Schedule.objects.select_related("job", "directive").get(pk=make_schedule("rn-cost").pk)
    sr = run_now(s)
    (raw,) = redis_client.lrange("jobs.sleep", 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["id"] == sr.task_id
    assert headers["timelimit"] == [s.job.timeout_seconds + 30.0, float(s.job.timeout_seconds)]
    assert headers["shadow"] == "sleep: rn-cost"
    sr.refresh_from_db()
    assert sr.published_at is not None
    assert Run.objects.get(pk=sr.run_id).published_at is not None


# --- the loop: a dead claimant's claim taken over (issue 15.1) -------------------------------------


def _pass_of(claimant: str, ttl: float):
    from project.celery import app
    from schedules.beat import DatabaseScheduler

    scheduler = DatabaseScheduler(app=app, claimant=claimant, claim_ttl=ttl, interval=30, lazy=True)
    return scheduler.run_pass


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("policy", ["skip", "run_once"])
def test_run_pass__slots_a_dead_claimant_held_are_dispatched_not_skipped(policy, redis_client):
    # Slots 125, 65 and 5 s ago; an instance claimed the first 4 s late (TTL 120) and was SIGKILLed:
    # its claim expired a second ago. Schedulers were healthy all along, so nothing was missed.
    s = make_schedule(f"handover-{policy}", interval_minutes=1, misfire_policy=policy)
    sql(
        "UPDATE schedules_schedule SET next_run_at = now() - interval '125 seconds',"
        " claimed_by = 'dead:1', claimed_until = now() - interval '1 second' WHERE id = %s",
        [s.pk],
    )
    (first,) = sql("SELECT next_run_at FROM schedules_schedule WHERE id = %s", [s.pk])[0]

    _pass_of(ME, ttl=120)()

    assert slots_of(s, "queued") == [first + timedelta(minutes=m) for m in (0, 1, 2)]
    assert slots_of(s, "skipped") == []
    s.refresh_from_db()
    assert (s.claimed_by, s.next_run_at) == ("", first + timedelta(minutes=3))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("policy", "queued", "skipped"), [("skip", 0, 1), ("run_once", 1, 0), ("run_all", 6, 0)]
)
def test_run_pass__a_downtime_after_a_dead_claim_is_still_missed(policy, queued, skipped, redis_client):
    # The dead claim expired 10 minutes ago and nobody ran since: the slots 700, 580, .. 100 s ago
    # are all missed.
    s = make_schedule(f"down-after-handover-{policy}", interval_minutes=2, misfire_policy=policy)
    sql(
        "UPDATE schedules_schedule SET next_run_at = now() - interval '700 seconds',"
        " claimed_by = 'dead:1', claimed_until = now() - interval '600 seconds' WHERE id = %s",
        [s.pk],
    )

    _pass_of(ME, ttl=120)()

    assert len(slots_of(s, "queued")) == queued
    assert len(slots_of(s, "skipped")) == skipped


# --- no unbounded wait on a lock (issue 15.4) ------------------------------------------------------


def _other_session():
    import psycopg2
    from django.db import connection

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    return psycopg2.connect(**params)


@pytest.mark.django_db(transaction=True)
def test_dispatch_claimed__a_row_another_session_locked_after_the_claim_does_not_stall_the_batch(
    redis_client,
):
    import threading

    from django.db import connection

    from schedules.claiming import claim_due

    schedules = [make_schedule(f"lk{i}", next_run_at=db_now() - timedelta(seconds=5)) for i in range(3)]
    ids = [c.schedule_id for c in claim_due(claimant=ME, ttl=60, limit=10)]
    assert sorted(ids) == [s.pk for s in schedules]
    locked = schedules[1]
    blocker = _other_session()
    outcome: dict = {}

    def dispatch() -> None:
        try:
            outcome["result"] = dispatch_claimed(ids, claimant=ME, grace=GRACE, ttl=60)
        finally:
            connection.close()

    try:
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM schedules_schedule WHERE id = %s FOR UPDATE", [locked.pk])
        worker = threading.Thread(target=dispatch, daemon=True)
        worker.start()
        worker.join(timeout=15)
        assert not worker.is_alive(), "dispatch waited on the locked row"
    finally:
        blocker.rollback()
        blocker.close()
        worker.join(timeout=30)

    result = outcome["result"]
    assert (result.dispatched, result.busy, result.lost) == (2, [locked.pk], [])
    assert [len(slots_of(s)) for s in schedules] == [1, 0, 1]
    locked.refresh_from_db()
    assert locked.claimed_by == ME  # still ours: retried, not given up

    assert dispatch_claimed([locked.pk], claimant=ME, grace=GRACE, ttl=60).dispatched == 1
    assert len(slots_of(locked)) == 1


def _stale_published_run(name: str, task_id: str):
    from schedules.dispatch import message_for
    from schedules.publishing import publish_messages

    s = make_schedule(name)
    run = Run.objects.create(job=s.job, trigger="schedule", task_id=task_id, custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id=task_id)
    publish_messages([message_for(s.job, run, sr)])
    _age(sr, created="10 minutes", published="10 minutes")
    return sr


@pytest.mark.django_db(transaction=True)
def test_sweep__holds_no_row_lock_while_it_publishes(redis_client, monkeypatch):
    import psycopg2

    from schedules import publishing

    sr = _stale_published_run("sweep-no-lock", "t-nolock")
    redis_client.flushdb()  # the message is lost: the sweep republishes it
    seen: dict = {}
    real = publishing.send_messages

    def publish_while_another_session_locks(*args, **kwargs):
        other = _other_session()
        try:
            with other.cursor() as cursor:
                cursor.execute(
                    "SELECT 1 FROM schedules_scheduledrun WHERE id = %s FOR UPDATE NOWAIT", [sr.pk]
                )
            seen["lockable"] = True
        except psycopg2.errors.LockNotAvailable:
            seen["lockable"] = False
        finally:
            other.rollback()
            other.close()
        return real(*args, **kwargs)

    monkeypatch.setattr(publishing, "send_messages", publish_while_another_session_locks)
    assert publishing.sweep_outbox(grace=60, republish_after=300).published == 1
    assert seen == {"lockable": True}
    assert _queued_ids(redis_client) == ["t-nolock"]


@pytest.mark.django_db(transaction=True)
def test_sweep__a_row_another_sweeper_took_meanwhile_is_not_published_again(redis_client, monkeypatch):
    from schedules import publishing

    sr = _stale_published_run("sweep-raced", "t-raced")
    redis_client.flushdb()
    real = publishing._sweep_candidates

    def another_sweeper_publishes_first(*args, **kwargs):
        picked = real(*args, **kwargs)
        sql("UPDATE schedules_scheduledrun SET published_at = now() WHERE id = %s", [sr.pk])
        return picked

    monkeypatch.setattr(publishing, "_sweep_candidates", another_sweeper_publishes_first)
    assert publishing.sweep_outbox(grace=60, republish_after=300).published == 0
    assert _queued_ids(redis_client) == []


@pytest.mark.django_db(transaction=True)
def test_sweep__a_failed_publish_leaves_the_row_as_it_was_for_the_next_sweep(redis_client, monkeypatch):
    from schedules import publishing

    s = make_schedule("sweep-fails")
    run = Run.objects.create(job=s.job, trigger="schedule", task_id="t-fail", custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id="t-fail")
    sql("UPDATE schedules_scheduledrun SET created_at = now() - interval '2 minutes' WHERE id = %s", [sr.pk])

    def broker_down(messages):
        raise ConnectionError("redis down")

    monkeypatch.setattr(publishing, "send_messages", broker_down)
    assert publishing.sweep_outbox(grace=60, republish_after=300).failed == 1
    sr.refresh_from_db()
    assert sr.published_at is None
    monkeypatch.undo()
    assert publishing.sweep_outbox(grace=60, republish_after=300).published == 1
    assert _queued_ids(redis_client) == ["t-fail"]
