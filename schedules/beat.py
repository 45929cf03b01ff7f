"""DatabaseScheduler: a Celery beat scheduler whose schedule lives in PostgreSQL.

Each pass claims due schedules (schedules.claiming), dispatches their slots (schedules.dispatch), sweeps
the outbox (schedules.publishing), and says how long to sleep: until the earliest schedule is due
(database clock), at most `interval`. Between passes it waits on PostgreSQL `LISTEN schedules_wake`
(a trigger notifies on every change of when a schedule is due), so a schedule created or edited to be
due now is dispatched within a second, whatever `interval` is.

`python manage.py run_scheduler` drives `run_pass`/`wait` itself (with SIGTERM handling);
`celery -A project beat -S schedules.beat:DatabaseScheduler` drives it through `tick`.
Constructed lazily (Celery builds a scheduler once just to print its banner), it touches nothing.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from datetime import timedelta

from celery.beat import Scheduler

from project.health import record_tick

logger = logging.getLogger(__name__)

WAKE_CHANNEL = "schedules_wake"
DEFAULT_INTERVAL = 30.0
DEFAULT_CLAIM_TTL = 120.0
DEFAULT_BATCH_SIZE = 500
# A never-published run is left this long to its own on-commit publish before the sweep takes it.
DEFAULT_PUBLISH_GRACE = 10.0
# A run published this long ago and still queued is published again when its queue holds no message
# (a worker took it and vanished: schedules/publishing.py); the worker's start gate drops the copies of
# a started run. With the reaper's wake-up (15 s) a lost message runs again within about 30 s.
DEFAULT_REPUBLISH_AFTER = 15.0
# The backstop, whatever the queue holds: published this long ago (the wait doubles with the run's age).
DEFAULT_REPUBLISH_BACKLOG_AFTER = 300.0
MAX_BACKOFF = 30.0
# A schedule is due but nothing could be claimed (its row is locked by another session, which SKIP
# LOCKED passes over), or a claimed one was busy the same way: look again after this long (seconds)
# rather than at once, which would spin the loop for as long as the lock is held.
BUSY_RETRY = 1.0
# SQLSTATEs of a statement stopped by this process's lock_timeout / statement_timeout
# (project/dbsession.py): someone else holds what it needs, so wait and retry, keeping the connection.
_TIMEOUT_SQLSTATES = {"55P03", "57014"}
# Runs launched through /api/runs/ have no scheduled run; their outbox query is costlier, so it runs
# at most this often (seconds) rather than every tick.
MANUAL_SWEEP_EVERY = 10.0


# The wake listener's probe: a NOTIFY sent through the main database connection must reach the
# listening connection within this long (seconds), or LISTEN is taken as not working here (a transaction
# pool between them drops it).
LISTEN_PROBE_TIMEOUT = 5.0
# After LISTEN was found not to work, look again this rarely (seconds), without another warning.
LISTEN_RETRY_SECONDS = 300.0


def default_claimant() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class ListenUnavailable(Exception):
    """LISTEN/NOTIFY cannot wake this scheduler through the connection it has."""


def listen_connection_params() -> dict:
    """psycopg2 parameters of the LISTEN connection: SCHEDULER_LISTEN_DATABASE_URL, else the main
    database's. Raises ListenUnavailable behind a transaction pool with no direct URL: a LISTEN there
    would sit on a server connection PgBouncer lends to other clients, and hear nothing."""
    from django.conf import settings
    from django.db import connection

    from project.env import database_from_url

    url = settings.SCHEDULER_LISTEN_DATABASE_URL
    if url:
        db = database_from_url(url)
        params = {
            "dbname": db["NAME"],
            "user": db["USER"],
            "password": db["PASSWORD"],
            "host": db["HOST"],
            "port": db["PORT"],
            **db["OPTIONS"],
        }
        params = {key: value for key, value in params.items() if value not in ("", None)}
    elif settings.DB_TRANSACTION_POOLING:
        raise ListenUnavailable("DB_TRANSACTION_POOLING is set and SCHEDULER_LISTEN_DATABASE_URL is not")
    else:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
    params.setdefault("connect_timeout", 5)
    return params


class WakeListener:
    """A dedicated autocommit connection LISTENing on the wake channel, plus a self-pipe for signals.

    Any failure (PostgreSQL down) just drops the connection: waiting degrades to a plain timed sleep
    and the next wait reconnects. Each new connection is probed: a NOTIFY sent through the main
    database connection (the path the schedule trigger's NOTIFYs take) must come back on it. When it
    does not (PgBouncer in transaction mode, or SCHEDULER_LISTEN_DATABASE_URL pointing at one), the
    scheduler logs one warning and sleeps its --interval (the loop still wakes for the earliest due
    schedule; only a change made meanwhile waits up to the interval), looking again every
    LISTEN_RETRY_SECONDS.
    """

    def __init__(self) -> None:
        self._conn = None
        self._warned = False
        self._retry_at = 0.0
        self._pipe_r, self._pipe_w = os.pipe()
        os.set_blocking(self._pipe_r, False)
        os.set_blocking(self._pipe_w, False)

    def interrupt(self) -> None:
        """Wake a pending wait (safe from a signal handler)."""
        try:
            os.write(self._pipe_w, b"x")
        except OSError:
            pass

    def _connect(self):
        import psycopg2

        conn = psycopg2.connect(**listen_connection_params())
        try:
            conn.autocommit = True
            self._probe(conn)
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {WAKE_CHANNEL}")  # last: what pg_stat_activity shows it waiting on
        except BaseException:
            conn.close()
            raise
        return conn

    def _probe(self, conn) -> None:
        """NOTIFY a channel of our own through the main connection; raise ListenUnavailable unless it
        reaches `conn` within LISTEN_PROBE_TIMEOUT."""
        from django.db import connection

        probe = f"{WAKE_CHANNEL}_probe_{os.getpid()}"
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {probe}")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, '')", [probe])
        deadline = time.monotonic() + LISTEN_PROBE_TIMEOUT
        while True:
            conn.poll()
            if any(n.channel == probe for n in conn.notifies):
                conn.notifies.clear()
                with conn.cursor() as cursor:
                    cursor.execute(f"UNLISTEN {probe}")
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ListenUnavailable("a NOTIFY through the main connection never reached the listener")
            select.select([conn], [], [], remaining)

    def wait(self, seconds: float) -> str:
        """Wait up to `seconds`; return "notify", "interrupt" or "timeout"."""
        deadline = time.monotonic() + max(0.0, seconds)
        if self._conn is None and time.monotonic() >= self._retry_at:
            try:
                self._conn = self._connect()
            except ListenUnavailable as exc:
                self._conn = None
                self._retry_at = time.monotonic() + LISTEN_RETRY_SECONDS
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "LISTEN/NOTIFY does not work through this database connection: schedule changes"
                        " will not wake this scheduler, it polls every --interval instead; set"
                        " SCHEDULER_LISTEN_DATABASE_URL to a direct PostgreSQL connection (not PgBouncer)",
                        extra={"reason": str(exc)},
                    )
            except Exception as exc:
                logger.warning("wake listener unavailable", extra={"error": type(exc).__name__})
                self._conn = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            fds = [self._pipe_r] + ([self._conn] if self._conn is not None else [])
            try:
                readable, _, _ = select.select(fds, [], [], remaining)
            except (OSError, ValueError):
                self.close_connection()
                continue
            if self._pipe_r in readable:
                self._drain_pipe()
                return "interrupt"
            if self._conn is not None and self._conn in readable:
                try:
                    self._conn.poll()
                    got = bool(self._conn.notifies)
                    self._conn.notifies.clear()
                except Exception:
                    self.close_connection()
                    continue
                if got:
                    return "notify"

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._pipe_r, 64):
                pass
        except OSError:
            pass

    def close_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def close(self) -> None:
        self.close_connection()
        for fd in (self._pipe_r, self._pipe_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _interruption(exc: BaseException) -> BaseException | None:
    """The SystemExit or KeyboardInterrupt an exception was raised while handling, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SystemExit | KeyboardInterrupt):
            return seen
        seen = seen.__context__
    return None


class DatabaseScheduler(Scheduler):
    """The beat loop over `Schedule` rows: claim, dispatch, sweep, sleep until due (capped)."""

    def __init__(
        self,
        *args,
        claimant: str | None = None,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        batch_size: int = DEFAULT_BATCH_SIZE,
        interval: float | None = None,
        misfire_grace: float | None = None,
        publish_grace: float = DEFAULT_PUBLISH_GRACE,
        republish_after: float = DEFAULT_REPUBLISH_AFTER,
        republish_backlog_after: float = DEFAULT_REPUBLISH_BACKLOG_AFTER,
        lazy: bool = False,
        **kwargs,
    ) -> None:
        # Plain attributes only: a lazily built scheduler (Celery's banner) must not touch anything.
        self.claimant = claimant or default_claimant()
        self.claim_ttl = float(claim_ttl)
        self.batch_size = int(batch_size)
        explicit_max = kwargs.get("max_interval")
        self.interval = float(
            interval if interval is not None else min(DEFAULT_INTERVAL, explicit_max or 1e9)
        )
        # "Missed" means older than one loop interval plus room for a slow pass.
        self.misfire_grace = timedelta(
            seconds=misfire_grace if misfire_grace is not None else self.interval + 30.0
        )
        self.publish_grace = float(publish_grace)
        self.republish_after = float(republish_after)
        self.republish_backlog_after = float(republish_backlog_after)
        self.stopping = False
        self._listener: WakeListener | None = None
        self._backoff = 0.0
        self._next_sleep = 0.0
        self._next_manual_sweep = 0.0
        self._next_reap = 0.0
        # Claims still ours whose rows another session had locked when we came to dispatch them.
        self._busy: list[int] = []
        super().__init__(*args, lazy=lazy, **kwargs)

    # --- celery.beat.Scheduler interface ---

    def setup_schedule(self) -> None:
        import django
        from django.apps import apps

        if not apps.ready:
            django.setup()
        from project.dbsession import apply_scheduler_timeouts

        # Before the first query: no statement of this process waits without bound (issue 15.4).
        apply_scheduler_timeouts()
        self._listener = WakeListener()
        logger.info(
            "scheduler started",
            extra={
                "claimant": self.claimant,
                "interval": self.interval,
                "claim_ttl": self.claim_ttl,
                "batch_size": self.batch_size,
            },
        )

    def tick(self, *args, **kwargs) -> float:
        """Celery beat's loop: wait (woken early by NOTIFY) for the sleep the last pass asked for, then
        run a pass. Returns 0 so beat's own `time.sleep` never delays a wake-up."""
        if self._next_sleep > 0:
            self.wait(self._next_sleep)
        self._next_sleep = self.run_pass()
        return 0.0

    @property
    def schedule(self) -> dict:
        # Celery's in-memory schedule stays empty: the schedule is the database's.
        return {}

    @property
    def info(self) -> str:
        return f"    . claimant -> {self.claimant}\n    . interval -> {self.interval}s"

    def sync(self) -> None:
        pass

    def close(self) -> None:
        from django.db import connection

        # Celery beat calls this from its SIGTERM handler, possibly in the middle of a dispatch
        # transaction that is about to roll back: then leave the claims to expire with their TTL.
        if connection.in_atomic_block:
            self.request_stop()
            return
        self.shutdown()

    # --- the loop ---

    def request_stop(self) -> None:
        """Finish the batch in hand, release the rest, stop (SIGTERM)."""
        self.stopping = True
        if self._listener is not None:
            self._listener.interrupt()

    def wait(self, seconds: float) -> str:
        if self.stopping:
            return "interrupt"
        if self._listener is None:
            time.sleep(seconds)
            return "timeout"
        return self._listener.wait(seconds)

    def run_pass(self) -> float:
        """Claim, dispatch, sweep; return the seconds to sleep before the next pass."""
        from django.db import DatabaseError, InterfaceError, OperationalError, close_old_connections

        from schedules.claiming import claim_due, seconds_until_due
        from schedules.dependencies import FIRE_BATCH, FireResult, fire_dependencies
        from schedules.dispatch import dispatch_claimed
        from schedules.publishing import sweep_outbox
        from schedules.retention import prune_history_if_due
        from schedules.retries import seconds_until_next_retry
        from schedules.signals import scheduler_pass_done

        # Liveness for `manage.py health --scheduler`: stamped whatever the pass then meets (an outage
        # backs the loop off, at most `interval`; it does not stop it).
        record_tick("scheduler", interval=self.interval)
        close_old_connections()
        claimed_ids: list[int] = []
        try:
            claims = claim_due(claimant=self.claimant, ttl=self.claim_ttl, limit=self.batch_size)
            claimed_ids = [claim.schedule_id for claim in claims]
            if claims:
                logger.info("schedules claimed", extra={"claimant": self.claimant, "count": len(claims)})
            # Claims kept from an earlier pass because their rows were locked by someone else.
            fresh = set(claimed_ids)
            claimed_ids += [sid for sid in self._busy if sid not in fresh]
            self._busy = []
            if claimed_ids:
                started = time.monotonic()
                result = dispatch_claimed(
                    claimed_ids,
                    claimant=self.claimant,
                    grace=self.misfire_grace,
                    ttl=self.claim_ttl,
                    should_stop=lambda: self.stopping,
                    taken_over={c.schedule_id: c.taken_over_at for c in claims if c.taken_over_at},
                )
                self._busy = result.busy
                if result.pending:
                    self._release(result.pending + self._busy)
                    self._busy = []
                logger.info(
                    "claimed schedules dispatched",
                    extra={
                        "claimant": self.claimant,
                        "dispatched": result.dispatched,
                        "skipped": result.skipped,
                        "published": result.published,
                        "publish_failed": result.publish_failed,
                        "lost": len(result.lost),
                        "failed": len(result.failed),
                        "released": len(result.pending),
                        "busy": len(result.busy),
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )
            claimed_ids = []
            if self.stopping:
                return 0.0
            # Runs of schedules that run after others whose runs ended (schedules/dependencies.py).
            try:
                fired = fire_dependencies()
            except (OperationalError, InterfaceError):
                raise
            except DatabaseError:
                # A deadlock with a dispatch, say: rolled back whole, the ends stay for the next pass.
                logger.exception("dependency sweep failed")
                fired = FireResult()
            if fired.consumed:
                logger.info(
                    "dependencies fired",
                    extra={"claimant": self.claimant, "ends": fired.consumed, "created": fired.created},
                )
            include_manual = time.monotonic() >= self._next_manual_sweep
            if include_manual:
                self._next_manual_sweep = time.monotonic() + MANUAL_SWEEP_EVERY
            try:
                sweep_outbox(
                    grace=self.publish_grace,
                    republish_after=self.republish_after,
                    republish_backlog_after=self.republish_backlog_after,
                    include_manual=include_manual,
                )
            except (OperationalError, InterfaceError):
                raise
            except DatabaseError:
                logger.exception("outbox sweep failed")
            self._reap_if_due()
            # Retention: old history, in bounded slices (rate limited); never raises.
            prune_history_if_due()
            # Whoever listens (monitoring: metrics counters, alert evaluation); a receiver's error is
            # logged by the signal, never raised into the loop.
            scheduler_pass_done.send_robust(
                sender=type(self), claimant=self.claimant, claimed=len(claims), interval=self.interval
            )
            if len(claims) >= self.batch_size or fired.consumed >= FIRE_BATCH:
                return 0.0  # more may be due right now
            until_due = seconds_until_due()
            # A run waiting to retry is published by the sweep: wake when the next one is due.
            until_retry = seconds_until_next_retry()
            if until_retry is not None:
                until_due = until_retry if until_due is None else min(until_due, until_retry)
        except (OperationalError, InterfaceError) as exc:
            if _interruption(exc) is not None:
                self.request_stop()
                raise _interruption(exc) from exc
            if getattr(exc.__cause__, "pgcode", None) in _TIMEOUT_SQLSTATES:
                return self._database_busy(exc)
            return self._database_unreachable(exc)
        except Exception as exc:
            stop = _interruption(exc)
            if stop is not None:
                # Celery beat's SIGTERM raises SystemExit wherever the loop is; inside a transaction's
                # exit it resurfaces as a ProgrammingError that must not swallow the stop (found by
                # tests/acceptance/test_scheduler_loop.py: beat kept running after SIGTERM).
                self.request_stop()
                raise stop from exc
            # A bug or an unexpected server error must not kill the loop: claims expire by themselves
            # and the next pass starts clean.
            logger.exception("scheduler pass failed", extra={"claimant": self.claimant})
            self._back_off()
            return min(self._backoff, self.interval)
        self._backoff = 0.0
        # Wake for the next reap too: the reaper's period bounds how late a dead worker's run ends.
        longest = min(self.interval, max(0.0, self._next_reap - time.monotonic()))
        if self._busy:
            longest = min(longest, BUSY_RETRY)
        if until_due is None:
            return longest
        if until_due <= 0 and not claims:
            # Due, yet the claim found nothing: the row is locked by another session. Poll for its
            # release (no NOTIFY comes when a lock is let go) instead of spinning on it.
            return min(longest, BUSY_RETRY)
        # A little past the due instant, so the next claim (database clock) finds it due.
        return max(0.0, min(until_due + 0.01, longest))

    def _reap_if_due(self) -> None:
        """Every scheduler also reaps (schedules/runstate.py), so a run whose every worker died still
        ends within one lease plus one reaper period. Safe with any number of instances."""
        import redis
        from django.conf import settings
        from django.db import InterfaceError, OperationalError

        from schedules.runstate import reap_lost_runs

        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + float(settings.WORKER_REAPER_INTERVAL_SECONDS)
        try:
            reaped = reap_lost_runs()
        except (OperationalError, InterfaceError):
            raise
        except redis.RedisError as exc:
            # Without Redis nobody can tell a dead worker from a live one: reap nothing now.
            logger.warning("reaper: Redis unreachable", extra={"error": type(exc).__name__})
            return
        if reaped:
            logger.warning("runs reaped", extra={"claimant": self.claimant, "count": len(reaped)})

    def _release(self, schedule_ids: list[int]) -> None:
        from schedules.claiming import release_claims

        released = release_claims(claimant=self.claimant, schedule_ids=schedule_ids)
        logger.info("claims released", extra={"claimant": self.claimant, "count": len(released)})

    def _back_off(self) -> None:
        """One more failed pass in a row: the wait doubles (1 s, 2 s, 4 s ... MAX_BACKOFF). It spans
        passes (Celery beat calls the loop once a tick), so it is this state, not a retry loop; a pass
        that succeeds sets it back to 0."""
        self._backoff = min(MAX_BACKOFF, max(1.0, self._backoff * 2))

    def _database_unreachable(self, exc: Exception) -> float:
        from django.db import connection

        # Nothing is published for an uncommitted transaction (publishing follows the commit), and
        # claims we may hold expire by themselves. Drop the connection; reconnect on the next pass.
        try:
            connection.close()
        except Exception:
            pass
        if self._listener is not None:
            self._listener.close_connection()
        self._back_off()
        logger.warning(
            "database unreachable; backing off",
            extra={"claimant": self.claimant, "error": type(exc).__name__, "retry_in": self._backoff},
        )
        return min(self._backoff, self.interval) if self.interval > 0 else self._backoff

    def _database_busy(self, exc: Exception) -> float:
        # A statement hit this process's lock_timeout or statement_timeout: the database is there but
        # something holds what the pass needs. Whatever the pass did not commit is rolled back and
        # claims we hold expire by themselves, as for an outage; the connection is fine to reuse.
        self._back_off()
        logger.warning(
            "database statement timed out; backing off",
            extra={
                "claimant": self.claimant,
                "error": type(exc.__cause__ or exc).__name__,
                "retry_in": self._backoff,
            },
        )
        return min(self._backoff, self.interval) if self.interval > 0 else self._backoff

    def shutdown(self) -> None:
        """Release anything still claimed (nothing, normally) and close the listener."""
        from schedules.claiming import release_all

        try:
            released = release_all(claimant=self.claimant)
            if released:
                logger.info("claims released", extra={"claimant": self.claimant, "count": released})
        except Exception as exc:
            logger.warning("could not release claims", extra={"error": type(exc).__name__})
        if self._listener is not None:
            self._listener.close()
            self._listener = None
