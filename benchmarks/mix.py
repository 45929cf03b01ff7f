"""A realistic mix (issue 30): schedules of `sleep` jobs of 1 to 30 s, due over a window plus a burst, on
two workers of four processes each; ours against django-celery-beat + Celery + django-celery-results.

    .venv/bin/python -m benchmarks.mix                    # 500 over 5 min + a burst of 200 (long: see below)
    .venv/bin/python -m benchmarks.mix --schedules 40 --window 30 --burst 20 --max-sleep 5   # a smoke run

The plan is seeded (`--seed`): schedule i sleeps `uniform(min, max)` seconds (0.1 s steps) and is due at
T0 + `uniform(0, window)`; `--burst` more are all due at T0 + `--burst-at` (default the window's middle).
T0 is `--lead` seconds after the plan is written, by the database clock. Both sides get the same plan.

- ours: `run_scheduler` + `--workers` x `run_worker --jobs sleep --concurrency C`. Each schedule is an
  interval schedule (one slot in the run: a day apart) whose directive is its sleep, `overlap_policy =
  allow`, and `max_per_job = --per-job-cap` (default workers x C: every run takes and gives back the
  per-job cap without the cap reshaping the mix; a lower value makes runs wait for it).
- both: first `--warm` runs of 1 s (default 2 x processes), so that the figures are a running system's,
  not each pool process's first run (its first fork, its first database connection);
- theirs: django-celery-beat 2.9's DatabaseScheduler (`celery beat`, `--max-interval 1`) with one
  one-off `ClockedSchedule` PeriodicTask per schedule at the same offsets from its own T0, sending
  `bench.sleep(seconds, i)` (benchmarks/sleep_celery.py) to `--workers` x `celery worker -c C`; results
  stored by django-celery-results (`task_track_started`, so it stores the start too). Same Redis, same
  prefetch multiplier as ours.

Figures, per run, from the rows each side stores (database clock for ours; for theirs `date_started` is
the database's `now()` and `date_done` the pool process's clock, one host):

- overhead: ours `finished_at - started_at - sleep`; theirs `date_done - date_started - sleep`; p50, p99;
- due -> start lag: ours `started_at - scheduled_for`; theirs `date_started - due`; p50, p99. With the
  default sizes the mix needs about 3 times the 8 processes' capacity (700 runs x 15.5 s / 8 = 23 min of
  work due within 5 min), so most of the lag is waiting for a free process, on both sides;
- CPU per run: user + system seconds of the processes each side started (scheduler or beat, the workers
  and everything below them, reaped children included: task processes, pool processes), from psutil,
  between the plan being written and the last run finished, divided by runs. PostgreSQL and Redis are
  not counted (shared with other clients on this machine).

How long: each side takes at least max(window, total sleep / processes) plus its lag; the defaults take
about 25 minutes per side, 50 in all. Redis: a private `redis-server` by default (as benchmarks/e2e.py),
`--redis-url` for another. Databases: cb_bench_mix and cb_bench_mix_dcb, re-created.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis

from benchmarks.common import PYTHON, ROOT, bench_env, manage, percentile, recreate_database
from benchmarks.e2e import Pg, Procs, private_redis

DB = os.environ.get("BENCH_MIX_DB", "cb_bench_mix")
DCB_DB = os.environ.get("BENCH_MIX_DCB_DB", "cb_bench_mix_dcb")
SETTINGS = "benchmarks.bench_settings"
DCB_SETTINGS = "benchmarks.dcb_settings"
OURS_TERMINAL = ("succeeded", "failed", "skipped", "cancelled")
THEIRS_TERMINAL = ("SUCCESS", "FAILURE", "REVOKED")


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    index: int
    offset_s: float  # due at T0 + offset
    sleep_s: float


def make_plan(
    schedules: int, window: float, burst: int, burst_at: float, min_sleep: float, max_sleep: float, seed: int
) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(schedules + burst):
        offset = round(rng.uniform(0, window), 3) if i < schedules else burst_at
        items.append(Item(i, offset, round(rng.uniform(min_sleep, max_sleep), 1)))
    return items


# --- CPU of the processes a side started ------------------------------------------------------------


def tree_cpu(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each named root process and everything below it, the children they
    have reaped included (a live process is counted by itself, an ended one by the parent that reaped it)."""
    out = {}
    for name, pid in pids.items():
        total = 0.0
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            out[name] = 0.0
            continue
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        out[name] = total
    return out


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}


# --- helpers ------------------------------------------------------------------------------------------


def _wait_for(predicate, *, timeout: float, period: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(period)
    return True


def _ping(expected: int, timeout: float) -> bool:
    """Whether `expected` Celery workers answer a broadcast ping (any app: the pidbox is shared)."""
    from project.celery import app

    return _wait_for(
        lambda: len(app.control.ping(timeout=1.0) or []) >= expected, timeout=timeout, period=0.5
    )


def _figures(overheads: list[float], lags: list[float]) -> dict:
    def r(value, digits):
        return None if value is None else round(value, digits)

    return {
        "overhead_p50_ms": r(percentile(overheads, 50) * 1000 if overheads else None, 1),
        "overhead_p99_ms": r(percentile(overheads, 99) * 1000 if overheads else None, 1),
        "lag_p50_s": r(percentile(lags, 50), 3),
        "lag_p99_s": r(percentile(lags, 99), 3),
    }


class Mix:
    def __init__(self, plan: list[Item], args: argparse.Namespace, redis_url: str, work: Path) -> None:
        self.plan = plan
        self.args = args
        self.redis_url = redis_url
        self.work = work
        self.procs = Procs(work)
        self.client = redis.Redis.from_url(redis_url)
        self.env = bench_env(SETTINGS, redis_url, BENCH_DB=DB, BENCH_STATEMENTS_TALLY="")
        self.dcb_env = bench_env(DCB_SETTINGS, redis_url, BENCH_DCB_DB=DCB_DB, BENCH_STATEMENTS_TALLY="")
        work_s = sum(i.sleep_s for i in plan) / (args.workers * args.concurrency)
        # A lower bound of T0 -> last finished: the last due run's own end, or all the work on all processes.
        self.ideal_s = max(max(i.offset_s + i.sleep_s for i in plan), work_s)
        self.deadline = args.deadline or 2 * self.ideal_s + 300

    def prepare(self) -> None:
        recreate_database(DB)
        manage(self.env, "migrate", "--verbosity", "0")
        recreate_database(DCB_DB)
        manage(self.dcb_env, "migrate", "--verbosity", "0")
        for key in ("DJANGO_SETTINGS_MODULE", "REDIS_URL", "CELERY_BROKER_URL", "LOG_LEVEL"):
            os.environ[key] = self.env[key]
        os.environ.update({"BENCH_DB": DB, "BENCH_STATEMENTS_TALLY": ""})
        os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
        import django

        django.setup()
        from project.celery import app

        # The incumbent's workers get the prefetch multiplier ours runs with, whatever its default is.
        self.prefetch = int(app.conf.worker_prefetch_multiplier)
        self.dcb_env["WORKER_PREFETCH_MULTIPLIER"] = str(self.prefetch)

    def _t0(self, pg: Pg) -> dt.datetime:
        (now,) = pg.q("SELECT now()")[0]
        return now + dt.timedelta(seconds=self.args.lead)

    def _result(
        self, side: str, rows: list[tuple], cpu: dict[str, float], done: bool, t0, extra: dict
    ) -> dict:
        """rows: (index, due, started, finished, ok)."""
        by_index = {i.index: i for i in self.plan}
        overheads, lags = [], []
        ok = 0
        last = None
        for index, due, started, finished, succeeded in rows:
            ok += bool(succeeded)
            if started is None or finished is None or index not in by_index:
                continue
            overheads.append((finished - started).total_seconds() - by_index[index].sleep_s)
            lags.append((started - due).total_seconds())
            last = finished if last is None or finished > last else last
        runs = len(self.plan)
        cpu_total = sum(cpu.values())
        return {
            "side": side,
            "runs": runs,
            "finished": len(rows),
            "succeeded": ok,
            "done": done,
            "makespan_s": round((last - t0).total_seconds(), 1) if last is not None else None,
            **_figures(overheads, lags),
            "cpu_s": round(cpu_total, 2),
            "cpu_ms_per_run": round(1000 * cpu_total / runs, 1),
            "cpu_s_by_process": cpu,
            **extra,
        }

    # ours

    def ours(self) -> dict:
        from schedules.dispatch import run_now

        pg = Pg(DB)
        self.client.flushdb()
        try:
            from orchestrator.models import Job
            from schedules.models import Schedule

            warm = Schedule.objects.create(
                name="warm-mix", job=Job.objects.get(key="sleep"), schedule_type="interval",
                interval_minutes=1440, custom_directive_text="1", enabled=False, overlap_policy="allow",
            )  # fmt: skip
            roots = {
                "scheduler": self.procs.start(
                    "ours-scheduler",
                    [PYTHON, "manage.py", "run_scheduler", "--interval", "30", "--claimant", "mix-scheduler"],
                    self.env,
                ).pid
            }
            for w in range(self.args.workers):
                roots[f"worker {w + 1}"] = self.procs.start(
                    f"ours-worker-{w + 1}",
                    [PYTHON, "manage.py", "run_worker", "--jobs", "sleep", "--concurrency",
                     str(self.args.concurrency), "--loglevel", "WARNING", "--hostname", f"mix{w + 1}@%h"],
                    self.env,
                ).pid  # fmt: skip
            if not _ping(self.args.workers, timeout=300):
                raise RuntimeError(f"our workers did not answer a ping in 300 s (logs: {self.work})")
            # Warm-up: runs of 1 s, several per pool process, so that the figures are a running system's
            # and not the first run of each process (its first fork, its first connection).
            warm_ids = [run_now(warm).pk for _ in range(self.args.warm)]
            if not _wait_for(
                lambda: (
                    pg.q(
                        "SELECT count(*) FROM schedules_scheduledrun WHERE id = ANY(%s) AND status IN %s",
                        [warm_ids, OURS_TERMINAL],
                    )[0][0]
                    >= len(warm_ids)
                ),
                timeout=300,
                period=0.2,
            ):
                raise RuntimeError(f"our warm-up runs did not finish in 300 s (logs: {self.work})")
            listening = _wait_for(
                lambda: (
                    pg.q(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND query = 'LISTEN schedules_wake' AND state = 'idle'"
                    )[0][0]
                    >= 1
                ),
                timeout=120,
                period=0.2,
            )
            if not listening:
                raise RuntimeError(f"scheduler did not start (logs: {self.work})")

            cpu_before = tree_cpu(roots)
            t0 = self._t0(pg)
            pg.q(
                """INSERT INTO schedules_schedule (name, job_id, custom_directive_text, enabled,
                        schedule_type, interval_minutes, cron_expr, timezone, task3_scope, misfire_policy,
                        overlap_policy, max_per_job, next_run_at, claimed_by, created_at, updated_at)
                   SELECT 'mix-' || p.i, (SELECT id FROM orchestrator_job WHERE key = 'sleep'), p.sleep,
                          true, 'interval', 1440, '', 'UTC', 'allowlist', 'run_once', 'allow', %s, p.due, '',
                          now(), now()
                     FROM unnest(%s::int[], %s::text[], %s::timestamptz[]) AS p(i, sleep, due)""",
                [
                    self.args.per_job_cap,
                    [i.index for i in self.plan],
                    [f"{i.sleep_s:g}" for i in self.plan],
                    [t0 + dt.timedelta(seconds=i.offset_s) for i in self.plan],
                ],
            )
            (low, high) = pg.q("SELECT min(id), max(id) FROM schedules_schedule WHERE name LIKE 'mix-%'")[0]
            n = len(self.plan)
            print(
                f"ours: {n} schedules written, T0 {t0:%H:%M:%S}, deadline {self.deadline:.0f} s", flush=True
            )

            def finished() -> int:
                return pg.q(
                    "SELECT count(*) FROM schedules_scheduledrun WHERE schedule_id BETWEEN %s AND %s"
                    " AND status IN %s",
                    [low, high, OURS_TERMINAL],
                )[0][0]

            done = _wait_for(lambda: finished() >= n, timeout=self.deadline, period=2.0)
            cpu = _cpu_delta(cpu_before, tree_cpu(roots))
            rows = pg.q(
                """SELECT substr(s.name, 5)::int, sr.scheduled_for, sr.started_at, sr.finished_at,
                          sr.status = 'succeeded'
                     FROM schedules_scheduledrun sr JOIN schedules_schedule s ON s.id = sr.schedule_id
                    WHERE s.id BETWEEN %s AND %s AND sr.status IN %s""",
                [low, high, OURS_TERMINAL],
            )
        finally:
            self.procs.stop_all()
            pg.close()
        return self._result(
            "ours", rows, cpu, done, t0, {"per_job_cap": self.args.per_job_cap, "prefetch": self.prefetch}
        )

    # theirs

    def theirs(self) -> dict:
        pg = Pg(DCB_DB)
        self.client.flushdb()
        plan_file = self.work / "plan.json"
        plan_file.write_text(json.dumps([[i.index, i.offset_s, i.sleep_s] for i in self.plan]))
        seed = [PYTHON, "-m", "benchmarks.mix", "--seed-dcb", str(plan_file)]
        try:
            subprocess.run([*seed, "--t0", ""], env=self.dcb_env, cwd=ROOT, check=True)  # an empty table
            roots = {
                "beat": self.procs.start(
                    "theirs-beat",
                    [PYTHON, "-m", "celery", "-A", "project", "beat",
                     "-S", "django_celery_beat.schedulers:DatabaseScheduler",
                     "--max-interval", "1", "--pidfile=", "-l", "warning"],
                    self.dcb_env,
                ).pid
            }  # fmt: skip
            connected = _wait_for(
                lambda: pg.q("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                             " AND pid <> pg_backend_pid()")[0][0] >= 1,
                timeout=120, period=0.2,
            )  # fmt: skip
            if not connected:
                raise RuntimeError(f"celery beat did not connect (logs: {self.work})")
            for w in range(self.args.workers):
                roots[f"worker {w + 1}"] = self.procs.start(
                    f"theirs-worker-{w + 1}",
                    [PYTHON, "-m", "celery", "-A", "benchmarks.sleep_celery", "worker",
                     "-c", str(self.args.concurrency), "-P", "prefork", "-Q", "bench.mix",
                     "--loglevel", "WARNING", "-n", f"mixdcb{w + 1}@%h"],
                    self.dcb_env,
                ).pid  # fmt: skip
            if not _ping(self.args.workers, timeout=300):
                raise RuntimeError(f"Celery workers did not answer a ping in 300 s (logs: {self.work})")
            from project.celery import app

            for _ in range(self.args.warm):  # as for ours
                app.send_task("bench.sleep", args=[1, -1], queue="bench.mix")
            if not _wait_for(
                lambda: (
                    pg.q("SELECT count(*) FROM django_celery_results_taskresult WHERE status = 'SUCCESS'")[0][
                        0
                    ]
                    >= self.args.warm
                ),
                timeout=300,
                period=0.2,
            ):
                raise RuntimeError(f"the Celery warm-up tasks did not finish in 300 s (logs: {self.work})")
            pg.q("DELETE FROM django_celery_results_taskresult")
            time.sleep(2)  # beat has had a tick on the empty table

            cpu_before = tree_cpu(roots)
            t0 = self._t0(pg)
            subprocess.run([*seed, "--t0", t0.isoformat()], env=self.dcb_env, cwd=ROOT, check=True)
            n = len(self.plan)
            print(f"theirs: {n} periodic tasks written, T0 {t0:%H:%M:%S}", flush=True)
            done = _wait_for(
                lambda: (
                    pg.q(
                        "SELECT count(*) FROM django_celery_results_taskresult WHERE status IN %s",
                        [THEIRS_TERMINAL],
                    )[0][0]
                    >= n
                ),
                timeout=self.deadline,
                period=2.0,
            )
            cpu = _cpu_delta(cpu_before, tree_cpu(roots))
            results = pg.q(
                "SELECT result, date_started, date_done, status = 'SUCCESS'"
                " FROM django_celery_results_taskresult WHERE status IN %s",
                [THEIRS_TERMINAL],
            )
        finally:
            self.procs.stop_all()
            pg.close()
        offsets = {i.index: i.offset_s for i in self.plan}
        rows = []
        for result, started, finished, ok in results:
            try:
                index = int(json.loads(result))
            except (TypeError, ValueError):
                continue
            if index in offsets:
                rows.append((index, t0 + dt.timedelta(seconds=offsets[index]), started, finished, ok))
        return self._result("django-celery-beat + Celery + django-celery-results", rows, cpu, done, t0,
                            {"prefetch": self.prefetch})  # fmt: skip


def seed_dcb(plan_file: str, t0: str) -> None:
    """(In a child process, django-celery-beat's settings) one one-off clocked PeriodicTask per item, or
    none when t0 is empty."""
    import django

    django.setup()
    from django_celery_beat.models import ClockedSchedule, PeriodicTask, PeriodicTasks

    PeriodicTask.objects.filter(name__startswith="mix-").delete()
    ClockedSchedule.objects.all().delete()
    if t0:
        start = dt.datetime.fromisoformat(t0)
        items = json.loads(Path(plan_file).read_text())
        clocks = {}
        for _, offset, _ in items:
            if offset not in clocks:
                clocks[offset] = ClockedSchedule(clocked_time=start + dt.timedelta(seconds=offset))
        ClockedSchedule.objects.bulk_create(clocks.values())
        PeriodicTask.objects.bulk_create(
            [
                PeriodicTask(
                    name=f"mix-{index}",
                    task="bench.sleep",
                    clocked=clocks[offset],
                    one_off=True,
                    args=json.dumps([sleep, index]),
                    queue="bench.mix",
                    enabled=True,
                )
                for index, offset, sleep in items
            ],
            batch_size=2000,
        )
    PeriodicTasks.update_changed()


# --- report ---------------------------------------------------------------------------------------


def _n(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(theirs, ours) -> str:
    return "n/a" if not theirs or not ours else f"{theirs / ours:.2f}"


def report(results: dict) -> str:
    meta = results["meta"]
    ours, theirs = results.get("ours") or {}, results.get("theirs") or {}
    prefetch = ours.get("prefetch", theirs.get("prefetch"))
    lines = [
        f"### Realistic mix ({meta['date']}, commit {meta['commit']}, wall {meta['wall_s']:.0f} s)",
        "",
        f"{meta['schedules']} schedules due over {meta['window_s']:g} s + a burst of {meta['burst']} at "
        f"{meta['burst_at_s']:g} s; `sleep` of {meta['min_sleep_s']:g} to {meta['max_sleep_s']:g} s "
        f"(seed {meta['seed']}); {meta['workers']} workers x {meta['concurrency']} processes; ours with "
        f"`max_per_job = {meta['per_job_cap']}`; prefetch multiplier {prefetch}"
        " on both sides.",
        "",
        "| figure | ours | django-celery-beat + Celery + results | theirs / ours |",
        "|---|---|---|---|",
    ]
    rows = [
        ("runs finished (succeeded)", "finished", None),
        ("overhead per run p50 (ms)", "overhead_p50_ms", 1),
        ("overhead per run p99 (ms)", "overhead_p99_ms", 1),
        ("due -> start lag p50 (s)", "lag_p50_s", 3),
        ("due -> start lag p99 (s)", "lag_p99_s", 3),
        ("CPU per run (ms)", "cpu_ms_per_run", 1),
        ("T0 -> last finished (s)", "makespan_s", 1),
    ]
    for label, key, digits in rows:
        if digits is None:

            def cell(r: dict) -> str:
                if not r:
                    return "n/a"
                text = f"{r['finished']:,}/{r['runs']:,} ({r['succeeded']:,})"
                return text if r["done"] else text + f", not finished in {meta['deadline_s']:.0f} s"

            lines.append(f"| {label} | {cell(ours)} | {cell(theirs)} | |")
            continue
        lines.append(
            f"| {label} | {_n(ours.get(key), digits)} | {_n(theirs.get(key), digits)} | "
            f"{_ratio(theirs.get(key), ours.get(key))} |"
        )
    for side, r in (("ours", ours), ("theirs", theirs)):
        if r.get("cpu_s_by_process"):
            lines.append("")
            lines.append(
                f"CPU, {side} ({_n(r['cpu_s'], 2)} s): "
                + ", ".join(f"{k} {_n(v, 2)} s" for k, v in r["cpu_s_by_process"].items())
            )
    lines += ["", f"Ideal T0 -> last finished: {meta['ideal_s']:.0f} s (no overhead, no idle process)."]
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schedules", type=int, default=500, help="schedules spread over the window")
    parser.add_argument("--window", type=float, default=300.0, help="seconds over which they are due")
    parser.add_argument("--burst", type=int, default=200, help="schedules due at one instant")
    parser.add_argument("--burst-at", type=float, help="seconds after T0 (default: the window's middle)")
    parser.add_argument("--min-sleep", type=float, default=1.0)
    parser.add_argument("--max-sleep", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4, help="processes per worker")
    parser.add_argument("--per-job-cap", type=int, help="ours: max_per_job (default workers x concurrency)")
    parser.add_argument("--warm", type=int, help="warm-up runs of 1 s per side (default 2 x processes)")
    parser.add_argument("--lead", type=float, default=10.0, help="seconds from writing the plan to T0")
    parser.add_argument("--deadline", type=float, help="seconds per side (default 2 x ideal + 300)")
    parser.add_argument("--only", default="ours,theirs", help="ours, theirs or both")
    parser.add_argument("--redis-url", help="default: a private redis-server (database 13)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--seed-dcb", help=argparse.SUPPRESS)
    parser.add_argument("--t0", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seed_dcb:
        seed_dcb(args.seed_dcb, args.t0 or "")
        return
    if args.burst_at is None:
        args.burst_at = args.window / 2
    if args.warm is None:
        args.warm = 2 * args.workers * args.concurrency
    args.warm = max(1, args.warm)
    if args.per_job_cap is None:
        args.per_job_cap = args.workers * args.concurrency
    if not 0 < args.min_sleep <= args.max_sleep:
        parser.error("need 0 < --min-sleep <= --max-sleep")
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not only or only - {"ours", "theirs"}:
        parser.error("--only takes ours, theirs or both")

    plan = make_plan(
        args.schedules, args.window, args.burst, args.burst_at, args.min_sleep, args.max_sleep, args.seed
    )
    work = Path(tempfile.mkdtemp(prefix="cb-bench-mix-"))
    started = time.time()
    results: dict = {}
    with contextlib.ExitStack() as stack:
        redis_url = args.redis_url or stack.enter_context(private_redis(work))
        mix = Mix(plan, args, redis_url, work)
        stack.callback(mix.procs.stop_all)
        print(f"mix benchmark: databases {DB}, {DCB_DB}; Redis {redis_url}; logs {work}", flush=True)
        mix.prepare()
        if "ours" in only:
            results["ours"] = mix.ours()
            print(json.dumps(results["ours"]), flush=True)
        if "theirs" in only:
            results["theirs"] = mix.theirs()
            print(json.dumps(results["theirs"]), flush=True)
        mix.client.flushdb()
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "commit": _commit(),
        "wall_s": time.time() - started,
        "schedules": args.schedules,
        "window_s": args.window,
        "burst": args.burst,
        "burst_at_s": args.burst_at,
        "min_sleep_s": args.min_sleep,
        "max_sleep_s": args.max_sleep,
        "seed": args.seed,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "per_job_cap": args.per_job_cap,
        "ideal_s": mix.ideal_s,
        "deadline_s": mix.deadline,
    }
    if not args.no_report:
        print()
        print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
