"""Execution end to end (issue 14 items 3 and 4): runs that *finish*, and what each one costs.

    .venv/bin/python -m benchmarks.e2e --quick            # 200 no-op, 500 due, 200 throttled (minutes)
    .venv/bin/python -m benchmarks.e2e                    # 1,000 no-op, 10,000 due, 1,000 throttled
    .venv/bin/python -m benchmarks.e2e --only noop,latency --noop-runs 50 --json /tmp/e2e.json

Figures, each in one run so that only their ratios are read (the machine is shared):

- latency: run-now to task start (`ScheduledRun.started_at - created_at`), one at a time, idle worker;
- noop: N `sleep 0` runs launched with run-now at once, one worker (`run_worker --concurrency 2`), until
  every one has finished; against N bare Celery no-op tasks (benchmarks/bare_celery.py) on a worker of
  the same concurrency, same broker: runs/s, tasks/s and the ratio;
- due: N schedules due at one instant until every run has finished, `run_scheduler` + `run_worker
  --concurrency 2`; against django-celery-beat 2.9.0's beat (benchmarks/celery_beat_baseline.py's
  PeriodicTasks, pointed at the bare no-op task) + a bare Celery worker of the same concurrency;
- throttled: N runs of one schedule with `max_per_job = 2` (`sleep 0.2`, a worker of 4 processes, so
  that runs find the cap full and wait): database writes and Redis calls per run over the whole wait, and
  how long the last one finished after the ideal (N x mean run duration / cap).

For noop, due and throttled it prints the per-run cost of the whole path (dispatch, start gate,
semaphore, heartbeat, finish, mirror, result): SQL statements by process and by verb and table (every
process of the path appends a line per statement, see benchmarks/statement_counter.py), rows written per
table and commits (PostgreSQL's pg_stat_user_tables / pg_stat_database deltas for the bench database),
and Redis calls per command (INFO commandstats deltas; commands run inside Lua scripts count too). Each
window starts after an idle settle (PostgreSQL flushes a backend's stats at most every second, or after
10 s idle) whose Redis and statement rates are printed as the idle background; nothing is subtracted.

Redis: by default a private `redis-server` on a free port (database 13), so that INFO commandstats hold
only this benchmark's commands; `--redis-url` uses a given server instead (then other clients' commands
are counted too). Databases: cb_bench_e2e and cb_bench_e2e_dcb (<POSTGRES_DB>_e2e and <POSTGRES_DB>_e2e_dcb
when POSTGRES_DB is set), re-created. Every wait has a deadline (`--deadline`); a scenario that does not
finish reports "not finished in N s" with how many did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

from benchmarks import celery_beat_baseline as dcb
from benchmarks.common import PYTHON, ROOT, admin_dsn, bench_env, manage, percentile, recreate_database

# Named after POSTGRES_DB when it is set, so that benchmarks of several worktrees on one server do not
# drop each other's databases.
DB = f"{os.environ['POSTGRES_DB']}_e2e" if os.environ.get("POSTGRES_DB") else "cb_bench_e2e"
DCB_DB = f"{DB}_dcb"
SETTINGS = "benchmarks.bench_settings"
BARE_QUEUE = "bench.noop"
COUNTER = "bench:noop:done"
TERMINAL = ("succeeded", "failed", "skipped")
SETTLE_SECONDS = 11.0  # > PGSTAT_IDLE_INTERVAL (10 s): pending table stats of idle backends are flushed


# --- infrastructure -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def private_redis(work: Path):
    """A redis-server of our own, no persistence, on a free port; stopped (by its pid) on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: pass --redis-url")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work), "--loglevel", "warning"],
        stdout=open(work / "redis.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/13"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("private redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Procs:
    """Processes this benchmark started, each in its own session; stopped by process group id."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append(proc)
        return proc

    def stop_all(self, timeout: float = 60.0) -> None:
        for proc in self.running:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running.clear()


class Pg:
    """The harness's own connection to the bench database (raw psycopg2: not in the statement tally).
    It counts its queries, so that its transactions can be taken out of the commit count."""

    def __init__(self, dbname: str) -> None:
        self.conn = psycopg2.connect(**{**admin_dsn(), "dbname": dbname})
        self.conn.autocommit = True
        self.queries = 0

    def q(self, sql: str, params=None) -> list[tuple]:
        self.queries += 1
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.conn.close()


def _wait_for(predicate, *, timeout: float, period: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(period)
    return True


# --- the per-run cost window ----------------------------------------------------------------------


@dataclass
class Snapshot:
    tally_bytes: int
    redis_calls: dict[str, int]
    tables: dict[str, tuple[int, int, int]]
    commits: int
    harness_queries: int
    at: float


def _redis_calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): value["calls"]
        for name, value in stats.items()
        if name != "cmdstat_info"  # the harness's own INFO calls
    }


class RedisMonitor:
    """`--redis-monitor`: MONITOR on the bench Redis for a window, to split each command's calls into
    those a client sent (a round trip each, but for the commands kombu pipelines between MULTI and EXEC)
    and those a Lua script ran (no round trip). MONITOR slows Redis, so the timings of a monitored run
    are not the figures; the counts are."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.counts: Counter = Counter()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _read(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            while not self._stop.is_set():
                raw = monitor.connection.read_response()
                if self._stop.is_set() or not isinstance(raw, bytes | str):
                    continue
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                parts = line.split(" ", 4)
                if len(parts) < 4 or parts[0] == "OK":
                    continue
                source = "lua" if parts[2] == "lua]" else "client"
                command = parts[3].strip('"').lower()
                if command != "info":
                    self.counts[(source, command)] += 1

    def stop(self) -> Counter:
        self._stop.set()
        redis.Redis(connection_pool=self.client.connection_pool).ping()  # a line, so the reader wakes
        if self._thread is not None:
            self._thread.join(10)
        return self.counts


# --- CPU, from /proc ------------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
# Roles by what a process of the path is (its command line), most specific first.
_CPU_ROLES = (
    ("orchestrator.template", "task template + task processes"),
    ("ForkPoolWorker", "pool processes"),
    ("run_scheduler", "scheduler"),
    ("beat", "beat"),
    ("MainProcess", "worker parent"),
    ("run_worker", "worker parent"),
)


def _processes() -> dict[int, tuple[int, str, float, float]]:
    """pid -> (ppid, command line, own CPU seconds, CPU seconds of the children it reaped)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                stat = handle.read()
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        table[int(name)] = (int(fields[1]), cmdline, (utime + stime) / _TICKS, (cutime + cstime) / _TICKS)
    return table


def cpu_snapshot(roots: list[int], client: redis.Redis) -> Counter:
    """CPU seconds used so far, by role: the processes this benchmark started and everything below them
    (a task template counts the task processes it reaped), PostgreSQL (its live processes, and what the
    postmaster reaped: backends that ended), Redis (INFO cpu) and this harness. Others' processes
    (another agent's tests on a shared machine) are not counted, PostgreSQL's backends of other
    databases excepted."""
    table = _processes()
    cpu: Counter = Counter()
    root_set = set(roots)

    def under_root(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid in root_set:
                return True
            pid = table[pid][0] if pid in table else 0
            seen += 1
        return False

    for pid, (_ppid, cmdline, own, reaped) in table.items():
        if cmdline.startswith("postgres:"):
            cpu["postgres"] += own
        elif "postgres" in cmdline.split(" ", 1)[0] and " -D " in f" {cmdline} ":
            cpu["postgres"] += own + reaped  # the postmaster: ended backends are its reaped children
        elif under_root(pid):
            role = next((r for key, r in _CPU_ROLES if key in cmdline), "other processes started")
            if "bare_celery" in cmdline:
                role = f"bare Celery {role}"
            cpu[role] += own + (reaped if role == "task template + task processes" else 0)
    info = client.info("cpu")
    cpu["redis"] = float(info.get("used_cpu_sys", 0)) + float(info.get("used_cpu_user", 0))
    times = os.times()
    cpu["harness"] = times.user + times.system
    return cpu


def snapshot(pg: Pg, client: redis.Redis, tally: Path) -> Snapshot:
    pg.q("SELECT pg_stat_clear_snapshot()")
    tables = {
        name: (ins, upd, dele)
        for name, ins, upd, dele in pg.q(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables"
        )
    }
    (commits,) = pg.q("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0]
    return Snapshot(
        tally_bytes=tally.stat().st_size if tally.exists() else 0,
        redis_calls=_redis_calls(client),
        tables=tables,
        commits=commits,
        harness_queries=pg.queries,
        at=time.monotonic(),
    )


def _tally_lines(tally: Path, start: int, end: int) -> list[tuple[str, str]]:
    if not tally.exists():
        return []
    with open(tally, "rb") as handle:
        handle.seek(start)
        raw = handle.read(end - start).decode(errors="replace")
    rows = []
    for line in raw.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3:
            rows.append((parts[1], parts[2]))
    return rows


@dataclass
class Cost:
    """What a window cost in total: statements, rows written, commits, Redis calls."""

    seconds: float
    statements_by_role: Counter = field(default_factory=Counter)
    statements_by_kind: Counter = field(default_factory=Counter)
    statements_by_role_kind: Counter = field(default_factory=Counter)
    rows_by_table: dict[str, dict[str, int]] = field(default_factory=dict)
    commits: int = 0
    redis_by_command: Counter = field(default_factory=Counter)
    redis_monitored: Counter | None = None  # (client | lua, command) -> calls, with --redis-monitor
    cpu_by_role: Counter = field(default_factory=Counter)  # seconds, from /proc (cpu_snapshot)

    @property
    def statements(self) -> int:
        return sum(self.statements_by_role.values())

    @property
    def rows_written(self) -> int:
        return sum(sum(v.values()) for v in self.rows_by_table.values())

    @property
    def redis_calls(self) -> int:
        return sum(self.redis_by_command.values())

    def as_dict(self, runs: int) -> dict:
        per = max(runs, 1)

        def each(counter) -> dict:
            return {k: round(v / per, 2) for k, v in counter.most_common()}

        monitored = {}
        if self.redis_monitored is not None:
            client = Counter({c: v for (src, c), v in self.redis_monitored.items() if src == "client"})
            lua = Counter({c: v for (src, c), v in self.redis_monitored.items() if src == "lua"})
            monitored = {
                "redis_client_commands": round(sum(client.values()) / per, 2),
                "redis_lua_commands": round(sum(lua.values()) / per, 2),
                "redis_client_by_command": each(client),
                "redis_lua_by_command": each(lua),
            }
        return {
            "runs": runs,
            "window_s": round(self.seconds, 2),
            "monitored": monitored,
            "per_run": {
                "statements": round(self.statements / per, 2),
                "rows_written": round(self.rows_written / per, 2),
                "commits": round(self.commits / per, 2),
                "redis_calls": round(self.redis_calls / per, 2),
                "statements_by_role": each(self.statements_by_role),
                "statements_by_kind": each(self.statements_by_kind),
                "statements_by_role_kind": each(self.statements_by_role_kind),
                "rows_by_table": {
                    t: {k: round(v / per, 2) for k, v in c.items()}
                    for t, c in sorted(self.rows_by_table.items(), key=lambda x: -sum(x[1].values()))
                },
                "redis_by_command": each(self.redis_by_command),
                "cpu_ms": round(1000 * sum(self.cpu_by_role.values()) / per, 2),
                "cpu_ms_by_process": {
                    k: round(1000 * v / per, 2) for k, v in self.cpu_by_role.most_common() if v > 0
                },
            },
            "totals": {
                "statements": self.statements,
                "rows_written": self.rows_written,
                "commits": self.commits,
                "redis_calls": self.redis_calls,
            },
        }


def cost_between(a: Snapshot, b: Snapshot, tally: Path) -> Cost:
    cost = Cost(seconds=b.at - a.at)
    for role, kind in _tally_lines(tally, a.tally_bytes, b.tally_bytes):
        cost.statements_by_role[role] += 1
        cost.statements_by_kind[kind] += 1
        cost.statements_by_role_kind[f"{role}: {kind}"] += 1
    for name, (ins, upd, dele) in b.tables.items():
        i0, u0, d0 = a.tables.get(name, (0, 0, 0))
        delta = {"ins": ins - i0, "upd": upd - u0, "del": dele - d0}
        delta = {k: v for k, v in delta.items() if v}
        if delta:
            cost.rows_by_table[name] = delta
    # The harness's own autocommit queries (polls, these snapshots) are transactions too.
    cost.commits = (b.commits - a.commits) - (b.harness_queries - a.harness_queries)
    for command, calls in b.redis_calls.items():
        if calls - a.redis_calls.get(command, 0):
            cost.redis_by_command[command] = calls - a.redis_calls.get(command, 0)
    return cost


def idle_background(pg: Pg, client: redis.Redis, tally: Path) -> dict:
    """The settle before a window, measured: what the idle processes cost per second."""
    a = snapshot(pg, client, tally)
    time.sleep(SETTLE_SECONDS)
    b = snapshot(pg, client, tally)
    cost = cost_between(a, b, tally)
    return {
        "seconds": round(cost.seconds, 1),
        "redis_calls_per_s": round(cost.redis_calls / cost.seconds, 1),
        "statements_per_s": round(cost.statements / cost.seconds, 2),
        "redis_by_command_per_s": {
            k: round(v / cost.seconds, 2) for k, v in cost.redis_by_command.most_common()
        },
    }


def _p50_p99(prefix: str, values: list[float]) -> dict:
    return {
        f"{prefix}p50_ms": round(statistics.median(values) * 1000, 1) if values else None,
        f"{prefix}p99_ms": round(percentile(values, 99) * 1000, 1) if values else None,
    }


# --- the bench itself -----------------------------------------------------------------------------


class Bench:
    def __init__(self, redis_url: str, work: Path, deadline: float, *, monitor: bool = False) -> None:
        self._cpu_start: Counter = Counter()
        self.redis_url = redis_url
        self.monitor = RedisMonitor(redis_url) if monitor else None
        self.work = work
        self.deadline = deadline
        self.procs = Procs(work)
        self.tally = work / "statements.tally"
        self.client = redis.Redis.from_url(redis_url)
        self.env = bench_env(
            SETTINGS, redis_url, BENCH_DB=DB, BENCH_STATEMENTS_FILE="", BENCH_STATEMENTS_TALLY=str(self.tally)
        )
        self.bare_env = {**self.env, "BENCH_REDIS_URL": redis_url}
        self.pg: Pg | None = None

    # setup

    def prepare(self) -> None:
        recreate_database(DB)
        manage(self.env, "migrate", "--verbosity", "0")
        dcb.DB = DCB_DB
        dcb.prepare(self.redis_url)
        os.environ.update(
            {
                k: self.env[k]
                for k in ("DJANGO_SETTINGS_MODULE", "REDIS_URL", "CELERY_BROKER_URL", "LOG_LEVEL")
            }
        )
        os.environ.update(
            {
                "BENCH_DB": DB,
                "BENCH_ROLE": "bench",
                "BENCH_STATEMENTS_TALLY": str(self.tally),
                "BENCH_REDIS_URL": self.redis_url,
            }
        )
        os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
        import django

        django.setup()
        self.pg = Pg(DB)

    def reset(self) -> None:
        from django.db import connection

        self.pg.q(
            "TRUNCATE schedules_scheduledrun, orchestrator_run, schedules_schedule, "
            "django_celery_results_taskresult RESTART IDENTITY CASCADE"
        )
        connection.close()
        self.client.flushdb()

    def start_worker(self, concurrency: int, name: str) -> None:
        self.procs.start(
            name,
            [PYTHON, "manage.py", "run_worker", "--jobs", "sleep", "--concurrency", str(concurrency),
             "--loglevel", "WARNING", "--hostname", f"{name}@%h"],
            self.env,
        )  # fmt: skip

    def start_bare_worker(self, concurrency: int, queue: str, name: str) -> None:
        self.procs.start(
            name,
            [PYTHON, "-m", "celery", "-A", "benchmarks.bare_celery", "worker", "-c", str(concurrency),
             "-P", "prefork", "-Q", queue, "--loglevel", "WARNING", "-n", f"{name}@%h", "--without-mingle",
             "--without-gossip"],
            {**self.bare_env, "BENCH_STATEMENTS_TALLY": ""},
        )  # fmt: skip

    def schedule(self, name: str, *, directive: str, max_per_job: int | None = None):
        from orchestrator.models import Job
        from schedules.models import Schedule

        return Schedule.objects.create(
            name=name, job=Job.objects.get(key="sleep"), schedule_type="interval", interval_minutes=60,
            custom_directive_text=directive, enabled=False, overlap_policy="allow", max_per_job=max_per_job,
        )  # fmt: skip

    def finished(self, ids: list[int] | None = None) -> int:
        if ids is None:
            return self.pg.q("SELECT count(*) FROM schedules_scheduledrun WHERE status IN %s", [TERMINAL])[0][
                0
            ]
        return self.pg.q(
            "SELECT count(*) FROM schedules_scheduledrun WHERE status IN %s AND id = ANY(%s)", [TERMINAL, ids]
        )[0][0]

    def finished_between(self, ids: list[int]) -> int:
        """How many of `ids` have finished, for polling while they run: a primary-key range scan with two
        numbers for parameters. `finished(ids)` sends the whole list each time, which for 3,000 ids every
        50 ms took PostgreSQL about 5% of a core (and the harness its share) from the runs it waited for.
        Only the harness creates scheduled runs in a window, so the range holds these ids and no others
        (checked once at the end with `finished(ids)`)."""
        return self.pg.q(
            "SELECT count(*) FROM schedules_scheduledrun WHERE id BETWEEN %s AND %s AND status IN %s",
            [min(ids), max(ids), TERMINAL],
        )[0][0]

    def span(self, ids: list[int]) -> float:
        """Seconds from the first of `ids` created to the last finished, by the database clock: the
        figure does not depend on how often the harness looked."""
        (seconds,) = self.pg.q(
            "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(created_at)) FROM schedules_scheduledrun"
            " WHERE id = ANY(%s)",
            [ids],
        )[0]
        return float(seconds or 0.0)

    def warm_up(self, schedule) -> bool:
        """A first run through the fresh worker: it is up once that run has finished."""
        from schedules.dispatch import run_now

        first = run_now(schedule)
        return _wait_for(lambda: self.finished([first.pk]) == 1, timeout=300, period=0.1)

    def window_start(self) -> tuple[dict, Snapshot]:
        from django.db import connection

        connection.close()  # the harness's backend exits and flushes its table stats
        idle = idle_background(self.pg, self.client, self.tally)
        if self.monitor is not None:
            self.monitor.counts = Counter()
            self.monitor.start()
        self._cpu_start = cpu_snapshot([p.pid for p in self.procs.running], self.client)
        return idle, snapshot(self.pg, self.client, self.tally)

    def window_end(self, start: Snapshot) -> Cost:
        """Stop the processes (their backends exit and flush their stats), then read the deltas."""
        from django.db import connection

        # Redis is read before the stop, so that the workers' shutdown traffic stays out of it.
        monitored = self.monitor.stop() if self.monitor is not None else None
        redis_calls = _redis_calls(self.client)
        # CPU before the stop too: the processes of the path are alive (their counters readable).
        cpu_end = cpu_snapshot([p.pid for p in self.procs.running], self.client)
        connection.close()
        self.procs.stop_all()
        time.sleep(1.5)
        end = snapshot(self.pg, self.client, self.tally)
        end.redis_calls = redis_calls
        cost = cost_between(start, end, self.tally)
        cost.redis_monitored = monitored
        cost.cpu_by_role = Counter(
            {
                k: v - self._cpu_start.get(k, 0.0)
                for k, v in cpu_end.items()
                if v - self._cpu_start.get(k, 0.0) > 0
            }
        )
        return cost

    # figures

    def latency_and_noop(self, runs: int, samples: int, concurrency: int) -> dict:
        from schedules.dispatch import run_now
        from schedules.models import ScheduledRun

        self.reset()
        schedule = self.schedule("e2e-noop", directive="0")
        self.start_worker(concurrency, "e2e-noop")
        out: dict = {"concurrency": concurrency}
        try:
            if not self.warm_up(schedule):
                raise RuntimeError(f"worker did not finish a first run in 300 s (logs: {self.work})")
            latencies, published, received = [], [], []
            for _ in range(samples):
                scheduled = run_now(schedule)
                if not _wait_for(lambda s=scheduled: self.finished([s.pk]) == 1, timeout=120, period=0.02):
                    break
                row = ScheduledRun.objects.get(pk=scheduled.pk)
                if row.started_at is not None:
                    latencies.append((row.started_at - row.created_at).total_seconds())
                    if row.published_at is not None:
                        published.append((row.published_at - row.created_at).total_seconds())
                        received.append((row.started_at - row.published_at).total_seconds())
            out["latency"] = {"samples": len(latencies), **_p50_p99("", latencies)}
            # Where the time goes: created -> published (the launch transaction and the publish after
            # its commit) and published -> started (broker, worker, start gate).
            out["latency"].update(_p50_p99("created_to_published_", published))
            out["latency"].update(_p50_p99("published_to_started_", received))
            if runs:
                idle, start = self.window_start()
                ids = [run_now(schedule).pk for _ in range(runs)]
                done = _wait_for(
                    lambda: self.finished_between(ids) >= runs, timeout=self.deadline, period=0.25
                )
                count = self.finished(ids)
                seconds = self.span(ids)
                (failed,) = self.pg.q(
                    "SELECT count(*) FROM schedules_scheduledrun"
                    " WHERE status <> 'succeeded' AND id = ANY(%s)",
                    [ids],
                )[0]
                cost = self.window_end(start)
                out["noop"] = {
                    "runs": runs, "finished": count, "done": done, "seconds": round(seconds, 2),
                    "per_second": round(count / seconds, 2) if seconds else 0.0, "not_succeeded": failed,
                }  # fmt: skip
                out["noop_cost"] = {"idle": idle, **cost.as_dict(runs)}
        finally:
            self.procs.stop_all()
        return out

    def bare_noop(self, n: int, concurrency: int) -> dict:
        from benchmarks import bare_celery

        self.client.flushdb()
        self.start_bare_worker(concurrency, BARE_QUEUE, "e2e-bare")
        try:
            bare_celery.app.conf.broker_url = self.redis_url
            bare_celery.noop.apply_async(queue=BARE_QUEUE)
            if not _wait_for(lambda: int(self.client.get(COUNTER) or 0) >= 1, timeout=120):
                raise RuntimeError(f"bare Celery worker did not answer (logs: {self.work})")
            self.client.delete(COUNTER)
            before = _redis_calls(self.client)
            polls = 0

            def all_done() -> bool:
                nonlocal polls
                polls += 1
                return int(self.client.get(COUNTER) or 0) >= n

            began = time.perf_counter()
            with bare_celery.app.producer_or_acquire() as producer:
                for _ in range(n):
                    bare_celery.noop.apply_async(queue=BARE_QUEUE, producer=producer)
            done = _wait_for(all_done, timeout=self.deadline, period=0.005)
            seconds = time.perf_counter() - began
            count = int(self.client.get(COUNTER) or 0)
            after = _redis_calls(self.client)
        finally:
            self.procs.stop_all()
        calls = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
        calls["get"] = calls.get("get", 0) - polls - 1  # the harness's polls of the counter
        return {
            "tasks": n, "finished": count, "done": done, "seconds": round(seconds, 3),
            "per_second": round(count / seconds, 1),
            "redis_calls_per_task": round(sum(calls.values()) / n, 2),
            "redis_by_command_per_task": {
                k: round(v / n, 2) for k, v in sorted(calls.items(), key=lambda x: -x[1])
            },
        }  # fmt: skip

    def due_ours(self, n: int, concurrency: int) -> dict:
        self.reset()
        warm = self.schedule("e2e-warm", directive="0")
        self.procs.start(
            "e2e-scheduler",
            [PYTHON, "manage.py", "run_scheduler", "--interval", "30", "--claimant", "e2e-scheduler"],
            self.env,
        )
        self.start_worker(concurrency, "e2e-due")
        try:
            if not self.warm_up(warm):
                raise RuntimeError(f"worker did not finish a first run in 300 s (logs: {self.work})")
            listening = _wait_for(
                lambda: (
                    self.pg.q(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND query = 'LISTEN schedules_wake' AND state = 'idle'"
                    )[0][0]
                    >= 1
                ),
                timeout=120,
                period=0.1,
            )
            if not listening:
                raise RuntimeError(f"scheduler did not start (logs: {self.work})")
            idle, start = self.window_start()
            # Every schedule due at the same instant, 3 s ahead by the database clock (as in dispatch.py).
            (due_at,) = self.pg.q("SELECT date_trunc('second', now()) + interval '3 seconds'")[0]
            self.pg.q(
                """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled,
                        schedule_type, interval_minutes, cron_expr, timezone, task3_scope, misfire_policy,
                        overlap_policy, next_run_at, claimed_by, created_at, updated_at)
                    SELECT 'e2e-due-' || g, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), '0', true,
                           'interval', 60, '', 'UTC', 'allowlist', 'run_once', 'allow', %s, '', now(), now()
                      FROM generate_series(1, %s) g""",
                [due_at, n],
            )
            self.pg.q("ANALYZE schedules_schedule")
            wait_from = time.monotonic()
            (low, high) = self.pg.q(
                "SELECT min(id), max(id) FROM schedules_schedule WHERE name LIKE 'e2e-due-%%'"
            )[0]

            def count() -> int:
                # By the range of the N schedules' ids (one INSERT made them): no join, no LIKE.
                return self.pg.q(
                    "SELECT count(*) FROM schedules_scheduledrun WHERE schedule_id BETWEEN %s AND %s"
                    " AND status IN %s",
                    [low, high, TERMINAL],
                )[0][0]

            # The figure is the last finished_at, not when this poll saw it: a slow poll biases nothing,
            # and a count over N schedules every 0.1 s would take CPU from the runs it waits for.
            done = _wait_for(lambda: count() >= n, timeout=self.deadline + 3, period=1.0)
            waited = time.monotonic() - wait_from
            finished = count()
            (last_finished, succeeded) = self.pg.q(
                "SELECT max(sr.finished_at), count(*) FILTER (WHERE sr.status = 'succeeded')"
                " FROM schedules_scheduledrun sr JOIN schedules_schedule s ON s.id = sr.schedule_id"
                " WHERE s.name LIKE 'e2e-due-%%'"
            )[0]
            cost = self.window_end(start)
        finally:
            self.procs.stop_all()
        # The harness's own INSERT of the N schedules is setup, not the path.
        inserted = cost.rows_by_table.get("schedules_schedule", {})
        if inserted.get("ins"):
            inserted["ins"] -= n
            if not inserted["ins"]:
                del inserted["ins"]
        seconds = (last_finished - due_at).total_seconds() if done and last_finished else None
        return {
            "n": n, "finished": finished, "succeeded": succeeded, "done": done,
            "seconds": round(seconds, 2) if seconds is not None else None,
            "waited_s": round(waited, 1),
            "cost": {"idle": idle, **cost.as_dict(n)},
        }  # fmt: skip

    def due_theirs(self, n: int, concurrency: int) -> dict:
        """django-celery-beat's beat + a bare Celery worker executing the no-op task, same concurrency."""
        self.client.flushdb()
        env = bench_env(dcb.SETTINGS, self.redis_url, BENCH_DCB_DB=DCB_DB, BENCH_STATEMENTS_TALLY="")
        seed = [PYTHON, "-m", "benchmarks.celery_beat_baseline", "--seed"]
        subprocess.run([*seed, "0"], env=env, cwd=ROOT, check=True)
        self.start_bare_worker(concurrency, dcb.QUEUE, "e2e-dcb-worker")
        self.procs.start(
            "e2e-dcb-beat",
            [PYTHON, "-m", "celery", "-A", "project", "beat",
             "-S", "django_celery_beat.schedulers:DatabaseScheduler",
             "--max-interval", "1", "--pidfile=", "-l", "warning"],
            env,
        )  # fmt: skip
        from benchmarks import bare_celery

        try:
            bare_celery.app.conf.broker_url = self.redis_url
            bare_celery.noop.apply_async(queue=dcb.QUEUE)  # the worker is up once it has run one
            if not _wait_for(lambda: int(self.client.get(COUNTER) or 0) >= 1, timeout=120):
                raise RuntimeError(f"bare Celery worker did not answer (logs: {self.work})")
            if not _wait_for(lambda: dcb._connections(DCB_DB) >= 1, timeout=120, period=0.2):
                raise RuntimeError(f"celery beat did not connect (logs: {self.work})")
            time.sleep(3)  # let beat finish its first tick on the empty table (as celery_beat_baseline)
            self.client.delete(COUNTER)
            before = _redis_calls(self.client)
            subprocess.run([*seed, str(n), "--due"], env=env, cwd=ROOT, check=True)
            due_at = time.monotonic()
            polls = 0

            def all_done() -> bool:
                nonlocal polls
                polls += 1
                return int(self.client.get(COUNTER) or 0) >= n

            done = _wait_for(all_done, timeout=self.deadline, period=0.02)
            seconds = time.monotonic() - due_at
            count = int(self.client.get(COUNTER) or 0)
            after = _redis_calls(self.client)
        finally:
            self.procs.stop_all()
        calls = sum(v - before.get(k, 0) for k, v in after.items()) - polls - 1
        return {
            "n": n, "finished": count, "done": done,
            "seconds": round(seconds, 2) if done else None, "waited_s": round(seconds, 1),
            "redis_calls_per_task": round(calls / n, 2),
        }  # fmt: skip

    def throttled(self, runs: int, seconds: float, cap: int, concurrency: int) -> dict:
        from schedules.dispatch import run_now

        self.reset()
        schedule = self.schedule("e2e-throttled", directive=f"{seconds:g}", max_per_job=cap)
        self.start_worker(concurrency, "e2e-throttled")
        try:
            if not self.warm_up(schedule):
                raise RuntimeError(f"worker did not finish a first run in 300 s (logs: {self.work})")
            idle, start = self.window_start()
            ids = [run_now(schedule).pk for _ in range(runs)]
            done = _wait_for(lambda: self.finished_between(ids) >= runs, timeout=self.deadline, period=0.25)
            finished = self.finished(ids)
            (first_start, last_finish, mean, last_wait, mean_wait, succeeded) = self.pg.q(
                """SELECT min(started_at), max(finished_at),
                          avg(EXTRACT(EPOCH FROM finished_at - started_at)),
                          max(EXTRACT(EPOCH FROM started_at - created_at)),
                          avg(EXTRACT(EPOCH FROM started_at - created_at)),
                          count(*) FILTER (WHERE status = 'succeeded')
                     FROM schedules_scheduledrun WHERE id = ANY(%s)""",
                [ids],
            )[0]
            peak = self._peak_concurrency(ids)
            cost = self.window_end(start)
        finally:
            self.procs.stop_all()
        out = {
            "runs": runs, "finished": finished, "succeeded": succeeded, "done": done, "cap": cap,
            "worker_concurrency": concurrency, "sleep_s": seconds, "peak_running_by_rows": peak,
        }  # fmt: skip
        if done and mean is not None:
            makespan = (last_finish - first_start).total_seconds()
            ideal = runs * float(mean) / cap
            out.update(
                {
                    "mean_run_s": round(float(mean), 3),
                    "makespan_s": round(makespan, 2),
                    "ideal_s": round(ideal, 2),
                    "beyond_ideal_s": round(makespan - ideal, 2),
                    "last_start_wait_s": round(float(last_wait), 2),
                    "mean_start_wait_s": round(float(mean_wait), 2),
                }
            )
        out["cost"] = {"idle": idle, **cost.as_dict(runs)}
        return out

    def _peak_concurrency(self, ids: list[int]) -> int | None:
        """The most runs whose [started_at, finished_at) overlap, from the rows (a cross-check of the cap)."""
        rows = self.pg.q(
            """SELECT max(c) FROM (
                 SELECT sum(d) OVER (ORDER BY t, d) AS c FROM (
                   SELECT started_at AS t, 1 AS d FROM schedules_scheduledrun WHERE id = ANY(%s)
                                                                                AND started_at IS NOT NULL
                   UNION ALL
                   SELECT finished_at, -1 FROM schedules_scheduledrun WHERE id = ANY(%s)
                                                                      AND finished_at IS NOT NULL) e) x""",
            [ids, ids],
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None


# --- report ---------------------------------------------------------------------------------------


def _n(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def _unfinished(r: dict, deadline: float) -> str:
    return (
        f"not finished in {deadline:g} s ({r['finished']:,}/{r.get('n', r.get('runs', r.get('tasks')))} done)"
    )


ROLES = {
    "bench": "run-now (harness)",
    "worker/fork": "pool process",
    "worker": "worker parent",
    "task": "task child",
}


def _role_label(key: str) -> str:
    role, sep, rest = key.partition(": ")
    return ROLES.get(role, role) + sep + rest


def report(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"### Execution, end to end ({meta['date']}, commit {meta['commit']}, "
        f"{'--quick' if meta['quick'] else 'full'}, wall {meta['wall_s']:.0f} s)",
        "",
        "| figure | ours | yardstick | ratio |",
        "|---|---|---|---|",
    ]
    deadline = meta["deadline_s"]
    noop, bare = results.get("noop"), results.get("bare")
    if noop and bare:
        ours = (
            f"{_n(noop['per_second'])} runs/s ({noop['runs']:,} in {_n(noop['seconds'], 1)} s)"
            if noop["done"]
            else _unfinished(noop, deadline) + f", {_n(noop['per_second'])} runs/s"
        )
        theirs = (
            f"bare Celery: {_n(bare['per_second'], 1)} tasks/s "
            f"({bare['tasks']:,} in {_n(bare['seconds'], 2)} s)"
        )
        ratio = (
            f"ours / bare = **{noop['per_second'] / bare['per_second']:.4f}**"
            if bare["per_second"]
            else "n/a"
        )
        lines.append(
            f"| no-op runs end to end (`sleep 0`), 1 worker x {meta['concurrency']} processes | {ours} "
            f"| {theirs} | {ratio} |"
        )
    due, dcb_due = results.get("due"), results.get("due_theirs")
    if due and dcb_due:
        ours = f"{_n(due['seconds'])} s" if due["done"] else _unfinished(due, deadline)
        theirs = (
            f"django-celery-beat + Celery: {_n(dcb_due['seconds'])} s"
            if dcb_due["done"]
            else "django-celery-beat + Celery: " + _unfinished(dcb_due, deadline)
        )
        ratio = (
            f"theirs / ours = **{dcb_due['seconds'] / due['seconds']:.2f}**"
            if due["done"] and dcb_due["done"]
            else "n/a"
        )
        lines.append(f"| {due['n']:,} due at one instant, until all finished | {ours} | {theirs} | {ratio} |")
    thr = results.get("throttled")
    if thr:
        per = thr["cost"]["per_run"]
        if thr["done"]:
            ours = (
                f"{_n(per['rows_written'], 1)} rows written, {_n(per['statements'], 1)} statements, "
                f"{_n(per['redis_calls'], 1)} Redis calls per run; last finished "
                f"{_n(thr['beyond_ideal_s'], 1)} s beyond the ideal ({_n(thr['makespan_s'], 1)} s vs "
                f"{thr['runs']:,} x {_n(thr['mean_run_s'], 3)} s / {thr['cap']} = "
                f"{_n(thr['ideal_s'], 1)} s); "
                f"mean wait before start {_n(thr['mean_start_wait_s'], 1)} s"
            )
        else:
            ours = _unfinished(thr, deadline)
        base = results.get("noop_cost", {}).get("per_run")
        yard = (
            f"unthrottled run: {_n(base['rows_written'], 1)} rows, {_n(base['redis_calls'], 1)} Redis calls"
            if base
            else "n/a"
        )
        ratio = "n/a"
        if base and base["rows_written"]:
            ratio = f"rows throttled / unthrottled = **{per['rows_written'] / base['rows_written']:.2f}**"
            if thr["done"] and thr.get("mean_start_wait_s"):
                # O(1) or O(wait): what waiting added, per run and per second waited.
                extra = per["rows_written"] - base["rows_written"]
                ratio += (
                    f"; waiting added {extra:.2f} rows per run, "
                    f"{extra / thr['mean_start_wait_s']:.3f} per second waited"
                )
        lines.append(
            f"| {thr['runs']:,} runs of one job, `max_per_job = {thr['cap']}`, `sleep {thr['sleep_s']:g}`, "
            f"worker of {thr['worker_concurrency']} | {ours} | {yard} | {ratio} |"
        )
    lat = results.get("latency")
    if lat:
        lines.append(
            f"| run-now to task start, idle worker ({lat['samples']} samples) "
            f"| p50 {_n(lat['p50_ms'], 1)} ms, "
            f"p99 {_n(lat['p99_ms'], 1)} ms (created to published p50 "
            f"{_n(lat.get('created_to_published_p50_ms'), 1)} ms, published to started p50 "
            f"{_n(lat.get('published_to_started_p50_ms'), 1)} ms) | target p50 < 50 ms | "
            f"{'met' if lat['p50_ms'] is not None and lat['p50_ms'] < 50 else 'not met'} |"
        )

    paths = [
        ("run-now no-op", results.get("noop_cost")),
        ("scheduled no-op (due burst)", (results.get("due") or {}).get("cost")),
        ("throttled", (results.get("throttled") or {}).get("cost")),
    ]
    paths = [(name, c) for name, c in paths if c]
    if paths:
        lines += [
            "",
            "#### Per-run cost of the whole path",
            "",
            "Window totals / runs; the idle background is included, not subtracted.",
            "",
            "| path | runs | SQL statements | commits | rows written | Redis calls | idle background |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in paths:
            p = c["per_run"]
            idle = c["idle"]
            lines.append(
                f"| {name} | {c['runs']:,} | {_n(p['statements'], 1)} | {_n(p['commits'], 1)} | "
                f"{_n(p['rows_written'], 1)} | {_n(p['redis_calls'], 1)} | "
                f"{_n(idle['redis_calls_per_s'], 1)} Redis calls/s, "
                f"{_n(idle['statements_per_s'], 2)} statements/s |"
            )
        for name, c in paths:
            p = c["per_run"]
            lines += ["", f"**{name}**, per run:", ""]
            lines.append(
                "- statements by process: "
                + ", ".join(f"{_role_label(k)} {_n(v, 2)}" for k, v in p["statements_by_role"].items())
            )
            lines.append(
                "- rows written by table: "
                + ", ".join(
                    f"{t} " + "/".join(f"{k} {_n(v, 2)}" for k, v in d.items())
                    for t, d in p["rows_by_table"].items()
                )
            )
            lines.append(
                "- Redis calls by command: "
                + ", ".join(f"{k} {_n(v, 2)}" for k, v in p["redis_by_command"].items())
            )
            mon = c.get("monitored")
            if mon:
                lines.append(
                    f"- Redis, sent by clients ({_n(mon['redis_client_commands'], 1)}): "
                    + ", ".join(f"{k} {_n(v, 2)}" for k, v in mon["redis_client_by_command"].items())
                )
                lines.append(
                    f"- Redis, run inside Lua ({_n(mon['redis_lua_commands'], 1)}): "
                    + ", ".join(f"{k} {_n(v, 2)}" for k, v in mon["redis_lua_by_command"].items())
                )
            if p.get("cpu_ms_by_process"):
                lines.append(
                    f"- CPU by process, from /proc ({_n(p['cpu_ms'], 1)} ms in all): "
                    + ", ".join(f"{k} {_n(v, 2)} ms" for k, v in p["cpu_ms_by_process"].items())
                )
            lines.append(
                "- statements by process and kind: "
                + ", ".join(
                    f"{_role_label(k)} {_n(v, 2)}"
                    for k, v in p["statements_by_role_kind"].items()
                    if v >= 0.05
                )
            )
    if bare:
        lines += [
            "",
            f"Bare Celery, per task: {_n(bare['redis_calls_per_task'], 2)} Redis calls ("
            + ", ".join(f"{k} {_n(v, 2)}" for k, v in bare["redis_by_command_per_task"].items())
            + ").",
        ]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------------


def _commit() -> str:
    """HEAD's short hash, `+dirty` when the code under test differs from it (others' work in progress)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "orchestrator", "schedules", "project"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes: 200 no-op, 500 due, 200 throttled"
    )
    parser.add_argument(
        "--only", default="latency,noop,due,throttled", help="comma-separated figures to take"
    )
    parser.add_argument("--noop-runs", type=int)
    parser.add_argument("--due", type=int, help="schedules due at one instant")
    parser.add_argument("--throttled-runs", type=int)
    parser.add_argument("--throttle-seconds", type=float, default=0.2, help="each throttled run's sleep")
    parser.add_argument("--throttle-cap", type=int, default=2, help="max_per_job of the throttled schedule")
    parser.add_argument(
        "--throttle-concurrency", type=int, default=4, help="pool processes (> cap, so runs wait)"
    )
    parser.add_argument("--latency-samples", type=int)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes of the worker under test")
    parser.add_argument("--deadline", type=float, help="seconds each scenario may take before it is reported")
    parser.add_argument("--redis-url", help="use this Redis (default: a private redis-server, database 13)")
    parser.add_argument(
        "--redis-monitor",
        action="store_true",
        help="split Redis calls into client round trips and Lua-internal commands (MONITOR; slows timings)",
    )
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--no-report", action="store_true", help="no Markdown at the end (benchmarks.compare)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    noop_runs = args.noop_runs if args.noop_runs is not None else (200 if quick else 1000)
    due = args.due if args.due is not None else (500 if quick else 10000)
    throttled_runs = args.throttled_runs if args.throttled_runs is not None else (200 if quick else 1000)
    samples = args.latency_samples if args.latency_samples is not None else (20 if quick else 50)
    deadline = args.deadline if args.deadline is not None else (900.0 if quick else 3600.0)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    unknown = only - {"latency", "noop", "due", "throttled"}
    if unknown:
        parser.error(f"unknown figures: {', '.join(sorted(unknown))}")

    work = Path(tempfile.mkdtemp(prefix="cb-bench-e2e-"))
    started = time.time()
    results: dict = {}
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(private_redis(work))
        bench = Bench(redis_url, work, deadline, monitor=args.redis_monitor)
        stack.callback(bench.procs.stop_all)
        print(f"e2e benchmark: databases {DB}, {DCB_DB}; Redis {redis_url}; logs {work}", flush=True)
        bench.prepare()
        if only & {"latency", "noop"}:
            out = bench.latency_and_noop(
                noop_runs if "noop" in only else 0, samples if "latency" in only else 0, args.concurrency
            )
            if "latency" in only:
                results["latency"] = out["latency"]
            if "noop" in only:
                results["noop"], results["noop_cost"] = out["noop"], out["noop_cost"]
                results["bare"] = bench.bare_noop(noop_runs, args.concurrency)
            print(
                json.dumps({k: results[k] for k in ("latency", "noop", "bare") if k in results}), flush=True
            )
        if "due" in only:
            results["due"] = bench.due_ours(due, args.concurrency)
            results["due_theirs"] = bench.due_theirs(due, args.concurrency)
            print(json.dumps({"due": {k: v for k, v in results["due"].items() if k != "cost"},
                              "due_theirs": results["due_theirs"]}), flush=True)  # fmt: skip
        if "throttled" in only:
            results["throttled"] = bench.throttled(
                throttled_runs, args.throttle_seconds, args.throttle_cap, args.throttle_concurrency
            )
            print(json.dumps({k: v for k, v in results["throttled"].items() if k != "cost"}), flush=True)
        bench.reset()
        bench.pg.close()
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "commit": _commit(),
        "quick": quick,
        "wall_s": time.time() - started,
        "deadline_s": deadline,
        "concurrency": args.concurrency,
        "redis": "given: " + args.redis_url if args.redis_url else "private redis-server",
    }
    if not args.no_report:
        print()
        print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
