"""The rate limiter's Lua scripts against the real Redis, on a fake clock passed to them (production
passes none: Redis's TIME), checked against an oracle written from the words of `Job.rate_limit`:

- a run may start while fewer than N starts fall in the last window (a start at t counts in (t, t+W]
  ... strictly: it leaves the window once now >= t + W);
- an admitted start counts as made now while pending, and at the instant its process exists once
  confirmed; a pending start never confirmed counts as made at its expiry;
- a run that would start while earlier-due runs wait behind the limit waits too (due order);
- whatever the order of calls, the recorded starts hold at most N in any window of W.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from orchestrator.rates import RateLimit, parse_rate_limit
from worker import ratelimit
from worker.ratelimit import (
    ratelimit_confirm,
    ratelimit_forget,
    ratelimit_sweep,
    ratelimit_take,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CLOCK0 = 1_800_000_000_000  # fake Redis ms


@pytest.fixture
def rl(redis_client, settings):
    settings.WORKER_LEASE_SECONDS = 30  # pending_ms = 120 s
    return redis_client


def recorded_starts(client, job="j") -> list[tuple[str, int]]:
    """(member, Redis ms) of the job's recorded starts."""
    found = client.zrange(f"{ratelimit.job_prefix(job)}:starts", 0, -1, withscores=True)
    return [(member.decode(), int(score)) for member, score in found]


def take(rate, member, *, now, due_ms=0, waiter=None, job="j"):
    return ratelimit_take(
        rate,
        job_key=job,
        member=member,
        waiter=waiter or f"w:{member}",
        due=T0 + timedelta(milliseconds=due_ms),
        park=f'{{"m":"{member}"}}',
        clock=str(now),
    )


@dataclass
class Oracle:
    count: int
    window: int
    pending_ms: int
    starts: dict[str, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)  # member -> expiry
    waiters: dict[str, int] = field(default_factory=dict)  # waiter -> due

    def used(self, now: int) -> int:
        for member, expiry in list(self.pending.items()):
            if expiry <= now:
                self.starts[member] = expiry
                del self.pending[member]
        return sum(1 for t in self.starts.values() if t >= now - self.window) + len(self.pending)

    def take(self, member: str, waiter: str, due: int, now: int) -> bool:
        ahead = sum(1 for w, d in self.waiters.items() if d < due and w != waiter)
        if self.used(now) + ahead < self.count:
            self.pending[member] = now + self.pending_ms
            self.waiters.pop(waiter, None)
            return True
        self.waiters[waiter] = due
        return False

    def confirm(self, member: str, now: int) -> None:
        self.pending.pop(member, None)
        self.starts[member] = max(self.starts.get(member, now), now)


def test_parse_rate_limit__forms_and_refusals():
    assert parse_rate_limit("10/m") == RateLimit(10, 60)
    assert parse_rate_limit(" 5 / s ") == RateLimit(5, 1)
    assert str(parse_rate_limit("100/h")) == "100/h"
    assert parse_rate_limit(None) is None
    assert parse_rate_limit("  ") is None
    for bad in ("0/s", "10", "10/d", "-1/m", "1.5/s", "10001/s", "ten/m", "10/M"):
        with pytest.raises(ValueError, match="N/s, N/m or N/h"):
            parse_rate_limit(bad)


def test_take__admits_n_per_window_then_parks_with_the_instant_a_start_leaves(rl):
    rate = RateLimit(3, 1)
    for i in range(3):
        assert take(rate, f"m{i}", now=CLOCK0 + i * 100).admitted
        ratelimit_confirm(rate, job_key="j", member=f"m{i}", clock=str(CLOCK0 + i * 100))
    parked = take(rate, "m3", now=CLOCK0 + 500)
    assert not parked.admitted
    assert (parked.used, parked.ahead) == (3, 0)
    assert "rate limit 3/s" in parked.reason
    # It is the head of the line: its own message, due when the first start leaves the window.
    assert parked.head == (0.501, '{"m":"m3"}')
    # The timer is set: a second waiter gets no wake-up of its own.
    assert take(rate, "m4", now=CLOCK0 + 600, due_ms=10).head is None
    # A start exactly a window old still counts (Redis's whole ms): early, it parks again, re-armed.
    assert not take(rate, "m3", now=CLOCK0 + 1000).admitted
    arrived = take(rate, "m3", now=CLOCK0 + 1001)
    assert arrived.admitted
    # m4 is next: its start fits when m1 leaves, at +1100.
    assert arrived.head == (0.1, '{"m":"m4"}')  # m1 leaves at +1101


def test_take__pending_start_counts_as_now_until_its_process_exists(rl):
    rate = RateLimit(1, 1)
    assert take(rate, "a", now=CLOCK0).admitted
    # Not confirmed: after a whole window it still counts (its process may start any moment).
    assert not take(rate, "b", now=CLOCK0 + 5000).admitted
    ratelimit_confirm(rate, job_key="j", member="a", clock=str(CLOCK0 + 5500))
    assert recorded_starts(rl) == [("a", CLOCK0 + 5500)]
    assert not take(rate, "b", now=CLOCK0 + 6500).admitted
    assert take(rate, "b", now=CLOCK0 + 6501).admitted


def test_sweep__arms_a_line_whose_timer_was_lost(rl, settings):
    rate = RateLimit(1, 1)
    assert take(rate, "a", now=CLOCK0).admitted
    ratelimit_confirm(rate, job_key="j", member="a", clock=str(CLOCK0))
    assert take(rate, "b", now=CLOCK0 + 10).head is not None
    assert ratelimit_sweep(clock=str(CLOCK0 + 20)) == []  # its timer is set
    rl.delete(f"{ratelimit.job_prefix('j')}:timer")  # as if it expired: the ETA message was lost
    assert ratelimit_sweep(clock=str(CLOCK0 + 20)) == [(0.981, '{"m":"b"}')]
    assert take(rate, "b", now=CLOCK0 + 1001).admitted
    assert ratelimit_sweep(clock=str(CLOCK0 + 1002)) == []
    assert rl.hlen(ratelimit.LINES_KEY) == 0  # an empty line is dropped


def test_forget__a_cancelled_head_hands_the_timer_to_the_next_at_once(rl):
    rate = RateLimit(1, 1)
    assert take(rate, "a", now=CLOCK0).admitted
    ratelimit_confirm(rate, job_key="j", member="a", clock=str(CLOCK0))
    assert take(rate, "b", now=CLOCK0 + 10, due_ms=1).head == (0.991, '{"m":"b"}')
    assert take(rate, "c", now=CLOCK0 + 20, due_ms=2).head is None
    # b's run was cancelled: its delivery leaves the line, and c is the head now, for the same instant.
    assert ratelimit_forget(rate, job_key="j", waiter="w:b", clock=str(CLOCK0 + 30)) == (0.971, '{"m":"c"}')
    assert rl.zrange(f"{ratelimit.job_prefix('j')}:waiters", 0, -1) == [b"w:c"]
    assert take(rate, "c", now=CLOCK0 + 1001, due_ms=2).admitted


def test_rate_fence__records_the_start_at_the_first_task_process_or_at_the_end_if_none(rl):
    rate = RateLimit(2, 60)
    pending = f"{ratelimit.job_prefix('j')}:pending"
    for member in ("forked", "failed-before-fork"):
        assert take(rate, member, now=CLOCK0).admitted
    forked = ratelimit.RateFence(rate, job_key="j", member="forked")
    assert forked.enter(2**22 + 12345)  # no such group: entering still records the start
    forked.leave(2**22 + 12345)
    assert rl.zrange(pending, 0, -1) == [b"failed-before-fork"]
    ratelimit.RateFence(rate, job_key="j", member="failed-before-fork").settle()
    assert rl.zcard(pending) == 0
    assert sorted(m for m, _ in recorded_starts(rl)) == ["failed-before-fork", "forked"]
    ratelimit.RateFence().settle()  # no limit: nothing to record


@pytest.mark.django_db
def test_wake_rate_lines__a_lifted_limit_publishes_its_whole_line_at_once(rl):
    from orchestrator.models import Job
    from orchestrator.services import OrchestratorService
    from schedules.dispatch import message_for
    from worker.caps import park_message

    Job.objects.filter(key="sleep").update(rate_limit="1/h")
    job = Job.objects.get(key="sleep")
    rate = RateLimit(1, 3600)
    runs = [OrchestratorService.launch(job=job, trigger="manual", task3_scope="allowlist") for _ in range(3)]
    for i, run in enumerate(runs):
        park = park_message(message_for(job, run, None), limits=(None, None), schedule_name=None)
        args = {"job_key": "sleep", "member": f"m{i}", "waiter": f"run:{run.pk}", "due": T0, "park": park}
        assert ratelimit_take(rate, **args).admitted is (i == 0)
    assert ratelimit.wake_rate_lines() == 0  # limited: the head has its timer, nobody else is woken

    Job.objects.filter(key="sleep").update(rate_limit=None)
    assert ratelimit.wake_rate_lines() == 2  # both waiting runs published at once, not one a timer
    assert rl.zcard(f"{ratelimit.job_prefix('sleep')}:waiters") == 0
    assert not rl.hexists(ratelimit.PARKED_KEY, f"run:{runs[1].pk}")
    assert rl.hlen(ratelimit.LINES_KEY) == 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(["take", "take", "confirm"]),
        st.integers(0, 3),  # which run
        # ms since the last call: round numbers often, so that starts land exactly a window apart
        st.one_of(st.sampled_from([0, 1, 100, 200, 250, 500, 999, 1000, 1001, 2000]), st.integers(0, 8000)),
    ),
    min_size=10,
    max_size=60,
)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(count=st.integers(1, 4), seconds=st.sampled_from([1, 2]), ops=OPS)
def test_take__matches_the_oracle_and_never_records_more_than_n_per_window(rl, count, seconds, ops):
    rl.flushdb()
    rate = RateLimit(count, seconds)
    oracle = Oracle(count=count, window=seconds * 1000, pending_ms=ratelimit.pending_ms())
    now, attempts = CLOCK0, {}
    for op, run, gap in ops:
        now += gap
        member, due = f"r{run}#{attempts.get(run, 0)}", run % 3  # a run's due never changes
        if op == "confirm":
            if member in oracle.pending:
                ratelimit_confirm(rate, job_key="j", member=member, clock=str(now))
                oracle.confirm(member, now)
                attempts[run] = attempts.get(run, 0) + 1  # its next start is another attempt
        elif member not in oracle.pending and member not in oracle.starts:
            admitted = take(rate, member, now=now, due_ms=due, waiter=f"w{run}").admitted
            assert admitted == oracle.take(member, f"w{run}", due, now), (run, now - CLOCK0)
    # The recorded starts (those still pending as if made now) hold the limit, whatever the order.
    recorded = sorted([t for _, t in recorded_starts(rl)] + [now] * len(oracle.pending))
    for i in range(len(recorded) - count):
        assert recorded[i + count] - recorded[i] > seconds * 1000, recorded
