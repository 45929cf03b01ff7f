"""Redis Sentinel for real: the master is SIGKILLed during a load of runs, Sentinel promotes the replica,
and the scheduler, the workers and the web carry on through project/redisconn.py.

Two private redis-server processes (a master and its replica, no persistence) and three redis-sentinel
processes, all on free ports; a real scheduler dispatches LOAD one-shot schedules coming due over a few
seconds, two real workers (`manage.py run_worker`) run them. Every run ends, none executes twice (the
workers' "run started" lines), and the per-job cap holds, counted from live task processes in /proc
throughout. Writes the old master had not replicated are covered by the lease-floor rebuild
(worker/semaphore.py) and the outbox sweep (schedules/publishing.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from orchestrator.models import Run
from project.redisconn import connect, sentinel_broker_url
from schedules.models import Schedule
from tests.scheduler_support import PrivateRedis, Processes, db_now, free_port, sleep_job
from tests.support import process_env, wait_for
from tests.webproc import start_web
from tests.workerproc import TAG_ENV, ProcSampler, start_run_worker, started_together

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        shutil.which("redis-sentinel") is None, reason="needs the Debian package redis-sentinel (.ci/run)"
    ),
]

# One-shot schedules, one short run each, coming due evenly over SPREAD_SECONDS: 10 a second, faster
# than the capped workers run them, so a backlog of messages waits in the broker when the master dies.
LOAD = 100
SPREAD_SECONDS = 10.0
CAP = 3  # per-job cap; the two workers have 4 pool processes between them
MASTER = "cbmaster"


class Replica(PrivateRedis):
    def __init__(self, master_port: int, data_dir: Path) -> None:
        super().__init__(data_dir=data_dir)
        self.master_port = master_port

    def _dir_args(self) -> list[str]:
        return [*super()._dir_args(), "--replicaof", "127.0.0.1", str(self.master_port)]


class Sentinels:
    """Three redis-sentinel processes watching the master (quorum 2, down after 1 s)."""

    def __init__(self, master_port: int, tmp_path: Path, count: int = 3) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen] = []
        for port in self.ports:
            conf = tmp_path / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            log = open(tmp_path / f"sentinel-{port}.log", "wb")
            self.procs.append(
                subprocess.Popen(
                    ["redis-sentinel", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(self.ready, timeout=20, what="sentinels see the master and its replica")

    @property
    def setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def master_port(self) -> int | None:
        try:
            return int(
                redis.Redis(port=self.ports[0], socket_timeout=1).sentinel_get_master_addr_by_name(MASTER)[1]
            )
        except (redis.RedisError, TypeError):
            return None

    def ready(self) -> bool:
        try:
            return all(
                redis.Redis(port=p, socket_timeout=1).sentinel_master(MASTER)["num-slaves"] >= 1
                for p in self.ports
            )
        except redis.RedisError:
            return False

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)


def _answers(script) -> bool:
    try:
        script(keys=["cb:test:probe"])
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    return True


def _started_counts(logs: list[str]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for log in logs:
        for line in log.splitlines():
            if "run started" in line:
                match = re.search(r'"run_id": ?(\d+)', line) or re.search(r"run_id=(\d+)", line)
                assert match, line
                run_id = int(match.group(1))
                counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def test_master_killed_during_load__replica_promoted_every_run_ends_once_caps_hold(tmp_path):
    # Their own folders: a full sync writes an RDB file on both sides (still no persistence: no saves).
    master = PrivateRedis(data_dir=tmp_path / "master")
    master.start()
    replica = Replica(master.port, tmp_path / "replica")
    replica.start()
    sentinels = Sentinels(master.port, tmp_path)
    redis_url = f"redis://127.0.0.1:{master.port}/0"  # with sentinels set, only its database number counts
    tag = uuid.uuid4().hex
    env = {
        "REDIS_URL": redis_url,
        "REDIS_SENTINELS": sentinels.setting,
        "REDIS_SENTINEL_MASTER": MASTER,
        "CELERY_BROKER_URL": sentinel_broker_url(redis_url, sentinels.setting),
        TAG_ENV: tag,
    }
    job = sleep_job()
    now = db_now()
    Schedule.objects.bulk_create(
        Schedule(
            name=f"sentinel-{i}",
            job=job,
            custom_directive_text="0.2",
            schedule_type="interval",
            interval_minutes=60,
            next_run_at=now + timedelta(seconds=3 + SPREAD_SECONDS * i / LOAD),
            misfire_policy="run_once",
            overlap_policy="allow",
            max_per_job=CAP,
        )
        for i in range(LOAD)
    )
    schedulers = Processes(process_env(**env), tmp_path)
    workers = []
    web = None
    try:
        # A message the old master had taken but not replicated is published again by the outbox sweep.
        schedulers.start("--interval", "0.5", "--republish-after", "5", "--republish-backlog-after", "5")
        workers = started_together(
            [
                start_run_worker(tmp_path=tmp_path, name=f"sw{i}", concurrency=2, env=env, ready=False)
                for i in range(2)
            ]
        )
        web = start_web(process_env(**env), tmp_path)
        assert web.call("GET", "/api/health/")[0] == 200, web.log()[-2000:]
        # A long-lived client, as each process keeps one, with a Lua script loaded on the old master
        # only (Redis does not replicate SCRIPT LOAD).
        probe = connect(redis_url, sentinels=sentinels.setting, master=MASTER, socket_timeout=1)
        incr = probe.register_script("return redis.call('INCR', KEYS[1])")
        assert incr(keys=["cb:test:probe"]) == 1
        with ProcSampler(tag) as procs:
            wait_for(
                lambda: Run.objects.filter(status="succeeded").count() >= LOAD // 3,
                timeout=120,
                interval=0.2,
                what="a third of the runs done",
            )
            master.proc.kill()  # SIGKILL: whatever it had not sent to the replica is gone
            killed_at = time.time()
            master.proc.wait(timeout=10)
            wait_for(lambda: sentinels.master_port() == replica.port, timeout=60, what="replica promoted")
            promoted_after = time.time() - killed_at
            assert replica.client().script_exists(incr.sha) == [False]
            # The same client and script object carry on: a new connection asks the sentinels again,
            # and NOSCRIPT on the new master makes redis-py load the script there.
            wait_for(lambda: _answers(incr), timeout=30, what="the long-lived client on the new master")
            assert probe.get("cb:test:probe") in {b"1", b"2"}  # 1 if the INCR had not replicated
            assert probe.connection_pool.get_master_address() == ("127.0.0.1", replica.port)
            # The web's health check reaches Redis through the sentinels too: healthy again on the new master.
            wait_for(lambda: web.call("GET", "/api/health/")[0] == 200, timeout=60, what="web healthy again")
            wait_for(
                lambda: Run.objects.filter(status__in=["succeeded", "failed"]).count() == LOAD,
                timeout=240,
                interval=0.5,
                what="every run ended",
            )
        logs = [w.log() for w in workers]
        first_after = (
            Run.objects.filter(started_at__gt=datetime.fromtimestamp(killed_at, UTC))
            .order_by("started_at")
            .values_list("started_at", flat=True)
            .first()
        )
    finally:
        for worker in workers:
            worker.stop()
        if web is not None:
            web.stop()
        schedulers.stop_all()
        sentinels.kill()
        replica.kill()
        master.kill()

    assert procs.error is None, procs.error
    statuses = list(Run.objects.values_list("status", flat=True))
    assert statuses == ["succeeded"] * LOAD, (
        f"{sorted(set(statuses))}\n{logs[0][-3000:]}\n{schedulers.logs()}"
    )
    # kombu's Sentinel channel now and then fails while closing the lost connection (an AttributeError
    # in restore_unacked): that Celery process exits and run_worker restarts it (worker/supervisor.py).
    restarts = sum(log.count("celery worker exited unexpectedly") for log in logs)
    started = _started_counts(logs)
    assert set(started) == set(Run.objects.values_list("id", flat=True))
    assert [run_id for run_id, n in started.items() if n > 1] == [], "a run executed twice"
    assert procs.max_live_of("sleep") <= CAP, f"over the cap: {procs.over_cap(CAP)[:10]}"
    assert procs.max_live_of("sleep") == CAP  # the bound above was really sampled
    assert first_after is not None
    first_start = first_after.timestamp() - killed_at
    print(
        f"sentinel failover: {LOAD} runs, promoted {promoted_after:.1f}s after the kill, first run started "
        f"on the new master {first_start:.1f}s after the kill; max live {procs.max_live_of('sleep')}/{CAP};"
        f" Celery restarted by run_worker {restarts} time(s)"
    )
