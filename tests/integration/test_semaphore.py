"""The Redis semaphore against the real Redis: all-or-nothing, expiry by the server clock, owners, order."""

from __future__ import annotations

import threading
import zlib
from datetime import UTC, datetime, timedelta

import pytest

from tests.support import wait_for
from worker import semaphore
from worker.semaphore import (
    Cap,
    semaphore_acquire,
    semaphore_holders,
    semaphore_rebuild,
    semaphore_release,
    semaphore_renew,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def sem(redis_client, settings):
    settings.WORKER_LEASE_SECONDS = 30
    settings.WORKER_THROTTLE_MAX_SECONDS = 1
    return redis_client


def job_cap(key: str = "a", limit: int = 1) -> Cap:
    return Cap(scope=f"job:{key}", limit=limit, label="per-job cap", subject=key)


def global_cap(limit: int = 2) -> Cap:
    return Cap(scope="global", limit=limit, label="global cap")


def run_id_of(owner: str) -> int:
    return zlib.crc32(owner.encode())


def acquire(caps, owner, due=T0, floor=0):
    return semaphore_acquire(caps, owner=owner, waiter=owner, due=due, run_id=run_id_of(owner), floor=floor)


def renew(caps, owner):
    result = semaphore_renew(caps, owner=owner, run_id=run_id_of(owner))
    return (result.renewed, result.reasserted, result.lost)


def release(caps, owner):
    return semaphore_release(caps, owner=owner, run_id=run_id_of(owner)).removed


def park(caps, owner, due=T0):
    message = f'{{"run": "{owner}"}}'
    return semaphore_acquire(
        caps, owner=owner, waiter=owner, due=due, run_id=run_id_of(owner), floor=0, park=message
    )


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
    assert release([job_cap()], "not-mine") == 0
    assert semaphore_holders(job_cap()) == ["mine"]
    assert renew([job_cap()], "mine") == (1, 0, None)
    assert release([job_cap()], "mine") == 1
    assert semaphore_holders(job_cap()) == []


def test_acquire_renew_release__hold_the_runs_liveness_lease(sem):
    from schedules.runleases import run_lease_key

    assert acquire([], "lonely").acquired  # no cap applies: still a liveness lease
    key = run_lease_key(run_id_of("lonely"))
    assert sem.get(key) == b"lonely"
    sem.delete(key)
    renew([], "lonely")
    assert sem.get(key) == b"lonely"
    assert release([], "not-mine") == 0
    assert sem.get(key) == b"lonely"
    release([], "lonely")
    assert sem.get(key) is None


def test_renew__takes_a_lost_lease_again_only_under_the_limit(sem):
    assert acquire([job_cap(limit=1)], "running").acquired
    sem.delete(job_cap().key)  # the lease gone (Redis lost it, or it lapsed)
    assert renew([job_cap(limit=1)], "running") == (0, 1, None)
    assert semaphore_holders(job_cap()) == ["running"]

    sem.delete(job_cap().key)
    assert acquire([job_cap(limit=1)], "newcomer").acquired  # took the slot meanwhile
    _renewed, _reasserted, lost = renew([job_cap(limit=1)], "running")
    assert lost == job_cap(limit=1)
    assert semaphore_holders(job_cap()) == ["newcomer"]  # not added blindly over the limit


def test_acquire__a_fresh_redis_with_nothing_running_admits_without_a_rebuild(sem):
    """A fresh (or emptied) Redis with no run in the database starts its grant counter at once."""
    sem.flushdb()
    grant = acquire([job_cap()], "first")
    assert (grant.acquired, grant.rebuild, grant.seq) == (True, False, 1)


def test_acquire__admits_nobody_while_redis_is_behind_the_database(sem):
    """A restore or failover that lost leases: the grant counter is below the database's running runs."""
    first = acquire([job_cap(limit=2)], "r1")
    second = acquire([job_cap(limit=2)], "r2")
    assert first.acquired
    assert second.acquired
    assert second.seq == first.seq + 1
    floor = second.seq
    sem.flushdb()  # as if Redis came back from a snapshot taken before both started
    grant = acquire([job_cap(limit=2)], "r3", floor=floor)
    assert (grant.acquired, grant.rebuild) == (False, True)
    assert "rebuilt" in grant.reason

    semaphore_rebuild(
        [(run_id_of("r1"), "r1", [job_cap(limit=2)]), (run_id_of("r2"), "r2", [job_cap(limit=2)])],
        floor=floor,
    )
    assert sorted(semaphore_holders(job_cap())) == ["r1", "r2"]
    grant = acquire([job_cap(limit=2)], "r3", floor=floor)
    assert (grant.acquired, grant.rebuild) == (False, False)
    assert grant.reason == "waiting: per-job cap 2/2 for a"
    assert release([job_cap(limit=2)], "r1") == 1
    assert acquire([job_cap(limit=2)], "r3", floor=floor).seq == floor + 1


def test_acquire__with_mixed_limits_each_run_counts_against_its_own(sem):
    """Runs whose schedules set different limits share one count: a run starts only while fewer than
    its own limit hold that cap (docs/OPERATIONS.md, "Concurrency caps")."""
    wide, narrow = global_cap(3), global_cap(1)
    assert acquire([wide], "w1").acquired
    grant = acquire([narrow], "n1", due=T0 + timedelta(seconds=1))
    assert (grant.acquired, grant.reason) == (False, "waiting: global cap 1/1")
    release([narrow], "n1")
    assert acquire([wide], "w2", due=T0 + timedelta(seconds=2)).acquired  # 1 < 3, although n1 waits
    assert not acquire([narrow], "n1", due=T0 + timedelta(seconds=1)).acquired  # 2 >= 1
    release([wide], "w1")
    release([wide], "w2")
    assert acquire([narrow], "n1", due=T0 + timedelta(seconds=1)).acquired
    # Now the narrow run holds the only slot its own limit allows; the wide ones still have room.
    assert acquire([wide], "w3", due=T0 + timedelta(seconds=3)).acquired


def test_waiters__start_in_the_order_they_came_due(sem):
    assert acquire([job_cap()], "holder").acquired
    early, late = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    assert not acquire([job_cap()], "late", due=late).acquired
    assert not acquire([job_cap()], "early", due=early).acquired
    release([job_cap()], "holder")
    # The slot is free, but the run that came due earlier is still waiting for it.
    grant = acquire([job_cap()], "late", due=late)
    assert (grant.acquired, grant.ahead) == (False, 1)
    assert acquire([job_cap()], "early", due=early).acquired
    release([job_cap()], "early")
    assert acquire([job_cap()], "late", due=late).acquired


def test_waiters__blocked_by_their_job_do_not_hold_back_other_jobs(sem):
    caps_a = [job_cap("a", 1), global_cap(2)]
    assert acquire(caps_a, "a1").acquired
    assert not acquire(caps_a, "a2", due=T0).acquired  # waits on job a's cap only
    # A later run of another job takes the free global slot.
    assert acquire([job_cap("b", 1), global_cap(2)], "b1", due=T0 + timedelta(hours=1)).acquired


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
                    release(caps, owner)
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
    release([job_cap()], "holder")
    assert not acquire([job_cap()], "next", due=T0 + timedelta(minutes=1)).acquired  # "gone" is ahead
    semaphore.semaphore_forget_waiter([job_cap()], waiter="gone")
    assert acquire([job_cap()], "next", due=T0 + timedelta(minutes=1)).acquired


def test_parked_runs__a_release_wakes_the_earliest_one_not_yet_woken(sem):
    """A run that finds its cap full waits in Redis with its message; freeing a slot hands it out."""
    cap = job_cap(limit=2)
    assert acquire([cap], "h1").acquired
    assert acquire([cap], "h2").acquired
    assert not park([cap], "late", due=T0 + timedelta(minutes=2)).acquired
    assert not park([cap], "early", due=T0 + timedelta(minutes=1)).acquired
    assert semaphore.semaphore_parked(["late", "early", "h1"]) == {"late", "early"}

    freed = semaphore_release([cap], owner="h1", run_id=run_id_of("h1"))
    assert (freed.removed, freed.woken) == (1, ['{"run": "early"}'])
    # A second release wakes the next one, not "early" again (its message is on its way).
    assert semaphore_release([cap], owner="h2", run_id=run_id_of("h2")).woken == ['{"run": "late"}']
    # A release of a lease nobody holds wakes nobody.
    assert semaphore_release([cap], owner="h2", run_id=run_id_of("h2")).woken == []

    assert park([cap], "early", due=T0 + timedelta(minutes=1)).acquired  # woken, and it fits
    assert semaphore.semaphore_parked(["early"]) == set()


def test_parked_runs__the_sweep_wakes_a_head_whose_wake_up_was_lost(sem, settings):
    cap = job_cap(limit=1)
    assert acquire([cap], "holder").acquired
    assert not park([cap], "waiting", due=T0 + timedelta(minutes=1)).acquired
    assert semaphore.semaphore_sweep_parked() == []  # the cap is full: nothing to wake
    sem.delete(cap.key)  # the holder's lease lapsed (its worker died): nobody released, nobody woke
    assert semaphore.semaphore_sweep_parked() == ['{"run": "waiting"}']
    assert semaphore.semaphore_sweep_parked() == []  # woken already; again only once the mark expires
    sem.delete(semaphore.WOKEN_KEY)
    assert semaphore.semaphore_sweep_parked() == ['{"run": "waiting"}']


def test_parked_runs__a_woken_run_that_still_does_not_fit_parks_again(sem):
    cap = job_cap(limit=1)
    assert acquire([cap], "holder").acquired
    assert not park([cap], "woken", due=T0 + timedelta(seconds=2)).acquired
    assert semaphore_release([cap], owner="holder", run_id=run_id_of("holder")).woken == ['{"run": "woken"}']
    # Before it arrives, a run that came due earlier takes the slot: the woken run parks again.
    assert acquire([cap], "earlier", due=T0 + timedelta(seconds=1)).acquired
    assert not park([cap], "woken", due=T0 + timedelta(seconds=2)).acquired
    assert semaphore.semaphore_parked(["woken"]) == {"woken"}
    assert semaphore_release([cap], owner="earlier", run_id=run_id_of("earlier")).woken == [
        '{"run": "woken"}'
    ]
    assert park([cap], "woken", due=T0 + timedelta(seconds=2)).acquired


def test_parked_runs__a_release_wakes_only_runs_that_fit_under_their_own_limit(sem):
    narrow, wide = global_cap(1), global_cap(3)
    assert acquire([wide], "w1").acquired
    assert acquire([wide], "w2").acquired
    assert not park([narrow], "n1", due=T0 + timedelta(seconds=1)).acquired
    # w1 frees a slot, but under n1's own limit of 1 the run still holding one is too many.
    assert semaphore_release([wide], owner="w1", run_id=run_id_of("w1")).woken == []
    assert semaphore_release([wide], owner="w2", run_id=run_id_of("w2")).woken == ['{"run": "n1"}']
    assert park([narrow], "n1", due=T0 + timedelta(seconds=1)).acquired
