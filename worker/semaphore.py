"""Concurrency caps as Redis leases: one sorted set per cap, member = lease owner, score = expiry (ms).

Every script reads the Redis server's clock (TIME), so hosts with skewed clocks agree on what expired.
A lease that is not renewed expires by itself: a dead worker's slot frees within one lease TTL.

Fairness: a run that finds a cap full registers as a waiter on that cap (a second sorted set scored by
when the run came due), and a later run may only take a slot if the earlier waiters leave room for it.
So throttled runs start in roughly the order they came due, whichever worker polls first. A waiter
registers on the first cap that blocks it only (caps are ordered narrow to wide), so a run stuck behind
its own job's cap never holds back other jobs on the global cap.

After Redis loses its data (a restart without persistence) the sets are empty while runs still execute.
Acquisition then pauses for a warm-up (longer than a heartbeat interval) so running runs re-assert their
leases before new ones are admitted; see docs/OPERATIONS.md, "Workers and caps", for the bound that remains.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "cb:sem"
EPOCH_KEY = f"{KEY_PREFIX}:epoch"

# KEYS: n holder sets, n waiter sets (score = due), n waiter-expiry sets (score = expiry), epoch key.
# ARGV: owner, waiter id, due (ms), lease ms, waiter ttl ms, warm-up ms, then n limits.
# Returns {1} granted | {0, i, held, ahead} blocked on cap i | {-1, 0, 0, ms left} warming up.
ACQUIRE_LUA = """
local n = (#KEYS - 1) / 3
local owner, waiter, due = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, waiter_ms, warmup_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[#KEYS])
if not epoch then
  redis.call('SET', KEYS[#KEYS], now)
  epoch = now
end
epoch = tonumber(epoch)
if now - epoch < warmup_ms then
  return {-1, 0, 0, warmup_ms - (now - epoch)}
end
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2 * n + i], '-inf', now)
  if #gone > 0 then
    redis.call('ZREM', KEYS[2 * n + i], unpack(gone))
    redis.call('ZREM', KEYS[n + i], unpack(gone))
  end
end
for i = 1, n do
  local limit = tonumber(ARGV[6 + i])
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
return {1}
"""

# KEYS: holder sets. ARGV: owner, lease ms, reassert (1/0).
# Extends the owner's lease in each set. A missing lease (Redis lost its data) is put back only when the
# caller asks: it has just checked in the database that the run is still its own and still running.
# Returns {renewed, reasserted}.
RENEW_LUA = """
local owner, lease_ms, reassert = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed, reasserted = 0, 0
for i = 1, #KEYS do
  if redis.call('ZSCORE', KEYS[i], owner) then
    redis.call('ZADD', KEYS[i], 'XX', now + lease_ms, owner)
    renewed = renewed + 1
  elseif reassert then
    redis.call('ZADD', KEYS[i], now + lease_ms, owner)
    reasserted = reasserted + 1
  end
  if redis.call('PTTL', KEYS[i]) < lease_ms * 2 then
    redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
  end
end
return {renewed, reasserted}
"""

# KEYS: holder sets. ARGV: owner. Removes only this owner's lease; returns how many were removed.
RELEASE_LUA = """
local removed = 0
for i = 1, #KEYS do
  removed = removed + redis.call('ZREM', KEYS[i], ARGV[1])
end
return removed
"""

# KEYS: n waiter sets then n waiter-expiry sets. ARGV: waiter id. A run that will not wait any more (it
# started elsewhere, was cancelled) leaves the line at once instead of holding its place until expiry.
FORGET_WAITER_LUA = """
local n = #KEYS / 2
for i = 1, n do
  redis.call('ZREM', KEYS[i], ARGV[1])
  redis.call('ZREM', KEYS[n + i], ARGV[1])
end
return 1
"""

# KEYS: epoch key. ARGV: warm-up ms. Marks the lease sets as complete (no warm-up needed); used when the
# database shows nothing running, so there is nothing that could re-assert a lease.
MARK_WARM_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('SET', KEYS[1], now - tonumber(ARGV[1]), 'NX') and 1 or 0
"""


class SemaphoreError(Exception):
    """Base for semaphore errors (Redis errors pass through as redis.RedisError)."""


@dataclass(frozen=True)
class Cap:
    """One concurrency cap: a scope (`global` or `job:<key>`), its limit, and words for humans."""

    scope: str
    limit: int
    label: str  # e.g. "per-job cap" or "global cap"
    subject: str = ""  # e.g. the job key

    @property
    def key(self) -> str:
        return f"{KEY_PREFIX}:{self.scope}:leases"

    @property
    def waiters_key(self) -> str:
        return f"{KEY_PREFIX}:{self.scope}:waiters"

    @property
    def waiter_expiry_key(self) -> str:
        return f"{KEY_PREFIX}:{self.scope}:waiters-exp"

    def describe(self, held: int) -> str:
        subject = f" for {self.subject}" if self.subject else ""
        return f"{self.label} {held}/{self.limit}{subject}"


@dataclass(frozen=True)
class Grant:
    acquired: bool
    blocking: Cap | None = None
    held: int = 0
    ahead: int = 0
    warming_up_ms: int = 0

    @property
    def reason(self) -> str:
        if self.acquired:
            return ""
        if self.blocking is None:
            return "waiting: concurrency caps warming up after a Redis restart"
        behind = f", {self.ahead} waiting ahead" if self.ahead else ""
        return f"waiting: {self.blocking.describe(self.held)}{behind}"


_client_lock = threading.Lock()
_client: redis.Redis | None = None
_scripts: dict[str, redis.commands.core.Script] = {}


def _reset_after_fork() -> None:
    # Pool children are forked from a parent whose maintenance thread uses this module: a lock held by
    # that thread at fork time would never be released in the child.
    global _client_lock, _client
    _client_lock = threading.Lock()
    _client = None
    _scripts.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


def semaphore_client() -> redis.Redis:
    """One client per process; redis-py resets its pool after a fork, so prefork children are safe."""
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(
                settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5, health_check_interval=15
            )
            for name, source in (
                ("acquire", ACQUIRE_LUA),
                ("renew", RENEW_LUA),
                ("release", RELEASE_LUA),
                ("mark_warm", MARK_WARM_LUA),
                ("forget_waiter", FORGET_WAITER_LUA),
            ):
                _scripts[name] = _client.register_script(source)
        return _client


def _script(name: str):
    semaphore_client()
    return _scripts[name]


def lease_ms() -> int:
    return int(settings.WORKER_LEASE_SECONDS * 1000)


def warmup_ms() -> int:
    # Longer than one heartbeat interval (a quarter lease), so every live run has re-asserted its lease.
    return int(settings.WORKER_LEASE_SECONDS * 1000 / 2)


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def semaphore_acquire(caps: list[Cap], *, owner: str, waiter: str, due: datetime) -> Grant:
    """Take a lease on every cap or on none. `waiter` names the run (stable across deliveries)."""
    if not caps:
        return Grant(acquired=True)
    keys = (
        [c.key for c in caps]
        + [c.waiters_key for c in caps]
        + [c.waiter_expiry_key for c in caps]
        + [EPOCH_KEY]
    )
    waiter_ttl_ms = int(settings.WORKER_THROTTLE_MAX_SECONDS * 1000 * 3) + 10_000
    argv = [owner, waiter, _ms(due), lease_ms(), waiter_ttl_ms, warmup_ms(), *[c.limit for c in caps]]
    result = _script("acquire")(keys=keys, args=argv)
    code = int(result[0])
    if code == 1:
        return Grant(acquired=True)
    if code == -1:
        return Grant(acquired=False, warming_up_ms=int(result[3]))
    return Grant(acquired=False, blocking=caps[int(result[1]) - 1], held=int(result[2]), ahead=int(result[3]))


def semaphore_renew(caps: list[Cap], *, owner: str, reassert: bool) -> tuple[int, int]:
    """Extend the owner's leases; returns (renewed, reasserted)."""
    if not caps:
        return (0, 0)
    result = _script("renew")(keys=[c.key for c in caps], args=[owner, lease_ms(), int(reassert)])
    return int(result[0]), int(result[1])


def semaphore_release(caps: list[Cap], *, owner: str) -> int:
    if not caps:
        return 0
    return int(_script("release")(keys=[c.key for c in caps], args=[owner]))


def semaphore_forget_waiter(caps: list[Cap], *, waiter: str) -> None:
    if caps:
        keys = [c.waiters_key for c in caps] + [c.waiter_expiry_key for c in caps]
        _script("forget_waiter")(keys=keys, args=[waiter])


def semaphore_mark_warm() -> bool:
    """Declare the lease sets complete (nothing is running); True if this call set the epoch."""
    return bool(_script("mark_warm")(keys=[EPOCH_KEY], args=[warmup_ms()]))


def semaphore_holders(cap: Cap) -> list[str]:
    """Owners holding an unexpired lease on `cap` (for tests and diagnostics)."""
    client = semaphore_client()
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    return [m.decode() for m in client.zrangebyscore(cap.key, f"({now_ms}", "+inf")]
