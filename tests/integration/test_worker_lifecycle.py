"""The run lifecycle's state side (schedules/runstate.py): at-most-once start, fenced writes, the
lease-based reaper, recorded outcomes, re-publishing."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.utils import timezone

from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService
from project.celery import app as celery_app
from schedules import runleases, runstate
from schedules.models import Schedule, ScheduledRun
from tests.support import wait_for
from worker import heartbeat as beats
from worker import lifecycle, parent, reaper
from worker.caps import caps_for, park_message, waiter_id, wake

pytestmark = pytest.mark.django_db


@pytest.fixture
def sleep_job():
    return Job.objects.get(key="sleep")


@pytest.fixture
def schedule(sleep_job):
    return Schedule.objects.create(
        name="life", job=sleep_job, schedule_type="interval", interval_minutes=5, max_per_job=2, max_global=3
    )


def _scheduled_run(schedule) -> ScheduledRun:
    run = OrchestratorService.launch(job=schedule.job, trigger="schedule", task3_scope="allowlist")
    return ScheduledRun.objects.create(
        schedule=schedule, run=run, trigger="schedule", scheduled_for=timezone.now(), task_id=run.task_id
    )


def _age(table: str, column: str, pk: int, seconds: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET {column} = now() - make_interval(secs => %s) WHERE id = %s", [seconds, pk]
        )


def test_caps_for__schedule_then_job_then_global_default(schedule, sleep_job, settings):
    settings.SCHEDULER_MAX_GLOBAL = 7
    assert [(c.scope, c.limit) for c in caps_for(sleep_job, schedule)] == [
        (f"schedule:{schedule.pk}", 1),  # overlap_policy buffer_one: one run of the schedule at a time
        ("job:sleep", 2),
        ("global", 3),
    ]
    schedule.overlap_policy = "allow"
    assert [c.scope for c in caps_for(sleep_job, schedule)] == ["job:sleep", "global"]
    sleep_job.max_concurrency = 4
    assert [(c.scope, c.limit) for c in caps_for(sleep_job, None)] == [
        ("job:sleep", 4),
        ("global", 7),
    ]
    sleep_job.max_concurrency = None
    assert [(c.scope, c.limit) for c in caps_for(sleep_job, None)] == [("global", 7)]


def test_run_start__takes_a_run_once(schedule):
    scheduled = _scheduled_run(schedule)
    runstate.run_mark_throttled(scheduled.run_id, scheduled.pk, "waiting: per-job cap 2/2 for sleep")
    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("throttled", "waiting: per-job cap 2/2 for sleep")
    assert Run.objects.get(pk=scheduled.run_id).waiting_since is not None

    assert runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1) == 1
    assert runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:2", lease_seq=1) is None
    scheduled.refresh_from_db()
    run = Run.objects.get(pk=scheduled.run_id)
    assert (run.status, run.attempt, run.worker, run.error_summary) == ("running", 1, "w@h:1", "")
    assert run.waiting_since is None, "a started run no longer waits"
    assert (scheduled.status, scheduled.worker) == ("running", "w@h:1")
    assert scheduled.started_at is not None


def test_run_start__refuses_a_slot_settled_elsewhere(schedule):
    scheduled = _scheduled_run(schedule)
    ScheduledRun.objects.filter(pk=scheduled.pk).update(status="skipped")
    assert runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1) is None
    assert Run.objects.get(pk=scheduled.run_id).status == "queued"


def test_writes_after_start__are_fenced_by_attempt(schedule):
    scheduled = _scheduled_run(schedule)
    attempt = runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1)
    assert not runstate.run_heartbeat(scheduled.run_id, scheduled.pk, attempt + 1)
    assert not runstate.run_finish(scheduled.run_id, scheduled.pk, status="succeeded", attempt=attempt + 1)
    assert runstate.run_finish(scheduled.run_id, scheduled.pk, status="succeeded", attempt=attempt, stats={})
    scheduled.refresh_from_db()
    assert scheduled.status == "succeeded"
    # A late outcome from anyone changes nothing.
    assert not runstate.run_finish(scheduled.run_id, scheduled.pk, status="failed", attempt=attempt)
    assert not runstate.run_heartbeat(scheduled.run_id, scheduled.pk, attempt)


def _trust_liveness(redis_client) -> None:
    """Age the liveness epoch past a lease, as if Redis had kept its data for long."""
    redis_client.set(runleases.EPOCH_KEY, 0)


def test_reaper__fails_only_runs_whose_lease_expired(schedule, settings, redis_client):
    """A stale database heartbeat alone condemns nobody: the Redis lease decides (docs/ARCHITECTURE.md,
    guarantee 7)."""
    settings.WORKER_LEASE_SECONDS = 60
    lost, alive, fresh = _scheduled_run(schedule), _scheduled_run(schedule), _scheduled_run(schedule)
    for n, scheduled in enumerate((lost, alive, fresh)):
        runstate.run_start(scheduled.run_id, scheduled.pk, worker=f"w@h:{n}", lease_seq=1)
    for scheduled in (lost, alive):
        _age("orchestrator_run", "heartbeat_at", scheduled.run_id, 61)
    # `alive` could not stamp its heartbeat (the database was away) but its worker renews its lease.
    redis_client.set(runleases.run_lease_key(alive.run_id), "owner", px=60_000)
    _trust_liveness(redis_client)

    assert runstate.reap_lost_runs() == [lost.run_id]
    assert runstate.reap_lost_runs() == []  # once, whoever gets there first
    lost.refresh_from_db()
    assert (lost.status, lost.error_summary) == ("failed", "worker lost (lease of 60s expired)")
    assert Run.objects.get(pk=lost.run_id).status == "failed"
    # Its task's result says so through the result backend (a task whose worker died stores nothing).
    meta = celery_app.backend.get_task_meta(lost.task_id)
    assert meta["status"] == "FAILURE"
    assert str(meta["result"]) == "worker lost (lease of 60s expired)"
    assert Run.objects.get(pk=alive.run_id).status == "running"
    assert Run.objects.get(pk=fresh.run_id).status == "running"


def test_reaper__after_redis_lost_its_data_waits_a_lease_before_trusting_absence(
    schedule, settings, redis_client
):
    settings.WORKER_LEASE_SECONDS = 1
    scheduled = _scheduled_run(schedule)
    runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1)
    _age("orchestrator_run", "heartbeat_at", scheduled.run_id, 61)
    redis_client.flushdb()  # every liveness key gone at once, live runs' too
    assert runstate.reap_lost_runs() == []  # live runs put theirs back within a quarter lease
    wait_for(lambda: runstate.reap_lost_runs() == [scheduled.run_id], timeout=10, what="reaped after a lease")


def test_reaper__writes_a_recorded_outcome_instead_of_worker_lost(schedule, settings, redis_client):
    """A run that ended while PostgreSQL was away gets its own outcome, written once."""
    settings.WORKER_LEASE_SECONDS = 60
    scheduled = _scheduled_run(schedule)
    attempt = runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1)
    _age("orchestrator_run", "heartbeat_at", scheduled.run_id, 61)
    _trust_liveness(redis_client)
    runleases.outcome_record(
        run_id=scheduled.run_id,
        scheduled_run_id=scheduled.pk,
        status="succeeded",
        error_summary="",
        stats={"tasks": {}},
        attempt=attempt,
        task_id=scheduled.task_id,
    )
    # A later record (the parent's "time limit", say) does not replace the first.
    assert not runleases.outcome_record(
        run_id=scheduled.run_id,
        scheduled_run_id=None,
        status="failed",
        error_summary="x",
        stats=None,
        worker="w@h:1",
    )
    assert runstate.reap_lost_runs() == []
    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("succeeded", "")
    assert Run.objects.get(pk=scheduled.run_id).status == "succeeded"
    assert runleases.outcomes_pending() == {}
    # Its task stored nothing (the database was away): the result backend has it from the reaper.
    assert celery_app.backend.get_task_meta(scheduled.task_id)["status"] == "SUCCESS"


@pytest.mark.django_db(transaction=True)
def test_reaper__skips_a_run_whose_row_another_session_holds(schedule, settings, redis_client):
    """A worker's finish blocked on a row lock must not stall every scheduler's loop behind it."""
    import psycopg2

    settings.WORKER_LEASE_SECONDS = 60
    scheduled = _scheduled_run(schedule)
    runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1)
    _age("orchestrator_run", "heartbeat_at", scheduled.run_id, 61)
    _trust_liveness(redis_client)
    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    other = psycopg2.connect(**params)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT 1 FROM orchestrator_run WHERE id = %s FOR UPDATE", [scheduled.run_id])
            assert runstate.reap_lost_runs() == []
        other.rollback()
    finally:
        other.close()
    assert runstate.reap_lost_runs() == [scheduled.run_id]


def test_stalled_throttled_runs__are_republished_once_unless_parked(schedule, settings, redis_client):
    from worker import semaphore

    settings.WORKER_LEASE_SECONDS = 3
    settings.WORKER_THROTTLE_MAX_SECONDS = 1
    scheduled, parked = _scheduled_run(schedule), _scheduled_run(schedule)
    for item in (scheduled, parked):
        runstate.run_mark_throttled(item.run_id, item.pk, "waiting: global cap 3/3")
    assert reaper.republish_stalled_throttled() == 0  # not late yet
    cap = caps_for(schedule.job, schedule)[-1]
    for n in range(3):
        semaphore.semaphore_acquire(
            [cap], owner=f"h{n}", waiter=f"h{n}", due=timezone.now(), run_id=1000 + n, floor=0
        )
    grant = semaphore.semaphore_acquire(
        [cap],
        owner="p",
        waiter=waiter_id(parked.run_id),
        due=timezone.now(),
        run_id=parked.run_id,
        floor=0,
        park="{}",
    )
    assert not grant.acquired

    for item in (scheduled, parked):
        _age("orchestrator_run", "published_at", item.run_id, 3600)
    before = redis_client.llen("jobs.sleep")
    # The parked one waits for a release (or the parked sweep); only the other has nobody to wake it.
    assert reaper.republish_stalled_throttled() == 1
    assert redis_client.llen("jobs.sleep") == before + 1
    assert reaper.republish_stalled_throttled() == 0


def test_wake__publishes_with_the_limits_and_name_its_parked_message_carries(
    schedule, sleep_job, redis_client, django_assert_num_queries
):
    import json
    from dataclasses import asdict

    from schedules.dispatch import message_for
    from schedules.publishing import time_limits

    first, second = _scheduled_run(schedule), _scheduled_run(schedule)

    def park(item, limits=(75.0, 60.0)):
        return park_message(
            message_for(sleep_job, item.run, item), limits=limits, schedule_name=schedule.name
        )

    def newest() -> dict:
        return json.loads(redis_client.lindex("jobs.sleep", 0))["headers"]  # LPUSH: the newest first

    # What the parking delivery read travels with the run: its wake-up reads nothing.
    with django_assert_num_queries(0):
        assert wake([park(first), park(second)]) == 2
    assert newest()["timelimit"] == [75.0, 60.0]
    assert newest()["shadow"] == "sleep: life"
    # A message parked by an older worker carries neither: both are read, as at any publish.
    old = json.dumps(asdict(message_for(sleep_job, first.run, first)))
    with django_assert_num_queries(2):
        assert wake([old]) == 1
    assert newest()["timelimit"] == list(time_limits(sleep_job.timeout_seconds))
    # Two parkings of one job that disagree (its limits were edited between them): the current ones.
    with django_assert_num_queries(1):
        assert wake([park(first), park(second, limits=(15.0, 10.0))]) == 2
    assert newest()["timelimit"][1] == float(sleep_job.timeout_seconds)


def test_run_mark_throttled__writes_once_per_wait(schedule):
    scheduled = _scheduled_run(schedule)
    runstate.run_mark_throttled(scheduled.run_id, scheduled.pk, "waiting: per-job cap 2/2 for sleep")
    first = Run.objects.values_list("published_at", flat=True).get(pk=scheduled.run_id)
    runstate.run_mark_throttled(scheduled.run_id, scheduled.pk, "waiting: global cap 3/3")
    run = Run.objects.get(pk=scheduled.run_id)
    scheduled.refresh_from_db()
    assert (run.error_summary, run.published_at, run.waiting_since) == (
        "waiting: per-job cap 2/2 for sleep",
        first,
        first,
    )
    assert (scheduled.status, scheduled.error_summary) == ("throttled", "waiting: per-job cap 2/2 for sleep")


def test_worker_queues__every_enabled_job_by_default_or_the_named_ones(sleep_job):
    from worker.routing import UnknownJobs, route_run, worker_queue_names

    everything = worker_queue_names()
    assert {"jobs.sleep", "jobs.log_triage"} <= set(everything)
    Job.objects.filter(key="log_triage").update(enabled=False)
    assert "jobs.log_triage" not in worker_queue_names()
    assert worker_queue_names(["sleep"]) == ["jobs.sleep"]
    with pytest.raises(UnknownJobs, match="log_triage, nope"):
        worker_queue_names(["sleep", "log_triage", "nope"])
    assert route_run("worker.execute_run", (), {"job_key": "sleep"}, {})["queue"] == "jobs.sleep"
    assert route_run("other.task", (), {"job_key": "sleep"}, {}) is None


def _heartbeat(caps, fence, run_id=1):
    return beats.Heartbeat(
        run_id=run_id, scheduled_run_id=None, attempt=1, caps=caps, owner="ours", fence=fence
    )


def test_heartbeat__renews_the_leases_whatever_the_database_does(settings, redis_client):
    """The lease thread talks to Redis only: a PostgreSQL outage longer than a lease frees no slot."""
    from orchestrator.services import TaskFence
    from worker.semaphore import Cap, semaphore_holders

    settings.WORKER_LEASE_SECONDS = 30
    cap = Cap(scope="job:sleep", limit=1, label="per-job cap", subject="sleep")
    heartbeat = _heartbeat([cap], TaskFence())
    redis_client.flushdb()  # the lease gone, as if it had lapsed
    heartbeat.renew()
    assert not heartbeat.fence.reason
    assert semaphore_holders(cap) == ["ours"]
    assert redis_client.get(runleases.run_lease_key(1)) == b"ours"


def test_heartbeat__kills_the_run_when_its_slot_went_to_another(settings, redis_client):
    from orchestrator.services import TaskFence
    from worker.semaphore import Cap, semaphore_acquire

    settings.WORKER_LEASE_SECONDS = 30
    cap = Cap(scope="job:sleep", limit=1, label="per-job cap", subject="sleep")
    fence = TaskFence()
    heartbeat = _heartbeat([cap], fence)
    redis_client.flushdb()
    assert semaphore_acquire(
        [cap], owner="other", waiter="other", due=timezone.now(), run_id=2, floor=0
    ).acquired
    heartbeat.renew()
    assert fence.reason == "lease lost: per-job cap slot taken by another run"


def test_heartbeat__kills_the_run_before_an_unreachable_redis_lets_its_lease_lapse(settings, monkeypatch):
    import redis

    from orchestrator.services import TaskFence

    settings.WORKER_LEASE_SECONDS = 10
    fence = TaskFence()
    heartbeat = _heartbeat([], fence)

    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("refused")

    monkeypatch.setattr(beats, "semaphore_renew", unreachable)
    heartbeat.renew()
    assert not fence.reason  # just renewed at the grant: far from the deadline
    heartbeat.last_renewed -= beats.FENCE_AFTER * 10
    heartbeat.renew()
    assert fence.reason.startswith("lease lost: Redis unreachable for 6s")


def test_heartbeat__a_database_beat_that_hangs_holds_up_no_lease_renewal(settings, monkeypatch):
    """The two loops share a run, not a lock: a heartbeat UPDATE stuck on a cut database (for longer
    than a lease) must not stop the renewals that keep the run alive in Redis (the reaper would fail a
    live run), and leaving the block does not wait for it."""
    import threading

    from orchestrator.services import TaskFence
    from worker.semaphore import Renewal

    settings.WORKER_LEASE_SECONDS = 0.4  # a beat every 0.1 s
    stuck, release = threading.Event(), threading.Event()
    renewals: list[float] = []

    def hanging_heartbeat(*args, **kwargs):
        stuck.set()
        release.wait(10)
        return True

    def counted_renew(*args, **kwargs):
        renewals.append(time.monotonic())
        return Renewal(renewed=1, reasserted=0, lost=None)

    monkeypatch.setattr(beats.runstate, "run_heartbeat", hanging_heartbeat)
    monkeypatch.setattr(beats, "semaphore_renew", counted_renew)
    fence = TaskFence()
    try:
        with _heartbeat([], fence, run_id=7):
            assert stuck.wait(5), "the database beat never ran"
            blocked_at = time.monotonic()
            deadline = blocked_at + 5
            while time.monotonic() < deadline and len([t for t in renewals if t > blocked_at]) < 5:
                time.sleep(0.02)
            left = time.monotonic()
        assert len([t for t in renewals if t > blocked_at]) >= 5, renewals
        assert time.monotonic() - left < 1, "leaving waited for the stuck database beat"
        assert not fence.reason
    finally:
        release.set()


def _fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_load_delivery__the_run_its_scheduled_run_and_what_they_need_loaded_with_the_lease_floor(
    schedule, sleep_job, django_assert_num_queries
):
    """What a delivery reads before its start gate: the rows as the database has them (JSON decoded),
    the related rows the lifecycle uses already loaded, and the lease floor of running runs."""
    from orchestrator.models import Directive
    from worker.loading import load_delivery

    directive = Directive.objects.create(key="d-load", name="d", text="seconds=0", job=sleep_job)
    sleep_job.task3_allowlist = ["a", "b"]
    sleep_job.save()
    scheduled = _scheduled_run(schedule)
    Run.objects.filter(pk=scheduled.run_id).update(directive=directive, stats={"tasks": {"x": 1}})
    bare = OrchestratorService.launch(job=sleep_job)  # no directive, no scheduled run
    running = OrchestratorService.launch(job=sleep_job)
    Run.objects.filter(pk=running.pk).update(status="running", lease_seq=41)

    run, got, floor = load_delivery(scheduled.run_id, scheduled.pk)
    assert floor == 41 == runstate.running_lease_floor()
    want = ScheduledRun.objects.get(pk=scheduled.pk)
    assert _fields(got) == _fields(want)
    assert got.run is run
    assert _fields(run) == _fields(Run.objects.get(pk=scheduled.run_id))
    assert run.stats == {"tasks": {"x": 1}}
    with django_assert_num_queries(0):  # all loaded
        assert got.schedule.name == schedule.name
        assert run.job.task3_allowlist == ["a", "b"]
        assert run.directive.text == "seconds=0"
        assert run.directive_text == "seconds=0"

    run, got, floor = load_delivery(bare.pk, None)
    assert (got, floor) == (None, 41)
    with django_assert_num_queries(0):
        assert run.directive is None
        assert run.job.key == "sleep"
    assert _fields(run) == _fields(Run.objects.get(pk=bare.pk))

    # A scheduled run that is not this run's: the run alone.
    run, got, _ = load_delivery(bare.pk, scheduled.pk)
    assert (run.pk, got) == (bare.pk, None)
    assert load_delivery(10**9, None) == (None, None, 0)
    Run.objects.filter(pk=running.pk).update(status="succeeded")
    assert load_delivery(bare.pk, None)[2] == 0  # nothing running


def _flaky(failures: int, result=None):
    """A callable that raises OperationalError `failures` times, then returns `result`; counts calls."""
    from django.db import OperationalError

    def call(*args, **kwargs):
        call.calls += 1
        if call.calls <= failures:
            raise OperationalError("database away")
        return result

    call.calls = 0
    return call


@pytest.mark.django_db(transaction=True)  # each failed attempt closes the connection
def test_parent_writer__retries_a_failed_write_then_gives_up_within_its_budget(settings, caplog):
    settings.WORKER_PARENT_WRITE_RETRY_SECONDS = 2
    job = _flaky(2)
    parent.parent_writer.handle(job)
    assert job.calls == 3, "two failures retried, the third attempt written"

    never = _flaky(10**6)
    started = time.monotonic()
    parent.parent_writer.handle(never)
    assert time.monotonic() - started < 2 + 1, "no sleep past the budget"
    assert never.calls == 3, "sleeps of 0.5 s and 1 s; a third of 2 s would end past the budget"
    assert "parent write abandoned" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_settle__retries_the_finish_while_the_database_is_away(settings, monkeypatch):
    settings.WORKER_FINISH_RETRY_SECONDS = 2
    monkeypatch.setattr(runleases, "outcome_record", lambda **kwargs: True)
    finish = _flaky(2, result=True)
    monkeypatch.setattr(runstate, "run_finish", finish)
    common = dict(
        run_id=1, scheduled_run_id=None, attempt=1, task_id="t", status="succeeded", summary="", stats=None
    )
    assert lifecycle._settle(**common) == (True, True)
    assert finish.calls == 3

    # Recorded in Redis: after its budget the outcome is left to the reapers.
    monkeypatch.setattr(runstate, "run_finish", _flaky(10**6))
    assert lifecycle._settle(**common) == (None, False)
