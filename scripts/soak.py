#!/usr/bin/env python
"""Soak with faults (issues 8 and 13): the whole system under SIGKILLs, server outages and run-now bursts.

    .venv/bin/python scripts/soak.py                 # the documented form: 10 minutes of faults
    .venv/bin/python scripts/soak.py --duration 100  # the CI form (tests/chaos/test_soak.py)

It starts its own PostgreSQL and Redis on free ports (so it may stop, restart and restore them; nothing
shared is touched), then the processes of `make run` against them: the web (gunicorn), 3 schedulers
(`run_scheduler`) and 2 workers (`run_worker`). Flower is left out: it only observes. Through the REST API
it creates 300 schedules of the `sleep` job: interval and cron, several timezones (half-hour and 45-minute
offsets among them), every overlap policy, a per-job cap on some, a global cap on all. Before the
schedulers start, one run-now runs alone (so the semaphore keys exist) and Redis is snapshotted (`SAVE`);
then the two 75 s schedules are run now, so that a run executes right through the long outage.

While the fault phase lasts, a seeded driver
- SIGKILLs a scheduler about every 10 s, preferring one that holds claims at that moment (it watches the
  claims for up to 3 s), and a random worker (its whole process group) about every 30 s, restarting each;
- crash-restarts PostgreSQL once (`pg_ctl -m immediate`, down 1-3 s) and stops it once for 2.5 worker
  leases (`-m fast`) while runs execute (kills and bursts go on meanwhile);
- restarts Redis once with its data lost, and once puts the early snapshot back (the old keys, a semaphore
  epoch among them, but none of the current leases) while runs execute under full caps;
- fires bursts of `run-now`.
Two threads sample every 100 ms: the `running` rows with a fresh heartbeat (SQL) and the live task
process groups of this system's runs (`orchestrator.taskprocs`, read from /proc: what executes, whatever
the database says). Then the schedules are disabled, the system drains, and the report is read:

- slots expected (the slot sequence of each schedule, `schedules.timing`) vs dispatched, lost, and
  dispatched at times the schedule does not have; schedules whose overlap policy is not `allow` seen with
  two runs executing at once (/proc);
- runs not terminal after the drain (0); runs executed twice: one run's task in two process groups (0);
  runs marked "worker lost" while /proc still showed their task executing a second later (0);
- the highest running count, SQL and /proc, against each cap (global, per job, one-per-schedule for the
  non-`allow` overlap policies): never above it, at any moment, Redis outage and restore included
  (docs/ARCHITECTURE.md, guarantee 5); the fullest over-cap sample is kept with its runs;
- scheduler kills that landed while the victim held claims (and the claims it left behind);
- p50/p99 dispatch lag (row created minus slot time) and start lag;
- processes that died without being killed, and 5xx answers other than 503 from the API (both 0).

Exit status 0 when every check holds. `--report FILE` writes the JSON report too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.taskprocs import live_task_groups  # noqa: E402
from schedules.timing import ScheduleSpec, next_slot  # noqa: E402
from tests.scheduler_support import PYTHON, PrivatePostgres, PrivateRedis, free_port  # noqa: E402

TIMEZONES = [
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "America/Sao_Paulo",
]
# (period in minutes, share of the schedules): about 0.7 dispatched slots a second for 300 schedules.
PERIODS = [(1, 0.03), (2, 0.07), (5, 0.15), (10, 0.25), (15, 0.25), (30, 0.25)]
DATABASE = "cb_soak"
LONG_RUN_SECONDS = 75  # the two schedules whose runs outlast their interval (and the long outage)


def api_request(
    base: str, token: str, method: str, path: str, body: dict | None = None, *, timeout: float
) -> tuple[int, dict | list | None]:
    """One API call: (status, JSON body); (status, None) for an HTTP error, (0, None) when unreachable."""
    request = urllib.request.Request(
        f"{base}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:  # URLError, refused, reset, timed out
        return 0, None


@dataclass
class Config:
    duration: float = 600.0
    schedules: int = 300
    seed: int = 8
    schedulers: int = 3
    workers: int = 2
    concurrency: int = 4
    global_cap: int = 6
    job_cap: int = 2
    lease: float = 8.0
    reaper: float = 2.0
    scheduler_kill_every: float = 10.0
    worker_kill_every: float = 30.0
    burst_every: float = 20.0
    outage_leases: float = 2.5  # the long PostgreSQL outage, in worker leases
    claim_hunt: float = 3.0  # how long a scheduler kill waits for a claim holder
    settle: float = 20.0
    drain: float = 300.0
    keep: bool = False


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)
    claimant: str = ""  # a scheduler's `--claimant`, new at each start (as hostname:pid would be)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def reap(self, timeout: float = 20.0) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)


class System:
    """Private PostgreSQL and Redis, and the processes of `make run` against them."""

    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = PrivatePostgres()
        self.redis = PrivateRedis(data_dir=workdir / "redis")
        self.snapshot = workdir / "redis-snapshot.rdb"
        self.web_port = free_port()
        self.procs: dict[str, Proc] = {}
        self.token = ""
        self.env: dict[str, str] = {}

    # servers

    def start_servers(self) -> None:
        self.pg.init()
        self.pg.start()
        conn = self.pg.connect()
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        conn.close()
        self.redis.start()
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "project.settings",
                "SECRET_KEY": secrets.token_urlsafe(40),
                "DEBUG": "0",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": str(self.pg.port),
                "POSTGRES_DB": DATABASE,
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "REDIS_URL": self.redis.url,
                "CELERY_BROKER_URL": self.redis.url,
                "SCHEDULER_MAX_GLOBAL": str(self.config.global_cap),
                "WORKER_LEASE_SECONDS": str(self.config.lease),
                "WORKER_REAPER_INTERVAL_SECONDS": str(self.config.reaper),
                "WORKER_THROTTLE_BASE_SECONDS": "0.5",
                "WORKER_THROTTLE_MAX_SECONDS": "3",
                "WORKER_HARD_LIMIT_GRACE_SECONDS": "5",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env = env
        self.manage("migrate", "--no-input")
        self.token = self.manage("create_api_token", "soak").strip().splitlines()[-1]

    def manage(self, *args: str) -> str:
        done = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    # processes

    def add(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv)
        self.procs[name] = proc
        self.launch(proc)
        return proc

    def launch(self, proc: Proc) -> None:
        proc.starts += 1
        argv = proc.argv
        if proc.name.startswith("scheduler"):
            proc.claimant = f"soak-{proc.name}.{proc.starts}"
            argv = [*argv, f"--claimant={proc.claimant}"]
        with open(self.logs / f"{proc.name}.log", "ab") as log:
            proc.popen = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_web_and_workers(self) -> None:
        gunicorn = str(Path(PYTHON).with_name("gunicorn"))
        self.add(
            "web",
            [gunicorn, "project.wsgi", "--bind", f"127.0.0.1:{self.web_port}", "--workers", "2"],
        )
        for i in range(1, self.config.workers + 1):
            self.add(
                f"worker-{i}",
                [
                    PYTHON,
                    "manage.py",
                    "run_worker",
                    "--concurrency",
                    str(self.config.concurrency),
                    "--hostname",
                    f"w{i}@%h",
                ],
            )

    def start_schedulers(self) -> None:
        for i in range(1, self.config.schedulers + 1):
            self.add(
                f"scheduler-{i}",
                [
                    PYTHON,
                    "manage.py",
                    "run_scheduler",
                    "--interval=5",
                    "--claim-ttl=5",
                    "--misfire-grace=60",
                    "--publish-grace=2",
                    "--republish-after=10",
                    "--republish-backlog-after=10",
                ],
            )

    def kill(self, proc: Proc) -> None:
        """SIGKILL the process group (a worker's pool and task children too) and start it again."""
        proc.signal(signal.SIGKILL)
        proc.reap()
        self.launch(proc)

    def revive_dead(self) -> list[str]:
        """A process that died without being killed is a finding: record it and start it again."""
        revived = []
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is not None:
                proc.unexpected_exits.append(proc.popen.returncode)
                self.launch(proc)
                revived.append(proc.name)
        return revived

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.reap(timeout=15)
            proc.signal(signal.SIGKILL)
            proc.reap(timeout=5)

    def destroy(self) -> None:
        self.stop()
        self.redis.stop()
        self.pg.destroy()

    # Redis snapshots

    def snapshot_redis(self) -> list[str]:
        """`SAVE` and keep the file aside; the live dump file goes, so a plain restart still loses data."""
        client = self.redis.client()
        try:
            client.save()
            keys = sorted(k.decode() for k in client.keys("cb:*"))
        finally:
            client.close()
        dump = self.redis.data_dir / "dump.rdb"
        shutil.copyfile(dump, self.snapshot)
        dump.unlink()
        return keys

    def restore_redis(self) -> dict:
        """Stop Redis and start it on the early snapshot: the old keys are back, the current leases not."""
        self.redis.stop()
        dump = self.redis.data_dir / "dump.rdb"
        shutil.copyfile(self.snapshot, dump)
        self.redis.start()
        dump.unlink()
        client = self.redis.client()
        try:
            # The semaphore's own keys as restored (an epoch or a sequence, worker/semaphore.py): stale
            # values a worker must not trust.
            sem = {
                key.decode(): (client.get(key) or b"").decode() if client.type(key) == b"string" else "..."
                for key in client.keys("cb:sem*")
            }
            return {"keys": client.dbsize(), "semaphore_keys": dict(sorted(sem.items()))}
        finally:
            client.close()

    # the API

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list | None]:
        return api_request(f"http://127.0.0.1:{self.web_port}", self.token, method, path, body, timeout=30)

    def sql(self, statement: str, params: object = None) -> list[tuple]:
        conn = self.pg.connect(DATABASE)
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()


# --- schedules ---------------------------------------------------------------------------------------


def schedule_bodies(n: int, rng: random.Random, job_cap: int) -> list[dict]:
    periods = [p for p, _ in PERIODS]
    weights = [w for _, w in PERIODS]
    bodies = []
    for i in range(n):
        period = rng.choices(periods, weights)[0]
        body: dict = {
            "name": f"soak-{i:03d}",
            "job_key": "sleep",
            "enabled": True,
            "timezone": rng.choice(TIMEZONES),
            "custom_directive_text": str(rng.choice([0.2, 0.5, 1, 2])),
            "overlap_policy": rng.choice(["allow", "skip", "buffer_one"]),
            "misfire_policy": rng.choice(["run_once", "run_all", "skip"]),
        }
        if rng.random() < 0.6:
            body.update(schedule_type="interval", interval_minutes=period)
        else:
            offset = rng.randrange(period)
            minutes = "*" if period == 1 else f"{offset}-59/{period}"
            # A fixed hour field (a range) takes the other branch of the DST rules than `*`.
            hours = "0-23" if rng.random() < 0.5 else "*"
            body.update(schedule_type="cron", cron_expr=f"{minutes} {hours} * * *")
        if rng.random() < 0.2:
            body["max_per_job"] = job_cap
        bodies.append(body)
    # A few long runs on one-minute schedules: their next slot always finds the last one unfinished.
    for body in bodies[:2]:
        body.update(
            schedule_type="interval",
            interval_minutes=1,
            cron_expr="",
            custom_directive_text=str(LONG_RUN_SECONDS),
            overlap_policy=rng.choice(["skip", "buffer_one"]),
        )
    return bodies


def create_schedules(system: System, bodies: list[dict], rng: random.Random) -> None:
    for body in bodies:
        body = {k: v for k, v in body.items() if v != ""}
        status, data = system.api("POST", "/api/schedules/", body)
        if status != 201:
            raise RuntimeError(f"creating {body['name']}: HTTP {status} {data}")
    # Interval schedules start one interval after creation; spread their first slots over that interval
    # so that the short CI form sees slots of most periods too, not all at once.
    rows = system.sql(
        "SELECT id, interval_minutes FROM schedules_schedule WHERE schedule_type = 'interval' ORDER BY id"
    )
    offsets = [(sid, rng.uniform(3.0, minutes * 60.0)) for sid, minutes in rows]
    system.sql(  # one statement (one connection) for all of them
        """UPDATE schedules_schedule s SET next_run_at = now() + make_interval(secs => o.secs)
             FROM unnest(%s::bigint[], %s::float8[]) AS o(id, secs) WHERE s.id = o.id""",
        [[sid for sid, _ in offsets], [secs for _, secs in offsets]],
    )


# --- the fault phase ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Running runs every 100 ms: total (global cap), capped schedules (per-job cap), per schedule.

    A run counts while its heartbeat is younger than one lease minus a second: a killed worker's runs stop
    counting when their semaphore leases expire, as they stop holding a slot then (docs/ARCHITECTURE.md,
    guarantee 5).
    """

    SQL = """
        SELECT sr.schedule_id, s.overlap_policy, s.max_per_job, r.id, r.worker,
               extract(epoch FROM now() - COALESCE(r.heartbeat_at, r.started_at))
          FROM orchestrator_run r
          LEFT JOIN schedules_scheduledrun sr ON sr.run_id = r.id
          LEFT JOIN schedules_schedule s ON s.id = sr.schedule_id
         WHERE r.status = 'running'
           AND COALESCE(r.heartbeat_at, r.started_at) > now() - make_interval(secs => %s)
    """

    def __init__(self, system: System) -> None:
        super().__init__(daemon=True)
        self.system = system
        self.samples: list[tuple[float, int, int, int]] = []  # (t, total, per-job capped, max per schedule)
        self.failed_samples = 0
        # The fullest sample seen for each scope, with its runs: what to look at when a cap is exceeded.
        self.fullest: dict[str, tuple[int, float, list]] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        conn = None
        window = max(self.system.config.lease - 1.0, 0.5)
        while not self.stop_event.wait(0.1):
            try:
                if conn is None:
                    conn = self.system.pg.connect(DATABASE)
                with conn.cursor() as cursor:
                    cursor.execute(self.SQL, [window])
                    rows = cursor.fetchall()
            except Exception:
                self.failed_samples += 1
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                continue
            per_schedule: dict[int, int] = {}
            capped = 0
            for schedule_id, overlap, max_per_job, *_ in rows:
                if max_per_job:
                    capped += 1
                if schedule_id is not None and overlap != "allow":
                    per_schedule[schedule_id] = per_schedule.get(schedule_id, 0) + 1
            now = time.monotonic()
            sample = (now, len(rows), capped, max(per_schedule.values(), default=0))
            self.samples.append(sample)
            for scope, count in zip(("global", "per_job", "per_schedule"), sample[1:], strict=True):
                if count > self.fullest.get(scope, (-1,))[0]:
                    runs = [
                        {"run": r[3], "schedule": r[0], "worker": r[4], "beat_age": round(float(r[5]), 2)}
                        for r in rows
                    ]
                    self.fullest[scope] = (count, now, runs)
        with contextlib.suppress(Exception):
            conn.close()


class ProcSampler(threading.Thread):
    """This system's live task process groups every 100 ms, read from /proc (`orchestrator.taskprocs`).

    The host is shared (other tests may run task processes too): a group belongs to this soak when its
    processes' environment points at the soak's private PostgreSQL port. Samples keep (run, job, task,
    pgid) only; schedules and caps are mapped from SQL after the drain, so PostgreSQL outages do not blind
    this sampler.
    """

    def __init__(self, system: System) -> None:
        super().__init__(daemon=True)
        self.marker = f"\0POSTGRES_PORT={system.pg.port}\0".encode()
        # (monotonic, wall clock, ((run, job, task, pgid), ...)): the wall clock is compared with the
        # database's timestamps (same host, same clock).
        self.samples: list[tuple[float, float, tuple[tuple[int, str, str, int], ...]]] = []
        self.failed_samples = 0
        self.ours: dict[tuple[int, int, str], bool] = {}  # (pgid, run, task) -> of this soak
        self.stop_event = threading.Event()

    def belongs(self, group) -> bool:
        key = (group.pgid, group.run_id, group.task)
        if key not in self.ours:
            for pid in group.pids or [group.pgid]:
                try:
                    environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                self.ours[key] = self.marker in environ
                break
            else:
                return False  # gone before we could tell; asked again next time if still there
        return self.ours[key]

    def latest(self) -> set[int]:
        return {g[0] for g in self.samples[-1][2]} if self.samples else set()

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            try:
                groups = [g for g in live_task_groups().values() if self.belongs(g)]
            except Exception:
                self.failed_samples += 1
                continue
            self.samples.append(
                (
                    time.monotonic(),
                    time.time(),
                    tuple(sorted((g.run_id, g.job_key, g.task, g.pgid) for g in groups)),
                )
            )


@dataclass
class Faults:
    scheduler_kills: int = 0
    scheduler_kills_with_claims: int = 0  # the victim held claims right before the SIGKILL
    claims_left_by_kills: int = 0  # claims still held by a killed scheduler's claimant after its death
    worker_kills: int = 0
    postgres_restarts: int = 0
    postgres_outages: int = 0
    redis_restarts: int = 0
    redis_restores: int = 0
    run_now_sent: int = 0
    run_now_status: dict[str, int] = field(default_factory=dict)
    outage_status: dict[str, int] = field(default_factory=dict)  # API answers while PostgreSQL is down
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic, kind, detail)
    started: float = 0.0
    postgres_down_seconds: float = 0.0
    postgres_outage_seconds: float = 0.0
    redis_down_seconds: float = 0.0
    # What executed (/proc) when the long outage began and ended, and when the snapshot came back.
    long_run_at_outage: int | None = None  # a 75 s run executing when the outage began, if one came
    runs_live_at_outage_start: list[int] = field(default_factory=list)
    runs_live_through_outage: list[int] = field(default_factory=list)
    runs_live_at_restore: list[int] = field(default_factory=list)
    throttled_at_restore: int = 0
    snapshot_keys: list[str] = field(default_factory=list)
    restored: dict = field(default_factory=dict)


class ClaimWatch:
    """Who holds claims right now (SQL on one reused connection; None while PostgreSQL is away)."""

    SQL = """SELECT claimed_by, count(*) FROM schedules_schedule
              WHERE claimed_until > now() AND claimed_by LIKE 'soak-%%' GROUP BY 1"""

    def __init__(self, system: System) -> None:
        self.system = system
        self.conn = None

    def holders(self) -> dict[str, int] | None:
        try:
            if self.conn is None:
                self.conn = self.system.pg.connect(DATABASE)
            with self.conn.cursor() as cursor:
                cursor.execute(self.SQL)
                return dict(cursor.fetchall())
        except Exception:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def kill_scheduler(
    system: System, schedulers: list[Proc], rng: random.Random, watch: ClaimWatch, faults: Faults
) -> str:
    """SIGKILL a scheduler, preferring one that holds claims: a kill between claim and release is the one
    that tests re-claiming (docs/ARCHITECTURE.md, guarantee 2). Claims are held for milliseconds around each
    dispatch, so watch
    for a holder for up to `claim_hunt` seconds, then take a random victim."""
    deadline = time.monotonic() + system.config.claim_hunt
    by_claimant = {p.claimant: p for p in schedulers}
    held: dict[str, int] | None = None
    while True:
        held = watch.holders()
        holding = sorted(c for c in (held or {}) if c in by_claimant)
        if holding or held is None or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    victim = by_claimant[rng.choice(holding)] if holding else rng.choice(schedulers)
    claimant, n = victim.claimant, (held or {}).get(victim.claimant, 0)
    system.kill(victim)
    faults.scheduler_kills += 1
    left = 0
    if n:
        faults.scheduler_kills_with_claims += 1
        # The old claimant is dead and nobody else may take its claims before they expire.
        left = (watch.holders() or {}).get(claimant, 0)
        faults.claims_left_by_kills += left
    return f"{victim.name} claims={'?' if held is None else n} left={left}"


def wait_for_long_run(
    system: System, long_ids: list[int], procs: ProcSampler, outage: float, timeout: float
) -> int | None:
    """A run of a long schedule executing (per /proc) that started recently enough to outlast `outage`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = sorted(procs.latest())
        rows = system.sql(
            """SELECT r.id FROM orchestrator_run r JOIN schedules_scheduledrun sr ON sr.run_id = r.id
                WHERE sr.schedule_id = ANY(%s) AND r.id = ANY(%s) AND r.status = 'running'
                  AND r.started_at > now() - make_interval(secs => %s) ORDER BY r.id LIMIT 1""",
            [long_ids, live, LONG_RUN_SECONDS - outage - 10.0],
        )
        if rows:
            return rows[0][0]
        time.sleep(0.5)
    return None


def burst(system: System, schedule_ids: list[int], rng: random.Random, faults: Faults) -> None:
    for sid in rng.sample(schedule_ids, k=rng.randint(5, 10)):
        status, _ = system.api("POST", f"/api/schedules/{sid}/run-now")
        faults.run_now_sent += 1
        faults.run_now_status[str(status)] = faults.run_now_status.get(str(status), 0) + 1


def fault_phase(
    system: System, schedule_ids: list[int], rng: random.Random, procs: ProcSampler, log
) -> Faults:
    config = system.config
    faults = Faults()
    start = faults.started = time.monotonic()
    end = start + config.duration
    due = {
        "scheduler": start + rng.uniform(0.5, 1.5) * config.scheduler_kill_every,
        "worker": start + rng.uniform(0.5, 1.5) * config.worker_kill_every,
        "burst": start + rng.uniform(0.5, 1.0) * config.burst_every,
        "postgres": start + 0.12 * config.duration,
        "redis": start + 0.25 * config.duration,
        "outage": start + 0.35 * config.duration,
        "restore": start + 0.8 * config.duration,
    }
    schedulers = [p for n, p in system.procs.items() if n.startswith("scheduler")]
    workers = [p for n, p in system.procs.items() if n.startswith("worker")]
    watch = ClaimWatch(system)
    outage_began = 0.0
    while True:
        kind = min(due, key=due.get)
        if due[kind] >= end:
            if "outage_end" not in due:
                break
            kind = "outage_end"  # PostgreSQL comes back whenever the outage began
        at = due[kind]
        time.sleep(max(0.0, at - time.monotonic()))
        revived = system.revive_dead()
        if revived:
            faults.events.append((time.monotonic(), "revived", ",".join(revived)))
        detail = ""
        if kind == "scheduler":
            detail = kill_scheduler(system, schedulers, rng, watch, faults)
            due[kind] = at + rng.uniform(0.7, 1.3) * config.scheduler_kill_every
        elif kind == "worker":
            victim = rng.choice(workers)
            detail = victim.name
            system.kill(victim)
            faults.worker_kills += 1
            due[kind] = at + rng.uniform(0.7, 1.3) * config.worker_kill_every
        elif kind == "burst":
            burst(system, schedule_ids, rng, faults)
            due[kind] = at + rng.uniform(0.7, 1.3) * config.burst_every
        elif kind == "postgres":
            t0 = time.monotonic()
            system.pg.stop("immediate")
            down_until = time.monotonic() + rng.uniform(1.0, 3.0)  # as a crashed server restarting is
            # The API while the database is down: a 503 with Retry-After, never a 500.
            for path in ("/api/schedules/", f"/api/schedules/{schedule_ids[0]}/run-now"):
                status, _ = system.api("GET" if path.endswith("/") else "POST", path)
                faults.outage_status[str(status)] = faults.outage_status.get(str(status), 0) + 1
            time.sleep(max(0.0, down_until - time.monotonic()))
            system.pg.start()
            faults.postgres_down_seconds = time.monotonic() - t0
            faults.postgres_restarts += 1
            del due[kind]
        elif kind == "outage":
            # Longer than a lease, with runs executing: a live run must survive it (docs/ARCHITECTURE.md,
            # guarantee 7) and no
            # cap may be exceeded when PostgreSQL returns (6.5). Kills and bursts go on meanwhile.
            # A long run that will outlast the outage (started before the schedulers; waited for here
            # at most 15 s). The global cap is full by then: runs wait behind it (start lag ~1 min).
            faults.long_run_at_outage = wait_for_long_run(
                system, schedule_ids[:2], procs, config.outage_leases * config.lease, timeout=15.0
            )
            outage_began = time.monotonic()
            faults.runs_live_at_outage_start = sorted(procs.latest())
            system.pg.stop("fast")
            for path in ("/api/schedules/", f"/api/schedules/{schedule_ids[0]}/run-now"):
                status, _ = system.api("GET" if path.endswith("/") else "POST", path)
                faults.outage_status[str(status)] = faults.outage_status.get(str(status), 0) + 1
            detail = f"live={len(faults.runs_live_at_outage_start)}"
            due["outage_end"] = outage_began + config.outage_leases * config.lease
            del due[kind]
        elif kind == "outage_end":
            faults.runs_live_through_outage = sorted(set(faults.runs_live_at_outage_start) & procs.latest())
            system.pg.start()
            faults.postgres_outage_seconds = time.monotonic() - outage_began
            faults.postgres_outages += 1
            detail = (
                f"{faults.postgres_outage_seconds:.1f}s live_through={len(faults.runs_live_through_outage)}"
            )
            del due[kind]
        elif kind == "redis":
            t0 = time.monotonic()
            system.redis.stop()
            time.sleep(rng.uniform(1.0, 3.0))
            system.redis.start()
            faults.redis_down_seconds = time.monotonic() - t0
            faults.redis_restarts += 1
            del due[kind]
        elif kind == "restore":
            # Under full caps (the load keeps runs waiting as throttled behind them): a worker that
            # trusts the restored semaphore state admits them into slots held by the live runs.
            with contextlib.suppress(RuntimeError):  # runs executing, whose leases the snapshot lacks
                wait_until(procs.latest, 10, "a live run", interval=0.1)
            faults.runs_live_at_restore = sorted(procs.latest())
            ((faults.throttled_at_restore,),) = system.sql(
                "SELECT count(*) FROM schedules_scheduledrun WHERE status = 'throttled'"
            )
            faults.restored = system.restore_redis()
            faults.redis_restores += 1
            detail = f"live={len(faults.runs_live_at_restore)} {faults.restored}"
            del due[kind]
        faults.events.append((at, kind, detail))
        log(f"[soak] {time.monotonic() - start:6.1f}s {kind} {detail}")
    time.sleep(max(0.0, end - time.monotonic()))
    watch.close()
    system.revive_dead()
    return faults


# --- the report --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def slot_report(system: System, initial: dict[int, tuple[ScheduleSpec, datetime]], cutoff: datetime) -> dict:
    """Expected slots up to `cutoff` must all be dispatched; any dispatched slot must be one of the
    schedule's own slots (up to a minute past the moment dispatching stopped)."""
    dispatched: dict[int, list[datetime]] = {}
    for sid, scheduled_for in system.sql(
        "SELECT schedule_id, scheduled_for FROM schedules_scheduledrun WHERE trigger = 'schedule'"
    ):
        dispatched.setdefault(sid, []).append(scheduled_for)
    expected_total = dispatched_total = lost = unexpected = 0
    lost_examples: list[str] = []
    for sid, (spec, first) in initial.items():
        valid: list[datetime] = []
        slot = first
        while slot <= cutoff + timedelta(minutes=1):
            valid.append(slot)
            slot = next_slot(spec, after=slot)
        required = {s for s in valid if s <= cutoff}
        got = set(dispatched.get(sid, []))
        expected_total += len(required)
        dispatched_total += len(got & required)
        missing = required - got
        lost += len(missing)
        unexpected += len(got - set(valid))
        lost_examples += [f"{sid}@{s.isoformat()}" for s in sorted(missing)[:2]]
    # No duplicate-slot count: the unique constraint scheduledrun_unique_slot makes it 0 by construction.
    # What can go wrong instead is a slot at a time the schedule does not have (above) and two runs of
    # one schedule executing at once (/proc, in proc_report).
    return {
        "slots_expected": expected_total,
        "slots_dispatched": dispatched_total,
        "slots_lost": lost,
        "slots_unexpected": unexpected,
        "lost_examples": lost_examples[:10],
    }


def broker_places(system: System, task_ids: list[str]) -> dict[str, str]:
    """Where each task id's message is in Redis: a queue, or `unacked` with its delivery age."""
    if not task_ids:
        return {}
    places: dict[str, str] = {}
    client = system.redis.client()
    try:
        for key in client.keys("jobs.*"):
            if client.type(key) != b"list":
                continue
            for raw in client.lrange(key, 0, -1):
                for task_id in task_ids:
                    if task_id.encode() in raw:
                        places[task_id] = f"queue {key.decode()}"
        delivered = dict(client.zrange("unacked_index", 0, -1, withscores=True))
        for tag, raw in client.hgetall("unacked").items():
            for task_id in task_ids:
                if task_id.encode() in raw:
                    places[task_id] = f"unacked {time.time() - delivered.get(tag, time.time()):.0f}s"
    finally:
        client.close()
    return places


def run_report(system: System) -> dict:
    statuses = dict(system.sql("SELECT status, count(*) FROM schedules_scheduledrun GROUP BY 1"))
    run_statuses = dict(system.sql("SELECT status, count(*) FROM orchestrator_run GROUP BY 1"))
    triggers = dict(system.sql("SELECT trigger, count(*) FROM schedules_scheduledrun GROUP BY 1"))
    (not_terminal,) = system.sql(
        """SELECT (SELECT count(*) FROM orchestrator_run WHERE status IN ('queued', 'running'))
                + (SELECT count(*) FROM schedules_scheduledrun
                    WHERE status IN ('queued', 'throttled', 'running'))"""
    )[0]
    (unlinked,) = system.sql(
        "SELECT count(*) FROM schedules_scheduledrun WHERE status <> 'skipped' AND run_id IS NULL"
    )[0]
    lags = system.sql(
        """SELECT extract(epoch FROM created_at - scheduled_for),
                  extract(epoch FROM started_at - scheduled_for)
             FROM schedules_scheduledrun WHERE trigger = 'schedule'"""
    )
    dispatch = [float(a) for a, _ in lags]
    start = [float(b) for _, b in lags if b is not None]
    unfinished = system.sql(
        """SELECT r.id, r.status, r.task_id, r.error_summary, sr.status, sr.trigger,
                  extract(epoch FROM now() - r.created_at), extract(epoch FROM now() - r.published_at),
                  extract(epoch FROM now() - sr.published_at)
             FROM orchestrator_run r LEFT JOIN schedules_scheduledrun sr ON sr.run_id = r.id
            WHERE r.status IN ('queued', 'running') OR sr.status IN ('queued', 'throttled', 'running')
            ORDER BY r.id LIMIT 10"""
    )
    in_broker = broker_places(system, [row[2] for row in unfinished])
    failures = system.sql(
        """SELECT regexp_replace(error_summary, '[0-9]+', 'N', 'g'), count(*) FROM orchestrator_run
            WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC LIMIT 5"""
    )

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {
        "scheduled_runs_by_status": statuses,
        "scheduled_runs_by_trigger": triggers,
        "runs_by_status": run_statuses,
        "failed_reasons": {reason: n for reason, n in failures},
        "not_terminal": not_terminal,
        "not_terminal_examples": [
            {
                "run": rid,
                "status": status,
                "scheduled_status": sr_status,
                "trigger": trigger,
                "error": error,
                "age_s": round(float(age), 1),
                "since_publish_s": None if pub is None else round(float(pub), 1),
                "since_scheduled_publish_s": None if sr_pub is None else round(float(sr_pub), 1),
                "in_broker": in_broker.get(task_id, "nowhere"),
            }
            for rid, status, task_id, error, sr_status, trigger, age, pub, sr_pub in unfinished
        ],
        "scheduled_runs_without_run": unlinked,
        "dispatch_lag_s": {
            "p50": rounded(percentile(dispatch, 0.5)),
            "p99": rounded(percentile(dispatch, 0.99)),
            "max": rounded(max(dispatch, default=None)),
        },
        "start_lag_s": {
            "p50": rounded(percentile(start, 0.5)),
            "p99": rounded(percentile(start, 0.99)),
        },
    }


def caps_of(config: Config) -> dict[str, int]:
    return {"global": config.global_cap, "per_job": config.job_cap, "per_schedule": 1}


def sql_cap_report(sampler: Sampler, config: Config, at) -> dict:
    return {
        "samples": len(sampler.samples),
        "samples_failed": sampler.failed_samples,
        "max_running": {
            scope: max((s[i] for s in sampler.samples), default=0)
            for i, scope in enumerate(("global", "per_job", "per_schedule"), start=1)
        },
        "over_cap_samples": {
            scope: {"running": count, "at_s": at(t), "runs": runs}
            for scope, (count, t, runs) in sampler.fullest.items()
            if count > caps_of(config)[scope]
        },
    }


def proc_report(system: System, procs: ProcSampler, config: Config, at) -> dict:
    """The /proc samples against the caps, with each run's schedule and caps mapped from SQL afterwards.

    Also what only the operating system can show: two runs of one non-`allow` schedule executing at once,
    and a run executed twice (one run's task in two process groups, at once or one after the other).
    """
    run_ids = sorted({g[0] for _, _, groups in procs.samples for g in groups})
    meta = {
        rid: (sid, overlap, max_per_job)
        for rid, sid, overlap, max_per_job in system.sql(
            """SELECT r.id, sr.schedule_id, s.overlap_policy, s.max_per_job FROM orchestrator_run r
                 LEFT JOIN schedules_scheduledrun sr ON sr.run_id = r.id
                 LEFT JOIN schedules_schedule s ON s.id = sr.schedule_id
                WHERE r.id = ANY(%s)""",
            [run_ids],
        )
    }
    caps = caps_of(config)
    maxima = dict.fromkeys(caps, 0)
    fullest: dict[str, dict] = {}
    overlapping: dict[int, list[int]] = {}  # schedule -> the runs seen executing together
    pgids: dict[tuple[int, str], set[int]] = {}  # (run, task) -> process groups it executed in
    with_runs = 0
    last_seen: dict[int, float] = {}  # run -> wall-clock time of the last sample showing it
    for t, wall, groups in procs.samples:
        with_runs += bool(groups)
        runs: dict[int, list[tuple]] = {}
        for group in groups:
            runs.setdefault(group[0], []).append(group)
            last_seen[group[0]] = wall
            pgids.setdefault((group[0], group[2]), set()).add(group[3])
        per_job: dict[str, int] = {}
        per_schedule: dict[int, list[int]] = {}
        for rid, members in runs.items():
            sid, overlap, max_per_job = meta.get(rid, (None, None, None))
            if max_per_job:
                per_job[members[0][1]] = per_job.get(members[0][1], 0) + 1
            if sid is not None and overlap != "allow":
                per_schedule.setdefault(sid, []).append(rid)
        counts = {
            "global": len(runs),
            "per_job": max(per_job.values(), default=0),
            "per_schedule": max((len(r) for r in per_schedule.values()), default=0),
        }
        for sid, rids in per_schedule.items():
            if len(rids) > 1:
                overlapping.setdefault(sid, sorted(rids))
        for scope, count in counts.items():
            maxima[scope] = max(maxima[scope], count)
            if count > caps[scope] and count > fullest.get(scope, {}).get("running", 0):
                fullest[scope] = {
                    "running": count,
                    "at_s": at(t),
                    "runs": [
                        {"run": g[0], "schedule": meta.get(g[0], (None,))[0], "task": g[2], "pgid": g[3]}
                        for g in groups
                    ],
                }
    twice = {key: sorted(groups) for key, groups in pgids.items() if len(groups) > 1}
    # docs/ARCHITECTURE.md, guarantee 7: a run whose worker is alive is never marked lost. A dead worker's
    # tasks die with it
    # (parent-death signal), a lease before the reaper writes "worker lost"; a task still executing a
    # second after that write was reaped alive (a PostgreSQL outage or a Redis restore mistaken for death).
    lost_alive = []
    for rid, finished in system.sql(
        """SELECT id, extract(epoch FROM finished_at) FROM orchestrator_run
            WHERE status = 'failed' AND error_summary LIKE 'worker lost%%' AND id = ANY(%s)""",
        [run_ids],
    ):
        if finished is not None and last_seen[rid] > float(finished) + 1.0:
            lost_alive.append({"run": rid, "alive_after_s": round(last_seen[rid] - float(finished), 1)})
    return {
        "samples": len(procs.samples),
        "samples_failed": procs.failed_samples,
        "samples_with_runs": with_runs,
        "runs_seen": len(run_ids),
        "max_running": maxima,
        "over_cap_samples": fullest,
        "schedules_run_concurrently": len(overlapping),
        "schedules_run_concurrently_examples": [
            {"schedule": sid, "runs": rids} for sid, rids in sorted(overlapping.items())[:10]
        ],
        "runs_lost_while_executing": len(lost_alive),
        "runs_lost_while_executing_examples": lost_alive[:10],
        "runs_executed_twice": len({rid for rid, _ in twice}),
        "runs_executed_twice_examples": [
            {"run": rid, "task": task, "pgids": groups} for (rid, task), groups in sorted(twice.items())[:10]
        ],
    }


def verdict(report: dict) -> list[str]:
    problems = []
    slots, runs, caps = report["slots"], report["runs"], report["caps"]
    if slots["slots_lost"]:
        problems.append(f"{slots['slots_lost']} lost slots: {slots['lost_examples']}")
    if slots["slots_unexpected"]:
        problems.append(f"{slots['slots_unexpected']} slots at times the schedule does not have")
    if slots["schedules_run_concurrently"]:
        problems.append(
            f"{slots['schedules_run_concurrently']} schedules (overlap not `allow`) had two runs executing"
            f" at once (/proc): {slots['schedules_run_concurrently_examples']}"
        )
    if runs["not_terminal"]:
        problems.append(f"{runs['not_terminal']} runs not terminal after the drain")
    if runs["runs_executed_twice"]:
        problems.append(
            f"{runs['runs_executed_twice']} runs executed twice (/proc):"
            f" {runs['runs_executed_twice_examples']}"
        )
    if runs["runs_lost_while_executing"]:
        problems.append(
            f"{runs['runs_lost_while_executing']} runs marked 'worker lost' while their task executed"
            f" (/proc): {runs['runs_lost_while_executing_examples']}"
        )
    if runs["scheduled_runs_without_run"]:
        problems.append(f"{runs['scheduled_runs_without_run']} scheduled runs without a run")
    # Caps hold at every moment, Redis outage and restore included (docs/ARCHITECTURE.md, guarantee 5): no
    # window allowance.
    for source in ("sql", "proc"):
        for scope, cap in caps["caps"].items():
            seen = caps[source]["max_running"][scope]
            if seen > cap:
                fullest = caps[source]["over_cap_samples"].get(scope, {})
                problems.append(
                    f"{scope} cap {cap} exceeded ({source}): {seen} running at {fullest.get('at_s')}s,"
                    f" runs {[r['run'] for r in fullest.get('runs', [])]}"
                )
    if caps["sql"]["samples"] < 100:
        problems.append(f"only {caps['sql']['samples']} running-count samples (SQL)")
    if caps["proc"]["samples"] < 100:
        problems.append(f"only {caps['proc']['samples']} /proc samples")
    if not caps["proc"]["samples_with_runs"]:
        problems.append("/proc never showed a task process of this soak: the /proc checks checked nothing")
    if report["unexpected_exits"]:
        problems.append(f"processes died without being killed: {report['unexpected_exits']}")
    faults = report["faults"]
    for answers in ("run_now_status", "outage_status"):
        server_errors = {k: v for k, v in faults[answers].items() if k.startswith("5")}
        server_errors.pop("503", None)
        if server_errors:
            problems.append(f"the API answered with server errors ({answers}): {server_errors}")
    if (faults["postgres_restarts"] or faults["postgres_outages"]) and set(faults["outage_status"]) != {
        "503"
    }:
        problems.append(f"the API did not answer 503 while PostgreSQL was down: {faults['outage_status']}")
    if not faults["run_now_status"].get("202"):
        problems.append("no run-now was accepted")
    return problems


# --- main --------------------------------------------------------------------------------------------


def wait_until(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


UNFINISHED_SQL = """SELECT 1 FROM orchestrator_run WHERE status IN ('queued', 'running')
          UNION ALL SELECT 1 FROM schedules_scheduledrun
           WHERE status IN ('queued', 'throttled', 'running') LIMIT 1"""


def take_early_snapshot(system: System, procs: ProcSampler) -> tuple[list[str], set[int]]:
    """One run-now runs alone (so the semaphore keys exist), then Redis is saved while nothing runs.

    Restored later, this snapshot brings back an old semaphore epoch and no current lease: what a Redis
    restored from a backup, or a replica promoted late, looks like to the workers.
    """
    (sid,) = system.sql(
        "SELECT id FROM schedules_schedule WHERE custom_directive_text <> '75' ORDER BY id LIMIT 1"
    )[0]
    status, _ = system.api("POST", f"/api/schedules/{sid}/run-now")
    if status != 202:
        raise RuntimeError(f"the warm-up run-now answered HTTP {status}")
    wait_until(
        lambda: system.sql("SELECT 1 FROM orchestrator_run") and not system.sql(UNFINISHED_SQL),
        120,
        "the warm-up run to end",
    )
    time.sleep(0.3)  # one /proc sample after it
    return system.snapshot_redis(), procs.latest()


def soak(config: Config, log=print) -> dict:
    rng = random.Random(config.seed)
    workdir = Path(tempfile.mkdtemp(prefix="cb-soak-"))
    system = System(config, workdir)
    began = time.monotonic()
    try:
        system.start_servers()
        system.start_web_and_workers()
        wait_until(lambda: system.api("GET", "/api/health/")[0] == 200, 90, "the web to answer")
        for name in system.procs:
            if name.startswith("worker"):
                log_path = system.logs / f"{name}.log"
                wait_until(
                    lambda p=log_path: "ready" in p.read_text(errors="replace"), 90, f"{name} to be ready"
                )
        create_schedules(system, schedule_bodies(config.schedules, rng, config.job_cap), rng)
        initial = {
            sid: (ScheduleSpec(kind, minutes, cron or "", tz), first)
            for sid, kind, minutes, cron, tz, first in system.sql(
                """SELECT id, schedule_type, interval_minutes, cron_expr, timezone, next_run_at
                     FROM schedules_schedule"""
            )
        }
        procs = ProcSampler(system)
        procs.start()
        snapshot_keys, live_at_snapshot = take_early_snapshot(system, procs)
        log(f"[soak] Redis snapshot with {snapshot_keys}, {len(live_at_snapshot)} runs live")
        # The long schedules' runs start now, before the queue behind the global cap builds up, so that
        # they execute right through the long PostgreSQL outage.
        long_ids = sorted(initial)[:2]
        for sid in long_ids:
            system.api("POST", f"/api/schedules/{sid}/run-now")
        with contextlib.suppress(RuntimeError):
            wait_until(lambda: len(procs.latest()) >= len(long_ids), 30, "the long runs to start")
        system.start_schedulers()
        sampler = Sampler(system)
        sampler.start()
        log(f"[soak] {len(initial)} schedules; faults for {config.duration:.0f}s (seed {config.seed})")
        faults = fault_phase(system, sorted(initial), rng, procs, log)
        faults.snapshot_keys = snapshot_keys

        # Let the schedulers catch up on what came due during the last faults, then stop new slots.
        time.sleep(config.settle)
        (cutoff,) = system.sql(
            "WITH off AS (UPDATE schedules_schedule SET enabled = false RETURNING 1) SELECT now()"
        )[0]
        cutoff = cutoff - timedelta(seconds=config.settle)
        drain_started = time.monotonic()
        try:
            wait_until(
                lambda: not system.sql(UNFINISHED_SQL),
                config.drain,
                "every run to end",
                interval=1.0,
            )
        except RuntimeError as exc:
            log(f"[soak] {exc}")
        drained_in = time.monotonic() - drain_started
        for thread in (sampler, procs):
            thread.stop_event.set()
            thread.join(timeout=10)
        system.revive_dead()

        def at(t: float) -> float:
            return round(t - faults.started, 1)

        on_proc = proc_report(system, procs, config, at)
        slots = slot_report(system, initial, cutoff.astimezone(UTC))
        runs = run_report(system)
        for key in ("schedules_run_concurrently", "schedules_run_concurrently_examples"):
            slots[key] = on_proc.pop(key)
        for key in (
            "runs_executed_twice",
            "runs_executed_twice_examples",
            "runs_lost_while_executing",
            "runs_lost_while_executing_examples",
        ):
            runs[key] = on_proc.pop(key)
        report = {
            "config": config.__dict__,
            "slots": slots,
            "runs": runs,
            "caps": {
                "caps": caps_of(config),
                "sql": sql_cap_report(sampler, config, at),
                "proc": on_proc,
                "timeline": [f"{at(t)} {kind} {detail}".strip() for t, kind, detail in faults.events],
            },
            "faults": {k: v for k, v in faults.__dict__.items() if k not in {"events", "started"}},
            "unexpected_exits": {
                name: proc.unexpected_exits for name, proc in system.procs.items() if proc.unexpected_exits
            },
            # Not a failed check: run_worker restarting a Celery worker that stopped itself (kombu's
            # race on a Redis restart, worker/supervisor.py). Its runs end through the usual paths.
            "celery_restarts_by_supervisor": {
                path.stem: n
                for path in sorted(system.logs.glob("worker-*.log"))
                if (n := path.read_text(errors="replace").count("celery worker exited unexpectedly"))
            },
            "drained_in_s": round(drained_in, 1),
            "wall_s": round(time.monotonic() - began, 1),
        }
        report["problems"] = verdict(report)
        return report
    finally:
        system.destroy()
        if config.keep:
            log(f"[soak] logs kept in {system.logs}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Config()
    parser.add_argument("--duration", type=float, default=defaults.duration, help="fault phase (s)")
    parser.add_argument("--schedules", type=int, default=defaults.schedules)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--drain", type=float, default=defaults.drain, help="longest wait for runs to end")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args(argv)
    config = Config(
        duration=args.duration, schedules=args.schedules, seed=args.seed, drain=args.drain, keep=args.keep
    )
    report = soak(config)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    if report["problems"]:
        print("SOAK FAILED:\n- " + "\n- ".join(report["problems"]), file=sys.stderr)
        return 1
    print("SOAK OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
