"""Runs executing through a PostgreSQL outage and a Redis rolled back to an old snapshot
(docs/ARCHITECTURE.md, guarantees 5 and 7).

What executes is read from the operating system (orchestrator/taskprocs.py), never from the rows the code
under test writes: a sampler thread lists the task process groups every 50 ms. The machine is shared, so
only groups started by this test's workers count: they carry a tag in their environment (tests/workerproc.py).

- PostgreSQL unreachable for 2.5 lease TTLs (through tests/tcpproxy.py; the test's own connection goes
  straight to the server): the runs executing meanwhile keep their slots, are never "worker lost", and
  end `succeeded` once the database is back; the cap holds throughout.
- Redis restored from a snapshot taken while nothing ran: the leases in it are empty while two capped runs
  execute; no third run may start until one of the two ends.
"""

from __future__ import annotations

import shutil
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from orchestrator.models import RUN_TERMINAL, Run
from orchestrator.services import OrchestratorService
from schedules.dispatch import run_now
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import sleep_job
from tests.support import wait_for
from tests.tcpproxy import TcpProxy
from tests.workerproc import (
    FAST,
    TAG_ENV,
    PrivateRedis,
    ProcSampler,
    WorkerProcess,
    _spawn_ready,
    publish_runs,
    running_worker,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CAP = 2
LEASE = float(FAST["WORKER_LEASE_SECONDS"])


def _capped_schedule(name: str) -> Schedule:
    return Schedule.objects.create(
        name=name,
        job=sleep_job(),
        enabled=False,  # launched by hand only
        schedule_type="interval",
        interval_minutes=60,
        custom_directive_text="0.1",
        overlap_policy="allow",
        max_per_job=CAP,
    )


def _run_now(schedule: Schedule, seconds: str) -> ScheduledRun:
    schedule.custom_directive_text = seconds
    schedule.save(update_fields=["custom_directive_text"])
    return run_now(schedule)  # publishes on commit, to the test Redis the worker consumes


def _statuses(items: list[ScheduledRun]) -> dict[int, str]:
    return dict(Run.objects.filter(pk__in=[i.run_id for i in items]).values_list("pk", "status"))


def _all_ended(items: list[ScheduledRun]) -> bool:
    return all(status in RUN_TERMINAL for status in _statuses(items).values())


def _report(items: list[ScheduledRun]) -> dict[int, tuple]:
    runs = {r.pk: r for r in Run.objects.filter(pk__in=[i.run_id for i in items])}
    mirrors = dict(ScheduledRun.objects.filter(pk__in=[i.pk for i in items]).values_list("run_id", "status"))
    return {
        run_id: (run.status, mirrors.get(run_id), run.attempt, run.error_summary[:80])
        for run_id, run in sorted(runs.items())
    }


def test_postgres_unreachable_for_2_5_leases__live_runs_keep_their_slots_and_succeed(redis_client, tmp_path):
    schedule = _capped_schedule("pg-outage")
    db = connection.settings_dict
    tag = uuid.uuid4().hex
    outage = 2.5 * LEASE
    with TcpProxy((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432))) as proxy:
        env = {"POSTGRES_PORT": str(proxy.port), TAG_ENV: tag}
        # Four pool processes for a cap of two: only the semaphore keeps the other two from executing.
        with (
            running_worker(["jobs.sleep"], tmp_path=tmp_path, name="pgcut", concurrency=4, env=env) as worker,
            ProcSampler(tag) as procs,
        ):
            # The first finishes its tasks during the outage (its outcome must wait for the database);
            # the second executes across the whole outage and past it.
            first = [_run_now(schedule, "4"), _run_now(schedule, "12")]
            first_ids = {item.run_id for item in first}
            wait_for(
                lambda: set(_statuses(first).values()) == {"running"} and first_ids <= procs.now(),
                timeout=90,
                what="the first two runs executing",
            )
            proxy.cut()
            cut_at = time.monotonic()
            while time.monotonic() < cut_at + outage:  # the outage itself: its length is the fault
                assert worker.proc.poll() is None, "worker died during the outage"
                time.sleep(0.05)
            proxy.restore()
            restored_at = time.monotonic()
            # Runs coming due as the database returns: they would find the slots of the first two free
            # at once if anything took the outage for the loss of their worker. (Runs launched before the
            # cut would not do: their retries fail on the database during the outage, and their places
            # in the semaphore's line keep newer runs out until they come back as stalled, leases later.)
            arrivals = [_run_now(schedule, "4") for _ in range(2)]

            items = first + arrivals
            wait_for(lambda: _all_ended(items), timeout=180, interval=0.5, what="every run ended")
            alive = worker.proc.poll() is None
            ended_at = time.monotonic()

    assert procs.error is None, procs.error
    during = procs.seen_between(cut_at, restored_at)
    report = _report(items)
    print(
        f"pg outage {outage:g}s: samples={len(procs.samples)} max_live={procs.max_live} "
        f"over_cap(s after restore)={procs.over_cap(CAP, restored_at)[:5]} "
        f"executing_during_outage={sorted(during)} "
        f"last_seen_after_cut={ {i: round((procs.last_seen(i) or 0) - cut_at, 1) for i in first_ids} } "
        f"proxy={proxy.connections} forwarded, {proxy.refused} refused; "
        f"runs ended {ended_at - restored_at:.1f}s after the restore; runs={report}"
    )
    log = worker.log()
    assert alive, log[-4000:]
    assert len(procs.samples) > 100
    # The sampler saw the cap reached, so it could have seen it exceeded.
    assert procs.max_live >= CAP
    assert procs.max_live <= CAP, (
        f"over the cap (s after the restore): {procs.over_cap(CAP, restored_at)[:10]}"
    )
    assert during, "no run was executing during the outage"
    lost = {run_id: row for run_id, row in report.items() if row[3].startswith("worker lost")}
    assert not lost, f"runs whose worker stayed alive were marked lost: {lost}"
    assert {run_id: report[run_id][0] for run_id in during} == dict.fromkeys(during, "succeeded")
    assert [row[0] for row in report.values()] == ["succeeded"] * len(items), report
    assert all(row[0] == row[1] for row in report.values()), f"ScheduledRun does not mirror Run: {report}"


# --- Redis restored from an old snapshot ------------------------------------------------------------------


def _launch_waiting(schedule: Schedule, seconds: str) -> ScheduledRun:
    """A run and its ScheduledRun, as run_now makes them, without publishing (the broker is private)."""
    with transaction.atomic():
        run = OrchestratorService.launch(
            job=schedule.job, custom_directive_text=seconds, task3_scope="allowlist"
        )
        return ScheduledRun.objects.create(
            schedule=schedule, run=run, trigger="manual", scheduled_for=timezone.now(), task_id=run.task_id
        )


def _supervised_worker(tmp_path: Path, name: str, env: dict[str, str], concurrency: int) -> WorkerProcess:
    """`manage.py run_worker`, as operators start it: its supervisor starts Celery again after kombu's
    "Unrecoverable error" on a Redis that goes away mid-acknowledgement (worker/supervisor.py), which a
    stop and start of Redis with runs executing provokes."""
    cmd = [sys.executable, "manage.py", "run_worker", "--jobs", "sleep"]
    cmd += ["--concurrency", str(concurrency), "--hostname", f"{name}@%h"]
    return _spawn_ready(cmd, tmp_path / f"run_worker-{name}.log", name, {**FAST, **env})


def _times(run_id: int) -> tuple[datetime | None, datetime | None]:
    return Run.objects.values_list("started_at", "finished_at").get(pk=run_id)


def test_redis_restored_from_idle_snapshot__no_third_run_starts_until_one_of_two_ends(redis_client, tmp_path):
    """The semaphores' Redis goes back to an old snapshot (a restore, a failover to a replica that missed
    writes): its grant counter and keys are there, the pair's leases are not. The broker is another Redis
    and stays up, so the third run keeps asking for a slot right through the restore, as it would in
    production; the old warm-up keyed on a missing epoch key only and let it in."""
    server = PrivateRedis(data_dir=tmp_path / "redis")
    server.start()
    dump = tmp_path / "redis" / "dump.rdb"  # where SAVE writes and a start reads
    snapshot = tmp_path / "idle.rdb"
    schedule = _capped_schedule("redis-snapshot")
    tag = uuid.uuid4().hex
    broker = settings.CELERY_BROKER_URL  # the test Redis, emptied by the redis_client fixture
    # A longer lease: the old gap (until the pair's next heartbeat re-asserts its leases) is wide enough
    # for the third run's retries, which come every few tenths of a second, to fall into it.
    env = {"REDIS_URL": server.url, "CELERY_BROKER_URL": broker, "WORKER_LEASE_SECONDS": "8", TAG_ENV: tag}
    worker = None
    try:
        # Three pool processes: the third run is delivered and would execute if the caps let it.
        worker = _supervised_worker(tmp_path, "snap", env, concurrency=3)
        with ProcSampler(tag) as procs:
            # One short capped run, so the semaphore's keys exist, then a snapshot with nothing running.
            warm = _launch_waiting(schedule, "0.1")
            publish_runs(broker, [warm])
            wait_for(lambda: _statuses([warm]) == {warm.run_id: "succeeded"}, timeout=60, what="warm-up run")
            wait_for(lambda: not procs.now(), timeout=10, what="nothing executing")
            assert not Run.objects.filter(status="running").exists()
            keys = sorted(k.decode() for k in server.client().keys("cb:*"))
            server.client().save()
            shutil.copy(dump, snapshot)

            # The pair first, executing well past the restore; then the third, which only has to wait
            # behind them: once let in it runs 1 s, so the test does not wait out another 12 s for it.
            pair_items = [_launch_waiting(schedule, "12") for _ in range(CAP)]
            publish_runs(broker, pair_items)
            wait_for(lambda: set(_statuses(pair_items).values()) == {"running"}, timeout=90, what="the pair")
            items = [*pair_items, _launch_waiting(schedule, "1")]
            publish_runs(broker, items[-1:])
            ids = {item.run_id for item in items}

            def two_running() -> set[int] | None:
                running = {k for k, v in _statuses(items).items() if v == "running"}
                waiting = ScheduledRun.objects.filter(pk__in=[i.pk for i in items], status="throttled")
                ok = len(running) == CAP and running <= procs.now() and waiting.count() == len(items) - CAP
                return running if ok else None

            pair = wait_for(two_running, timeout=90, what="two runs executing, the third throttled")
            (third,) = ids - pair

            # Back to the idle snapshot: its lease sets are empty while the pair executes. The file goes in
            # place first (Redis never saves by itself here), so Redis is away for a moment only, as in a
            # fast failover: the workers' connections come back at once and nothing waits out the outage.
            shutil.copy(snapshot, dump)
            server.stop()
            server.start()
            restored_at = time.monotonic()

            wait_for(lambda: _all_ended(items), timeout=150, interval=0.5, what="all three runs ended")
            log = worker.log()
    finally:
        if worker is not None:
            worker.stop()
        server.kill()

    assert procs.error is None, procs.error
    report = _report(items)
    first_end = min(_times(run_id)[1] for run_id in pair)
    third_start = _times(third)[0]
    pair_gone = min(procs.last_seen(run_id) or 0 for run_id in pair)
    third_seen = procs.first_seen(third)
    print(
        f"redis snapshot: keys in snapshot={keys} samples={len(procs.samples)} max_live={procs.max_live} "
        f"over_cap(s after restore)={procs.over_cap(CAP, restored_at)[:5]} pair={sorted(pair)} third={third} "
        f"third started {(third_start - first_end).total_seconds() if third_start else None}s after the "
        f"first of the pair ended (DB); /proc: third first seen "
        f"{round(third_seen - pair_gone, 2) if third_seen else None}s after the first of the pair was gone, "
        f"{round(third_seen - restored_at, 2) if third_seen else None}s after the restore; runs={report}"
    )
    assert len(procs.samples) > 100
    assert procs.max_live >= CAP
    assert procs.max_live <= CAP, (
        f"over the cap (s after the restore): {procs.over_cap(CAP, restored_at)[:10]}"
    )
    assert third_start is not None
    assert third_start >= first_end, "the third run started while both of the pair were running"
    assert third_seen is not None
    assert third_seen >= pair_gone
    assert [row[0] for row in report.values()] == ["succeeded"] * len(items), (report, log[-4000:])
    assert all(row[0] == row[1] for row in report.values()), f"ScheduledRun does not mirror Run: {report}"
