"""Concurrency caps as Redis leases: one sorted set per cap, member = lease owner, score = expiry (ms).

Every script reads the Redis server's clock (TIME), so hosts with skewed clocks agree on what expired.
A lease that is not renewed expires by itself: a dead worker's slot frees within one lease TTL.

Fairness: a run that finds a cap full registers as a waiter on that cap (a second sorted set scored by
when the run came due), and a later run may only take a slot if the earlier waiters leave room for it.
So throttled runs start in roughly the order they came due, whichever worker polls first. A waiter
registers on the first cap that blocks it only (caps are ordered narrow to wide), so a run stuck behind
its own job's cap never holds back other jobs on the global cap.

Redis is not the source of truth for what runs: PostgreSQL is. Every grant takes a number from the
counter `cb:sem:seq`, and the run's start records it (`Run.lease_seq`). An acquire is told the highest
number among the database's running runs; a Redis whose counter is missing or below it has lost lease
state (a restart without persistence, a restore from an older snapshot, a failover to a replica that
missed writes), and admits nobody until the lease sets are rebuilt from the database's running runs
(`semaphore_rebuild`). A renewal that finds its lease gone takes it again only under the limit; if the cap
is full, the run has lost its slot and must stop (worker/heartbeat.py fences it).

A run that finds a cap full *parks*: inside the same script it registers as a waiter and leaves its run
message in `cb:sem:parked`, and its task acknowledges the message and ends. No retry message, no task
result, no database write while it waits (the `throttled` status is written once). A release wakes the
parked waiters of each cap it freed, in due order, while the cap has room under each one's own limit
(returns their messages, which the releaser publishes), marking them woken for a while: a woken run
counts as holding a slot until it arrives, so two releases wake two different runs; a woken run that
still does not fit (another took the slot) parks again. A slow safety sweep (`semaphore_sweep_parked`,
every worker maintenance tick) does the same for every cap with parked waiters, for wake-ups that were
lost (the releasing process died before publishing, the message was lost). The parked-waiter scripts
reach keys named in `cb:sem:parked-caps`, so they need a standalone Redis (or one hash slot), not a
cluster.

Each run also holds its liveness lease, `cb:run:<id>:lease` (schedules/runleases.py), in the same
scripts: the reaper fails a run only once that key has expired.

Limits are per run, counts are shared: runs whose schedules set different limits on one cap count the
same leases, and each is admitted only while fewer than its own limit hold that cap.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from redis.commands.core import Script

from schedules import runleases

logger = logging.getLogger(__name__)

KEY_PREFIX = "cb:sem"
SEQ_KEY = f"{KEY_PREFIX}:seq"
PARKED_KEY = f"{KEY_PREFIX}:parked"  # waiter -> "<limit>|<run message JSON>"
WOKEN_KEY = f"{KEY_PREFIX}:woken"  # waiter -> until (ms): woken, its message on the way
PARKED_CAPS_KEY = f"{KEY_PREFIX}:parked-caps"  # "<holders key>|<waiters key>" of caps with parked waiters

# A cap's scope names what it counts; its keys are built from the scope. Defined here once: the worker
# takes leases under these names and monitoring/metrics.py counts them.
GLOBAL_SCOPE = "global"


def job_scope(job_key: str) -> str:
    return f"job:{job_key}"


def schedule_scope(schedule_id: int) -> str:
    return f"schedule:{schedule_id}"


def holders_key(scope: str) -> str:
    """The sorted set of a cap's lease holders: member = lease owner, score = lease expiry (Redis ms)."""
    return f"{KEY_PREFIX}:{scope}:leases"


# Every script starts with the Redis server's clock.
_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: n holder sets, n waiter sets (score = due), n waiter-expiry sets (score = expiry), the grant
# counter, the run's liveness key, the parked hash, the woken set, the parked-caps set.
# ARGV: owner, waiter id, due (ms), lease ms, waiter ttl ms, floor (the highest grant among running runs
# in PostgreSQL), parked message ('' = do not park), then n limits.
# Returns {1, grant} granted | {0, i, held, ahead} blocked on cap i | {-2} lease state behind the database.
ACQUIRE_LUA = (
    _NOW_LUA
    + """
local n = (#KEYS - 5) / 3
local owner, waiter, due = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, waiter_ms, floor = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local message = ARGV[7]
local seq_key, run_key = KEYS[3 * n + 1], KEYS[3 * n + 2]
local parked, woken, parked_caps = KEYS[3 * n + 3], KEYS[3 * n + 4], KEYS[3 * n + 5]
if tonumber(redis.call('GET', seq_key) or 0) < floor then
  return {-2}
end
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2 * n + i], '-inf', now)
  if #gone > 0 then
    redis.call('ZREM', KEYS[2 * n + i], unpack(gone))
    redis.call('ZREM', KEYS[n + i], unpack(gone))
    redis.call('HDEL', parked, unpack(gone))
  end
end
for i = 1, n do
  local limit = tonumber(ARGV[7 + i])
  local held = redis.call('ZCARD', KEYS[i])
  if redis.call('ZSCORE', KEYS[i], owner) then
    held = held - 1
  end
  local ahead = redis.call('ZCOUNT', KEYS[n + i], '-inf', '(' .. due)
  if held + ahead >= limit then
    for j = 1, n do
      redis.call('ZREM', KEYS[n + j], waiter)
      redis.call('ZREM', KEYS[2 * n + j], waiter)
    end
    redis.call('ZADD', KEYS[n + i], due, waiter)
    redis.call('ZADD', KEYS[2 * n + i], now + waiter_ms, waiter)
    redis.call('PEXPIRE', KEYS[n + i], waiter_ms * 2)
    redis.call('PEXPIRE', KEYS[2 * n + i], waiter_ms * 2)
    if message ~= '' then
      redis.call('HSET', parked, waiter, limit .. '|' .. message)
      redis.call('ZREM', woken, waiter)
      redis.call('SADD', parked_caps, KEYS[i] .. '|' .. KEYS[n + i])
    end
    return {0, i, held, ahead}
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + lease_ms, owner)
  if redis.call('PTTL', KEYS[i]) < lease_ms * 2 then
    redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
  end
  redis.call('ZREM', KEYS[n + i], waiter)
  redis.call('ZREM', KEYS[2 * n + i], waiter)
end
redis.call('HDEL', parked, waiter)
redis.call('ZREM', woken, waiter)
redis.call('SET', run_key, owner, 'PX', lease_ms)
return {1, redis.call('INCR', seq_key)}
"""
)

# KEYS: n holder sets, the run's liveness key. ARGV: owner, lease ms, then n limits.
# Extends the owner's leases. A lease that is gone (expired while the worker could not reach Redis, or
# lost with Redis's data) is taken again only while the cap has room under the run's own limit; when it
# has none, the slot went to another run: returns that cap's index and touches nothing, and the caller
# stops its run. Returns {renewed, reasserted, lost cap index or 0}.
RENEW_LUA = (
    _NOW_LUA
    + """
local n = #KEYS - 1
local owner, lease_ms = ARGV[1], tonumber(ARGV[2])
local renewed, missing = 0, 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZSCORE', KEYS[i], owner) then
    renewed = renewed + 1
  elseif redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[2 + i]) then
    return {0, 0, i}
  else
    missing = missing + 1
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + lease_ms, owner)
  if redis.call('PTTL', KEYS[i]) < lease_ms * 2 then
    redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
  end
end
redis.call('SET', KEYS[n + 1], owner, 'PX', lease_ms)
return {renewed, missing, 0}
"""
)

# The wake-up, shared by the release and the safety sweep. KEYS[1] the parked hash, KEYS[2] the woken
# set; ARGV[1] wake ms. `wake` hands out a cap's free slots to its parked waiters in due order, each
# while the cap has room under its own limit; a run already woken counts as holding a slot until it
# arrives (or its mark expires). Returns the length of the cap's line.
_WAKE_LUA = (
    _NOW_LUA
    + """
local parked, woken, wake_ms = KEYS[1], KEYS[2], tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', woken, '-inf', now)
local function wake(holders, waiters, out)
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  local held = redis.call('ZCARD', holders)
  local line = redis.call('ZRANGE', waiters, 0, 49)
  for _, w in ipairs(line) do
    if redis.call('ZSCORE', woken, w) then
      held = held + 1
    else
      local record = redis.call('HGET', parked, w)
      if record then
        local bar = string.find(record, '|', 1, true)
        if held >= tonumber(string.sub(record, 1, bar - 1)) then
          break
        end
        redis.call('ZADD', woken, now + wake_ms, w)
        out[#out + 1] = string.sub(record, bar + 1)
        held = held + 1
      end
    end
  end
  return #line
end
"""
)

# KEYS: the parked hash, the woken set, the outcomes hash, the run's liveness key, n holder sets, n waiter
# sets. ARGV: wake ms, owner, run id whose recorded outcome is settled ('' = none). Removes only this
# owner's leases and wakes the parked waiters of each cap it freed. Returns {removed, message, ...}.
RELEASE_LUA = (
    _WAKE_LUA
    + """
local n = (#KEYS - 4) / 2
local owner, settled = ARGV[2], ARGV[3]
local removed, out = 0, {}
for i = 1, n do
  if redis.call('ZREM', KEYS[4 + i], owner) == 1 then
    removed = removed + 1
    wake(KEYS[4 + i], KEYS[4 + n + i], out)
  end
end
if redis.call('GET', KEYS[4]) == owner then
  redis.call('DEL', KEYS[4])
end
if settled ~= '' then
  redis.call('HDEL', KEYS[3], settled)
end
table.insert(out, 1, removed)
return out
"""
)

# KEYS: the parked hash, the woken set, the parked-caps set. ARGV: wake ms.
# The safety net for lost wake-ups: wakes the waiters of every cap with parked waiters that has room.
SWEEP_PARKED_LUA = (
    _WAKE_LUA
    + """
local out = {}
for _, pair in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local bar = string.find(pair, '|', 1, true)
  if wake(string.sub(pair, 1, bar - 1), string.sub(pair, bar + 1), out) == 0 then
    redis.call('SREM', KEYS[3], pair)
  end
end
return out
"""
)

# KEYS: the grant counter, then one key per entry. ARGV: lease ms, floor, then per entry "z:<owner>" (a
# holder set: add the lease unless present) or "s:<owner>" (a liveness key: set unless present).
# Puts back the leases of the database's running runs, then lifts the counter to the floor, which is
# what lets acquires through again.
REBUILD_LUA = (
    _NOW_LUA
    + """
local lease_ms, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local added = 0
for i = 2, #KEYS do
  local kind, owner = string.sub(ARGV[i + 1], 1, 1), string.sub(ARGV[i + 1], 3)
  if kind == 'z' then
    added = added + redis.call('ZADD', KEYS[i], 'NX', now + lease_ms, owner)
    if redis.call('PTTL', KEYS[i]) < lease_ms * 2 then
      redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
    end
  else
    redis.call('SET', KEYS[i], owner, 'PX', lease_ms, 'NX')
  end
end
if tonumber(redis.call('GET', KEYS[1]) or 0) < floor then
  redis.call('SET', KEYS[1], floor)
end
return added
"""
)


@dataclass(frozen=True)
class Cap:
    """One concurrency cap: a scope (`global` or `job:<key>`), its limit, and words for humans."""

    scope: str
    limit: int
    label: str  # e.g. "per-job cap" or "global cap"
    subject: str = ""  # e.g. the job key

    @property
    def key(self) -> str:
        return holders_key(self.scope)

    @property
    def waiters_key(self) -> str:
        return f"{KEY_PREFIX}:{self.scope}:waiters"

    @property
    def waiter_expiry_key(self) -> str:
        return f"{KEY_PREFIX}:{self.scope}:waiters-exp"


@dataclass(frozen=True)
class Grant:
    acquired: bool
    blocking: Cap | None = None
    held: int = 0
    ahead: int = 0
    seq: int | None = None  # the grant's number, recorded on the run (Run.lease_seq)
    rebuild: bool = False  # Redis is behind the database: rebuild the lease sets, then ask again

    @property
    def reason(self) -> str:
        if self.acquired:
            return ""
        if self.blocking is None:
            return "waiting: concurrency caps being rebuilt after Redis lost lease state"
        cap = self.blocking
        subject = f" for {cap.subject}" if cap.subject else ""
        behind = f", {self.ahead} waiting ahead" if self.ahead else ""
        return f"waiting: {cap.label} {self.held}/{cap.limit}{subject}{behind}"


@dataclass(frozen=True)
class Renewal:
    renewed: int
    reasserted: int
    lost: Cap | None  # the cap whose slot another run took while this run's lease was gone


semaphore_client = runleases.client  # the process's one client for lease traffic


@functools.cache
def _script(source: str) -> Script:
    return runleases.client().register_script(source)


def lease_ms() -> int:
    return int(settings.WORKER_LEASE_SECONDS * 1000)


# A parked run keeps its place in line this long without news (its entry is renewed whenever it tries).
PARK_TTL_MS = 24 * 3600 * 1000


def wake_ms() -> int:
    """How long a woken run has to arrive before the safety sweep may wake it (or the next) again."""
    return max(10_000, 2 * lease_ms())


def semaphore_acquire(
    caps: list[Cap],
    *,
    owner: str,
    waiter: str,
    due: datetime,
    run_id: int,
    floor: int,
    park: str = "",
) -> Grant:
    """Take a lease on every cap or on none, and the run's liveness lease with them.

    `waiter` names the run (stable across deliveries); `floor` is `runstate.running_lease_floor()`.
    `park`: the run's message (JSON); when a cap is full it is kept with the waiter, and a release wakes
    it (see the module's docstring). Empty: the caller retries by itself.
    """
    keys = (
        [c.key for c in caps]
        + [c.waiters_key for c in caps]
        + [c.waiter_expiry_key for c in caps]
        + [SEQ_KEY, runleases.run_lease_key(run_id), PARKED_KEY, WOKEN_KEY, PARKED_CAPS_KEY]
    )
    waiter_ttl_ms = PARK_TTL_MS if park else int(settings.WORKER_THROTTLE_MAX_SECONDS * 1000 * 3) + 10_000
    due_ms = int(due.timestamp() * 1000)
    argv = [owner, waiter, due_ms, lease_ms(), waiter_ttl_ms, int(floor), park, *[c.limit for c in caps]]
    result = _script(ACQUIRE_LUA)(keys=keys, args=argv)
    code = int(result[0])
    if code == 1:
        return Grant(acquired=True, seq=int(result[1]))
    if code == -2:
        return Grant(acquired=False, rebuild=True)
    return Grant(acquired=False, blocking=caps[int(result[1]) - 1], held=int(result[2]), ahead=int(result[3]))


def semaphore_renew(caps: list[Cap], *, owner: str, run_id: int) -> Renewal:
    """Extend the owner's leases (and its liveness lease); a lease gone is taken again under the limit."""
    keys = [c.key for c in caps] + [runleases.run_lease_key(run_id)]
    result = _script(RENEW_LUA)(keys=keys, args=[owner, lease_ms(), *[c.limit for c in caps]])
    lost = int(result[2])
    return Renewal(renewed=int(result[0]), reasserted=int(result[1]), lost=caps[lost - 1] if lost else None)


@dataclass(frozen=True)
class Released:
    removed: int
    woken: list[str]  # parked run messages (JSON) to publish now: their run may start


def semaphore_release(caps: list[Cap], *, owner: str, run_id: int, settled: bool = False) -> Released:
    """Give the owner's leases back and wake the parked waiters of each cap it freed that now fit.

    `settled`: the run's outcome is written to PostgreSQL, so its copy kept in Redis
    (runleases.outcome_record) goes in the same round trip."""
    keys = [PARKED_KEY, WOKEN_KEY, runleases.OUTCOMES_KEY, runleases.run_lease_key(run_id)]
    keys += [c.key for c in caps] + [c.waiters_key for c in caps]
    result = _script(RELEASE_LUA)(keys=keys, args=[wake_ms(), owner, str(run_id) if settled else ""])
    return Released(removed=int(result[0]), woken=[m.decode() for m in result[1:]])


def semaphore_sweep_parked() -> list[str]:
    """Messages of parked runs whose cap has room although nobody woke them (a lost wake-up)."""
    keys = [PARKED_KEY, WOKEN_KEY, PARKED_CAPS_KEY]
    return [m.decode() for m in _script(SWEEP_PARKED_LUA)(keys=keys, args=[wake_ms()])]


def semaphore_forget_waiter(caps: list[Cap], *, waiter: str) -> None:
    """A run that will not wait any more (it started elsewhere, was cancelled) leaves the line at once
    instead of holding its place until expiry."""
    pipe = semaphore_client().pipeline(transaction=True)
    for cap in caps:
        pipe.zrem(cap.waiters_key, waiter).zrem(cap.waiter_expiry_key, waiter)
    pipe.hdel(PARKED_KEY, waiter).zrem(WOKEN_KEY, waiter).execute()


def semaphore_parked(waiters: list[str]) -> set[str]:
    """The waiters among `waiters` that are parked (a release or the sweep will wake them)."""
    if not waiters:
        return set()
    found = semaphore_client().hmget(PARKED_KEY, waiters)
    return {waiter for waiter, record in zip(waiters, found, strict=True) if record is not None}


def semaphore_rebuild(holders: list[tuple[int, str, list[Cap]]], *, floor: int) -> int:
    """Put back the leases of the database's running runs: (run id, owner, caps) each; then admit again.

    Idempotent and safe with any number of callers: present leases are kept as they are.
    """
    keys = [SEQ_KEY]
    argv: list[object] = [lease_ms(), int(floor)]
    for run_id, owner, caps in holders:
        for cap in caps:
            keys.append(cap.key)
            argv.append(f"z:{owner}")
        keys.append(runleases.run_lease_key(run_id))
        argv.append(f"s:{owner}")
    added = int(_script(REBUILD_LUA)(keys=keys, args=argv))
    # A warning only when leases had to be put back (Redis lost them); a first start adds none.
    level = logging.WARNING if added else logging.INFO
    logger.log(level, "lease sets rebuilt from the database", extra={"runs": len(holders), "added": added})
    return added


def semaphore_holders(cap: Cap) -> list[str]:
    """Owners holding an unexpired lease on `cap` (for tests and diagnostics)."""
    now_ms = runleases.redis_now_ms()
    return [m.decode() for m in semaphore_client().zrangebyscore(cap.key, f"({now_ms}", "+inf")]
