"""`Job.rate_limit` across all workers: an exact sliding window of run starts in Redis, one Lua call each.

Per job, a sorted set of its starts (member = one attempt's lease owner, score = Redis ms): a run may
start while fewer than N starts fall in the last window. An admitted start is *pending*, counted as
made now, until its first task process exists (`RateFence`); then it is recorded at that instant. So
every start is recorded no earlier than it happened, and the window holds for the task processes' own
start times (/proc) and for `started_at`. A pending start whose worker died counts as made at its
expiry (`pending_ms`): it can cost a start, never add one.

A run beyond the limit parks like a run behind a full cap (worker/semaphore.py: its message in
`cb:sem:parked`, its task acknowledged, `throttled` written once), in the job's line by due time. Room
appears at a known instant (the oldest start leaves the window), so the line's head alone is published,
with a countdown to that instant (a Celery ETA), under the line's timer key; it starts and arms the
timer for the next head, or, early, parks again and re-arms. A lost timer (its worker died holding the
message) expires `wake_ms` after its instant and the maintenance sweep re-arms it; a parked entry Redis
lost is the reaper's stalled-run re-publish. Redis losing the window lets at most one window hold twice
the limit (docs/OPERATIONS.md, "Rate limits").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import redis
from django.conf import settings
from redis.commands.core import Script

from orchestrator.models import Job
from orchestrator.rates import RateLimit, parse_rate_limit
from orchestrator.services import TaskFence
from schedules import runleases
from worker.caps import wake
from worker.semaphore import PARKED_KEY, wake_ms

logger = logging.getLogger(__name__)

KEY_PREFIX = "cb:rate"
LINES_KEY = f"{KEY_PREFIX}:lines"  # job prefix -> "<count>|<window ms>" for every job with waiters
LIMITED_KEY = f"{KEY_PREFIX}:limited"  # job key -> runs that joined its line (cb_rate_limited_total)


def job_prefix(job_key: str) -> str:
    return f"{KEY_PREFIX}:job:{job_key}"


def _keys(prefix: str) -> list[str]:
    """The starts, the pending starts (score = expiry), the waiters (score = due), the timer."""
    return [f"{prefix}:starts", f"{prefix}:pending", f"{prefix}:waiters", f"{prefix}:timer"]


# One clock, Redis's: ARGV `clock` is '' in production; tests pass a fake one (ms).
_CLOCK_LUA = """
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# used(): settles the window at `now` (pending past expiry become starts at their expiry; starts before
# now - window leave) and returns the starts in it, pending included. A start exactly a window old
# still counts: Redis's clock is in whole ms, so two starts a hair under a window apart can read as a
# whole window apart; counting one ms more keeps them apart by at least a window in real time.
# arm(): unless the timer is set, the head of the line (with a parked message) gets it, for the instant
# its start fits; returns {delay ms, message} or nothing.
_LINE_LUA = (
    _CLOCK_LUA
    + """
local function used(starts, pending, window, now)
  local late = redis.call('ZRANGEBYSCORE', pending, '-inf', now, 'WITHSCORES')
  for i = 1, #late, 2 do
    redis.call('ZADD', starts, late[i + 1], late[i])
  end
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', starts, '-inf', '(' .. (now - window))
  return redis.call('ZCARD', starts) + redis.call('ZCARD', pending)
end
local function arm(starts, pending, waiters, timer, parked, limit, window, now, wake)
  if redis.call('EXISTS', timer) == 1 then
    return nil
  end
  while true do
    local head = redis.call('ZRANGE', waiters, 0, 0)[1]
    if not head then
      return nil
    end
    local record = redis.call('HGET', parked, head)
    if record then
      local over, delay = used(starts, pending, window, now) - limit + 1, 0
      if over > 0 then
        local oldest = redis.call('ZRANGE', starts, over - 1, over - 1, 'WITHSCORES')
        delay = window
        if #oldest > 0 then
          delay = tonumber(oldest[2]) + window + 1 - now
        end
      end
      redis.call('SET', timer, head, 'PX', delay + wake)
      return {delay, string.sub(record, string.find(record, '|', 1, true) + 1)}
    end
    redis.call('ZREM', waiters, head)
  end
end
"""
)

# KEYS: starts, pending, waiters, timer, the parked hash, the lines hash, the limited counts. ARGV:
# member, waiter, due (ms), limit, window ms, pending ms, message, wake ms, job prefix, clock, job key.
# Returns {1, delay, message} admitted | {0, used, ahead, delay, message} parked; delay/message: a
# head of the line to publish (with that countdown), absent if none.
TAKE_LUA = (
    _LINE_LUA
    + """
local starts, pending, waiters, timer, parked, lines, limited = unpack(KEYS)
local member, waiter, due = ARGV[1], ARGV[2], tonumber(ARGV[3])
local limit, window, pending_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local message, wake, prefix, now = ARGV[7], tonumber(ARGV[8]), ARGV[9], clock(ARGV[10])
local ttl = 2 * (window + pending_ms) + 60000
if redis.call('GET', timer) == waiter then
  redis.call('DEL', timer)
end
local n = used(starts, pending, window, now)
local ahead = redis.call('ZCOUNT', waiters, '-inf', '(' .. due)
local result
if n + ahead < limit then
  redis.call('ZADD', pending, now + pending_ms, member)
  redis.call('PEXPIRE', pending, ttl)
  redis.call('PEXPIRE', starts, ttl)
  redis.call('ZREM', waiters, waiter)
  redis.call('HDEL', parked, waiter)
  result = {1}
else
  if redis.call('ZADD', waiters, due, waiter) == 1 then
    redis.call('HINCRBY', limited, ARGV[11], 1)
  end
  redis.call('HSET', parked, waiter, limit .. '|' .. message)
  redis.call('HSET', lines, prefix, limit .. '|' .. window)
  result = {0, n, ahead}
end
local woken = arm(starts, pending, waiters, timer, parked, limit, window, now, wake)
if woken then
  result[#result + 1] = woken[1]
  result[#result + 1] = woken[2]
end
return result
"""
)

# KEYS: starts, pending. ARGV: member, window ms, pending ms, clock. The first task process of the run
# exists: its start is recorded now (later than pending, never earlier; also if Redis lost the pending).
CONFIRM_LUA = (
    _CLOCK_LUA
    + """
local now = clock(ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], 'GT', now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * (tonumber(ARGV[2]) + tonumber(ARGV[3])) + 60000)
return now
"""
)

# KEYS: starts, pending, waiters, timer, the parked hash. ARGV: waiter, limit, window ms, wake ms, clock.
# A run that will not start (cancelled, started elsewhere) or now waits for a cap leaves the line (its
# parked message stays: a cap's line may hold it); if the timer was its, the next head gets it at once,
# not after the timer expires. Returns {delay, message} or {}.
FORGET_LUA = (
    _LINE_LUA
    + """
local starts, pending, waiters, timer, parked = unpack(KEYS)
redis.call('ZREM', waiters, ARGV[1])
if redis.call('GET', timer) == ARGV[1] then
  redis.call('DEL', timer)
end
local limit, window, wake, now = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), clock(ARGV[5])
return arm(starts, pending, waiters, timer, parked, limit, window, now, wake) or {}
"""
)

# KEYS: the parked hash, the lines hash. ARGV: wake ms, clock, then the prefixes of jobs whose limit
# was lifted. Arms the timer of every line that lost it; drops lines that are empty; empties the lines
# of lifted limits (every parked message in them, to publish now). Returns {delay, message, ...}.
SWEEP_LUA = (
    _LINE_LUA
    + """
local parked, lines, wake, now = KEYS[1], KEYS[2], tonumber(ARGV[1]), clock(ARGV[2])
local lifted, out = {}, {}
for i = 3, #ARGV do
  lifted[ARGV[i]] = true
end
local all = redis.call('HGETALL', lines)
for i = 1, #all, 2 do
  local prefix, conf = all[i], all[i + 1]
  local bar = string.find(conf, '|', 1, true)
  local limit, window = tonumber(string.sub(conf, 1, bar - 1)), tonumber(string.sub(conf, bar + 1))
  local waiters, timer = prefix .. ':waiters', prefix .. ':timer'
  if lifted[prefix] then
    for _, waiter in ipairs(redis.call('ZRANGE', waiters, 0, -1)) do
      local record = redis.call('HGET', parked, waiter)
      if record then
        out[#out + 1] = 0
        out[#out + 1] = string.sub(record, string.find(record, '|', 1, true) + 1)
        redis.call('HDEL', parked, waiter)
      end
    end
    redis.call('DEL', waiters, timer)
  end
  if redis.call('ZCARD', waiters) == 0 then
    redis.call('HDEL', lines, prefix)
  else
    local starts, pending = prefix .. ':starts', prefix .. ':pending'
    local woken = arm(starts, pending, waiters, timer, parked, limit, window, now, wake)
    if woken then
      out[#out + 1] = woken[1]
      out[#out + 1] = woken[2]
    end
  end
end
return out
"""
)


@functools.cache
def _script(source: str) -> Script:
    return runleases.client().register_script(source)


def pending_ms() -> int:
    """How long an admitted start may take to become a process before it counts as made anyway."""
    return int(max(120.0, 2 * float(settings.WORKER_LEASE_SECONDS)) * 1000)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    rate: RateLimit | None = None
    used: int = 0
    ahead: int = 0
    head: tuple[float, str] | None = None  # (countdown s, parked message) of the line's head to publish
    unavailable: bool = False  # Redis unreachable: the caller retries by itself

    @property
    def reason(self) -> str:
        if self.unavailable:
            return "waiting: rate limit unavailable (Redis unreachable)"
        behind = f", {self.ahead} waiting ahead" if self.ahead else ""
        return f"waiting: rate limit {self.rate} ({self.used} started in the window{behind})"


def ratelimit_take(
    rate: RateLimit, *, job_key: str, member: str, waiter: str, due: datetime, park: str, clock: str = ""
) -> Admission:
    """Admit one start under `rate`, or park the run (`park`: its message) in the job's line."""
    prefix = job_prefix(job_key)
    argv = [member, waiter, int(due.timestamp() * 1000), rate.count, rate.window_seconds * 1000]
    argv += [pending_ms(), park, wake_ms(), prefix, clock, job_key]
    result = _script(TAKE_LUA)(keys=[*_keys(prefix), PARKED_KEY, LINES_KEY, LIMITED_KEY], args=argv)
    admitted = int(result[0]) == 1
    rest = result[1:] if admitted else result[3:]
    head = (int(rest[0]) / 1000, rest[1].decode()) if rest else None
    if admitted:
        return Admission(admitted=True, rate=rate, head=head)
    return Admission(admitted=False, rate=rate, used=int(result[1]), ahead=int(result[2]), head=head)


def ratelimit_confirm(rate: RateLimit, *, job_key: str, member: str, clock: str = "") -> int:
    """Record the admitted start as made now (Redis ms, returned): its first task process exists."""
    starts, pending, _, _ = _keys(job_prefix(job_key))
    argv = [member, rate.window_seconds * 1000, pending_ms(), clock]
    return int(_script(CONFIRM_LUA)(keys=[starts, pending], args=argv))


def ratelimit_forget(
    rate: RateLimit, *, job_key: str, waiter: str, clock: str = ""
) -> tuple[float, str] | None:
    """Take `waiter` out of the job's line; (countdown s, message) of the next head to publish, if any."""
    keys = [*_keys(job_prefix(job_key)), PARKED_KEY]
    argv = [waiter, rate.count, rate.window_seconds * 1000, wake_ms(), clock]
    result = _script(FORGET_LUA)(keys=keys, args=argv)
    return (int(result[0]) / 1000, result[1].decode()) if result else None


def ratelimit_sweep(*, lifted: Iterable[str] = (), clock: str = "") -> list[tuple[float, str]]:
    """(countdown s, message) to publish: the heads of lines whose timer was lost (the maintenance
    tick's safety net), and everyone in the lines of `lifted` jobs (their limit is null now)."""
    argv = [wake_ms(), clock, *[job_prefix(key) for key in lifted]]
    result = _script(SWEEP_LUA)(keys=[PARKED_KEY, LINES_KEY], args=argv)
    return [(int(result[i]) / 1000, result[i + 1].decode()) for i in range(0, len(result), 2)]


def waiters_key(job_key: str) -> str:
    return _keys(job_prefix(job_key))[2]


class RateFence(TaskFence):
    """The run's fence, which also records its rate-limited start (`rate`; None: no limit) once its
    first task process exists, or at `settle` (the run's end) if none did: `started_at` was written."""

    def __init__(self, rate: RateLimit | None = None, *, job_key: str = "", member: str = "") -> None:
        super().__init__()
        self.rate, self.job_key, self.member, self.confirmed = rate, job_key, member, rate is None

    def enter(self, pgid: int) -> bool:
        entered = super().enter(pgid)
        if entered:
            self.settle()
        return entered

    def settle(self) -> None:
        if self.confirmed or self.rate is None:
            return
        self.confirmed = True
        try:
            ratelimit_confirm(self.rate, job_key=self.job_key, member=self.member)
        except redis.RedisError:
            # Still pending: it counts as made now until it expires, never less.
            logger.warning("rate limit start not recorded", extra={"job": self.job_key})


def admit(job: Job, *, member: str, waiter: str, due: datetime, park: str) -> tuple[Admission, RateFence]:
    """The run path's one call: admit the start under the job's rate limit (or park it), publish the
    line's head if one is due a wake-up, and the fence the run executes under."""
    rate = parse_rate_limit(job.rate_limit)
    if rate is None:
        return Admission(admitted=True), RateFence()
    try:
        admission = ratelimit_take(rate, job_key=job.key, member=member, waiter=waiter, due=due, park=park)
    except redis.RedisError:
        return Admission(admitted=False, rate=rate, unavailable=True), RateFence()
    if admission.head is not None:
        wake([admission.head[1]], countdown=admission.head[0])
    return admission, RateFence(rate, job_key=job.key, member=member)


def forget(job: Job, *, waiter: str) -> None:
    """A run that will not start, or waits for a cap now, leaves its job's line."""
    rate = parse_rate_limit(job.rate_limit)
    try:
        head = rate and ratelimit_forget(rate, job_key=job.key, waiter=waiter)
    except redis.RedisError:
        return  # its timer expires by itself and the sweep arms the next
    if head:
        wake([head[1]], countdown=head[0])


def wake_rate_lines() -> int:
    """The maintenance tick's part (see ratelimit_sweep); return how many runs it published."""
    lines = [p.decode().removeprefix(job_prefix("")) for p in runleases.client().hkeys(LINES_KEY)]
    lifted = list(Job.objects.filter(key__in=lines, rate_limit=None).values_list("key", flat=True))
    woken = ratelimit_sweep(lifted=lifted)
    now = [message for countdown, message in woken if not countdown]
    return wake(now) + sum(wake([message], countdown=countdown) for countdown, message in woken if countdown)
