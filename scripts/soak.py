#!/usr/bin/env python
"""Soak with faults (issue 8): the whole system under SIGKILLs, server restarts and run-now bursts.

    .venv/bin/python scripts/soak.py                 # the documented form: 10 minutes of faults
    .venv/bin/python scripts/soak.py --duration 100  # the CI form (tests/chaos/test_soak.py)

It starts its own PostgreSQL and Redis on free ports (so it may restart them; nothing shared is touched),
then the processes of `make run` against them: the web (gunicorn), 3 schedulers (`run_scheduler`) and
2 workers (`run_worker`). Flower is left out: it only observes. Through the REST API it creates 300
schedules of the `sleep` job: interval and cron, several timezones (half-hour and 45-minute offsets
among them), every overlap policy, a per-job cap on some, a global cap on all.

While the fault phase lasts, a seeded driver SIGKILLs a random scheduler about every 10 s and a random
worker (its whole process group) about every 30 s, restarting each at once; restarts PostgreSQL once
(a crash: `pg_ctl -m immediate`) and Redis once (its data lost); and fires bursts of `run-now`. A thread
samples the running runs every 100 ms. Then the schedules are disabled, the system drains, and the
report is read from SQL:

- slots expected (the slot sequence of each schedule, `schedules.timing`) vs dispatched, lost, unexpected;
- duplicate slots (must be 0); runs not terminal after the drain (must be 0); runs started twice (0);
- the highest sampled running count against each cap (global, per job, one-per-schedule for the
  non-`allow` overlap policies): never above it outside the Redis-restart window of docs/OPERATIONS.md,
  and at most twice the cap inside it;
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
        self.redis = PrivateRedis()
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
        with open(self.logs / f"{proc.name}.log", "ab") as log:
            proc.popen = subprocess.Popen(
                proc.argv,
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

    # the API

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list | None]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.web_port}{path}",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, None

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
            custom_directive_text="75",
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
    counting when their semaphore leases expire, as they stop holding a slot then (DESIGN 6.5).
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


@dataclass
class Faults:
    scheduler_kills: int = 0
    worker_kills: int = 0
    postgres_restarts: int = 0
    redis_restarts: int = 0
    run_now_sent: int = 0
    run_now_status: dict[str, int] = field(default_factory=dict)
    outage_status: dict[str, int] = field(default_factory=dict)  # API answers while PostgreSQL is down
    redis_window: tuple[float, float] | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (monotonic, kind, detail)
    started: float = 0.0
    postgres_down_seconds: float = 0.0
    redis_down_seconds: float = 0.0


def fault_phase(system: System, schedule_ids: list[int], rng: random.Random, log) -> Faults:
    config = system.config
    faults = Faults()
    start = faults.started = time.monotonic()
    end = start + config.duration
    due = {
        "scheduler": start + rng.uniform(0.5, 1.5) * config.scheduler_kill_every,
        "worker": start + rng.uniform(0.5, 1.5) * config.worker_kill_every,
        "burst": start + rng.uniform(0.5, 1.0) * config.burst_every,
        "postgres": start + 0.35 * config.duration,
        "redis": start + 0.65 * config.duration,
    }
    schedulers = [p for n, p in system.procs.items() if n.startswith("scheduler")]
    workers = [p for n, p in system.procs.items() if n.startswith("worker")]
    while True:
        kind = min(due, key=due.get)
        at = due[kind]
        if at >= end:
            break
        time.sleep(max(0.0, at - time.monotonic()))
        revived = system.revive_dead()
        if revived:
            faults.events.append((time.monotonic(), "revived", ",".join(revived)))
        detail = ""
        if kind == "scheduler":
            victim = rng.choice(schedulers)
            detail = victim.name
            system.kill(victim)
            faults.scheduler_kills += 1
            due[kind] = at + rng.uniform(0.7, 1.3) * config.scheduler_kill_every
        elif kind == "worker":
            victim = rng.choice(workers)
            detail = victim.name
            system.kill(victim)
            faults.worker_kills += 1
            due[kind] = at + rng.uniform(0.7, 1.3) * config.worker_kill_every
        elif kind == "burst":
            for sid in rng.sample(schedule_ids, k=rng.randint(5, 10)):
                status, _ = system.api("POST", f"/api/schedules/{sid}/run-now")
                faults.run_now_sent += 1
                faults.run_now_status[str(status)] = faults.run_now_status.get(str(status), 0) + 1
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
        elif kind == "redis":
            t0 = time.monotonic()
            system.redis.stop()
            time.sleep(rng.uniform(1.0, 3.0))
            system.redis.start()
            back = time.monotonic()
            faults.redis_down_seconds = back - t0
            # docs/OPERATIONS.md: runs admitted during the warm-up (half a lease) may exceed a cap, and
            # they run on after it: the window ends a lease and the longest short run (10 s) later.
            faults.redis_window = (t0, back + config.lease / 2 + config.lease + 10.0)
            faults.redis_restarts += 1
            del due[kind]
        faults.events.append((at, kind, detail))
        log(f"[soak] {time.monotonic() - start:6.1f}s {kind} {detail}")
    time.sleep(max(0.0, end - time.monotonic()))
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
    (duplicates,) = system.sql(
        """SELECT count(*) FROM (SELECT 1 FROM schedules_scheduledrun WHERE trigger = 'schedule'
                                  GROUP BY schedule_id, scheduled_for HAVING count(*) > 1) d"""
    )[0]
    return {
        "slots_expected": expected_total,
        "slots_dispatched": dispatched_total,
        "slots_lost": lost,
        "slots_unexpected": unexpected,
        "duplicate_slots": duplicates,
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
    (started_twice,) = system.sql("SELECT count(*) FROM orchestrator_run WHERE attempt > 1")[0]
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
        "runs_started_twice": started_twice,
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


def cap_report(sampler: Sampler, config: Config, faults: Faults) -> dict:
    window = faults.redis_window or (0.0, 0.0)
    outside = [s for s in sampler.samples if not window[0] <= s[0] <= window[1]]
    inside = [s for s in sampler.samples if window[0] <= s[0] <= window[1]]

    def maxima(samples: list) -> dict:
        return {
            "global": max((s[1] for s in samples), default=0),
            "per_job": max((s[2] for s in samples), default=0),
            "per_schedule": max((s[3] for s in samples), default=0),
        }

    def at(t: float) -> float:
        return round(t - faults.started, 1)

    fullest = {
        scope: {"running": count, "at_s": at(t), "runs": runs}
        for scope, (count, t, runs) in sampler.fullest.items()
        if count > caps_of(config)[scope]
    }
    return {
        "caps": caps_of(config),
        "over_cap_samples": fullest,
        "samples": len(sampler.samples),
        "samples_failed": sampler.failed_samples,
        "max_running": maxima(outside),
        "max_running_in_redis_window": maxima(inside),
        "redis_window_s": round(window[1] - window[0], 1),
        "redis_window_at_s": [at(window[0]), at(window[1])] if faults.redis_window else None,
        "timeline": [f"{at(t)} {kind} {detail}".strip() for t, kind, detail in faults.events],
    }


def verdict(report: dict) -> list[str]:
    problems = []
    slots, runs, caps = report["slots"], report["runs"], report["caps"]
    if slots["duplicate_slots"]:
        problems.append(f"{slots['duplicate_slots']} duplicate slots")
    if slots["slots_lost"]:
        problems.append(f"{slots['slots_lost']} lost slots: {slots['lost_examples']}")
    if slots["slots_unexpected"]:
        problems.append(f"{slots['slots_unexpected']} slots at times the schedule does not have")
    if runs["not_terminal"]:
        problems.append(f"{runs['not_terminal']} runs not terminal after the drain")
    if runs["runs_started_twice"]:
        problems.append(f"{runs['runs_started_twice']} runs started twice")
    if runs["scheduled_runs_without_run"]:
        problems.append(f"{runs['scheduled_runs_without_run']} scheduled runs without a run")
    for scope, cap in caps["caps"].items():
        if caps["max_running"][scope] > cap:
            problems.append(f"{scope} cap {cap} exceeded: {caps['max_running'][scope]} running")
        if caps["max_running_in_redis_window"][scope] > 2 * cap:
            problems.append(f"{scope} cap {cap} exceeded twice over in the Redis window")
    if caps["samples"] < 100:
        problems.append(f"only {caps['samples']} running-count samples")
    if report["unexpected_exits"]:
        problems.append(f"processes died without being killed: {report['unexpected_exits']}")
    for answers in ("run_now_status", "outage_status"):
        server_errors = {k: v for k, v in report["faults"][answers].items() if k.startswith("5")}
        server_errors.pop("503", None)
        if server_errors:
            problems.append(f"the API answered with server errors ({answers}): {server_errors}")
    if report["faults"]["postgres_restarts"] and set(report["faults"]["outage_status"]) != {"503"}:
        problems.append(
            f"the API did not answer 503 while PostgreSQL was down: {report['faults']['outage_status']}"
        )
    if not report["faults"]["run_now_status"].get("202"):
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
        system.start_schedulers()
        sampler = Sampler(system)
        sampler.start()
        log(f"[soak] {len(initial)} schedules; faults for {config.duration:.0f}s (seed {config.seed})")
        faults = fault_phase(system, sorted(initial), rng, log)

        # Let the schedulers catch up on what came due during the last faults, then stop new slots.
        time.sleep(config.settle)
        (cutoff,) = system.sql(
            "WITH off AS (UPDATE schedules_schedule SET enabled = false RETURNING 1) SELECT now()"
        )[0]
        cutoff = cutoff - timedelta(seconds=config.settle)
        drain_started = time.monotonic()
        try:
            wait_until(
                lambda: (
                    not system.sql(
                        """SELECT 1 FROM orchestrator_run WHERE status IN ('queued', 'running')
                       UNION ALL SELECT 1 FROM schedules_scheduledrun
                        WHERE status IN ('queued', 'throttled', 'running') LIMIT 1"""
                    )
                ),
                config.drain,
                "every run to end",
                interval=1.0,
            )
        except RuntimeError as exc:
            log(f"[soak] {exc}")
        drained_in = time.monotonic() - drain_started
        sampler.stop_event.set()
        sampler.join(timeout=10)
        system.revive_dead()

        report = {
            "config": config.__dict__,
            "slots": slot_report(system, initial, cutoff.astimezone(UTC)),
            "runs": run_report(system),
            "caps": cap_report(sampler, config, faults),
            "faults": {
                k: v for k, v in faults.__dict__.items() if k not in {"redis_window", "events", "started"}
            },
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
