"""The Redis semaphore against the real Redis: all-or-nothing, expiry by the server clock, owners, order."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import wait_for
from worker import semaphore
from worker.semaphore import (
    Cap,
    semaphore_acquire,
    semaphore_holders,
    semaphore_mark_warm,
    semaphore_release,
    semaphore_renew,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def sem(redis_client, settings):
    settings.WORKER_LEASE_SECONDS = 30
    settings.WORKER_THROTTLE_MAX_SECONDS = 1
    assert semaphore_mark_warm()
    return redis_client


def job_cap(key: str = "a", limit: int = 1) -> Cap:
    return Cap(scope=f"job:{key}", limit=limit, label="per-job cap", subject=key)


def global_cap(limit: int = 2) -> Cap:
    return Cap(scope="global", limit=limit, label="global cap")


def acquire(caps, owner, due=T0):
    return semaphore_acquire(caps, owner=owner, waiter=owner, due=due)


def test_acquire__is_all_or_nothing_across_caps(sem):
    assert acquire([job_cap("a"), global_cap(2)], "r1").acquired
    grant = acquire([job_cap("a"), global_cap(2)], "r2")
    assert not grant.acquired
    assert grant.reason == "waiting: per-job cap 1/1 for a"
    # The blocked run took nothing: the global cap still has one holder and room for another job.
    assert semaphore_holders(global_cap()) == ["r1"]
    assert acquire([job_cap("b"), global_cap(2)], "r3").acquired
    grant = acquire([job_cap("c"), global_cap(2)], "r4")
    assert (grant.acquired, grant.reason) == (False, "waiting: global cap 2/2")


def test_acquire__expires_stale_leases_by_the_redis_clock(sem, settings):
    settings.WORKER_LEASE_SECONDS = 0.5
    assert acquire([job_cap()], "dead").acquired
    assert not acquire([job_cap()], "next", due=T0 + timedelta(seconds=1)).acquired
    # No renewal: the dead owner's lease lapses and the slot frees by itself.
    wait_for(lambda: acquire([job_cap()], "next", due=T0 + timedelta(seconds=1)).acquired, timeout=10)
    assert semaphore_holders(job_cap()) == ["next"]


def test_release_and_renew__touch_only_the_owners_lease(sem):
    assert acquire([job_cap()], "mine").acquired
    assert semaphore_release([job_cap()], owner="not-mine") == 0
    assert semaphore_renew([job_cap()], owner="not-mine", reassert=False) == (0, 0)
    assert semaphore_holders(job_cap()) == ["mine"]
    assert semaphore_renew([job_cap()], owner="mine", reassert=False) == (1, 0)
    assert semaphore_release([job_cap()], owner="mine") == 1
    assert semaphore_holders(job_cap()) == []


def test_renew__reasserts_a_lease_redis_lost(sem):
    assert acquire([job_cap()], "running").acquired
    sem.flushdb()
    assert semaphore_renew([job_cap()], owner="running", reassert=True) == (0, 1)
    assert semaphore_holders(job_cap()) == ["running"]


def test_waiters__start_in_the_order_they_came_due(sem):
    assert acquire([job_cap()], "holder").acquired
    early, late = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    assert not acquire([job_cap()], "late", due=late).acquired
    assert not acquire([job_cap()], "early", due=early).acquired
    semaphore_release([job_cap()], owner="holder")
    # The slot is free, but the run that came due earlier is still waiting for it.
    grant = acquire([job_cap()], "late", due=late)
    assert (grant.acquired, grant.ahead) == (False, 1)
    assert acquire([job_cap()], "early", due=early).acquired
    semaphore_release([job_cap()], owner="early")
    assert acquire([job_cap()], "late", due=late).acquired


def test_waiters__blocked_by_their_job_do_not_hold_back_other_jobs(sem):
    caps_a = [job_cap("a", 1), global_cap(2)]
    assert acquire(caps_a, "a1").acquired
    assert not acquire(caps_a, "a2", due=T0).acquired  # waits on job a's cap only
    # A later run of another job takes the free global slot.
    assert acquire([job_cap("b", 1), global_cap(2)], "b1", due=T0 + timedelta(hours=1)).acquired


def test_acquire__pauses_after_redis_lost_its_data(sem, settings):
    settings.WORKER_LEASE_SECONDS = 1  # warm-up = half a lease
    sem.flushdb()
    grant = acquire([job_cap()], "r1")
    assert not grant.acquired
    assert grant.warming_up_ms > 0
    assert "warming up" in grant.reason
    wait_for(lambda: acquire([job_cap()], "r1").acquired, timeout=10)


def test_acquire__never_exceeds_the_limit_under_contention(sem):
    caps = [job_cap("a", 3), global_cap(5)]
    holding: set[str] = set()
    lock = threading.Lock()
    peak = 0
    errors: list[BaseException] = []

    def contender(n: int) -> None:
        nonlocal peak
        try:
            for i in range(30):
                owner = f"t{n}-{i}"
                if acquire(caps, owner, due=T0 + timedelta(seconds=n)).acquired:
                    with lock:
                        holding.add(owner)
                        peak = max(peak, len(holding))
                        assert len(semaphore_holders(caps[0])) <= 3
                    with lock:
                        holding.discard(owner)
                    semaphore_release(caps, owner=owner)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=contender, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert 1 <= peak <= 3


def test_semaphore_client__uses_the_configured_redis(sem):
    assert semaphore.semaphore_client().ping()


def test_forget_waiter__gives_up_the_place_in_line(sem):
    assert acquire([job_cap()], "holder").acquired
    assert not acquire([job_cap()], "gone", due=T0).acquired
    semaphore_release([job_cap()], owner="holder")
    assert not acquire([job_cap()], "next", due=T0 + timedelta(minutes=1)).acquired  # "gone" is ahead
    semaphore.semaphore_forget_waiter([job_cap()], waiter="gone")
    assert acquire([job_cap()], "next", due=T0 + timedelta(minutes=1)).acquired
