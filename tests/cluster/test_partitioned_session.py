"""A host cut off in the middle of a transaction must not hold its schedules' rows for good (issue 18,
found by scripts/cluster.py's idle-in-transaction sampler; docs/ARCHITECTURE.md, guarantee 2).

On one host a killed process's connection is reset by its kernel, and PostgreSQL ends the session at
once. A host that is cut off (or frozen) sends nothing: the server keeps the session, its transaction
and its row locks until TCP gives up on the connection, which by default takes ~15 minutes while the
server has an unacknowledged reply in flight, and 2 hours of keepalive when it has none. Every other
scheduler claims with SKIP LOCKED, so the locked schedules are dispatched by nobody all that time: their
slots are lost, although healthy schedulers run and the claim expired long ago.

Here a real scheduler on host n3 is made to wait inside its dispatch transaction (after locking the
schedule's row, before inserting the run: a test session holds a SHARE lock on orchestrator_run), and
the web (gunicorn) on n1 inside a run-now (holding its schedule's key); both hosts are cut from
PostgreSQL by iptables inside their namespaces and the lock is let go, so the server's replies are what
goes unacknowledged. A scheduler on n2 must dispatch both schedules' slots: every process's sessions
carry TCP keepalive and a TCP user timeout (project/settings.py) that let the server drop a silent
peer's session, and its locks, in about 30 s; and a scheduler's sessions end when idle in a transaction
for SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS (5 s here, below the 6 s claim TTL), so its slot is
dispatched within about that plus one pass of the peer (measured: 6.1 s; 30.9 s with the timeout off).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.scheduler_support import REPO

pytestmark = [pytest.mark.slow]


DATABASE = "cb_soak"  # scripts/cluster.py's database (soak.DATABASE) on its own server


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces (ip netns) and iptables"
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian package {package})"
    return None


def _cluster_module():
    spec = importlib.util.spec_from_file_location("cluster_script", REPO / "scripts" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


CREATE_SCHEDULE = """
from datetime import timedelta
from django.utils import timezone
from orchestrator.models import Job
from schedules.models import Schedule
s = Schedule.objects.create(
    name="cut-mid-transaction-%s", job=Job.objects.get(key="sleep"), custom_directive_text="0.1",
    schedule_type="interval", interval_minutes=10, misfire_policy="run_all", overlap_policy="allow",
    next_run_at=timezone.now() + timedelta(seconds=%d),
)
print(s.pk)
"""


@pytest.fixture
def cluster():
    """The db host (PostgreSQL, Redis, migrated) and three empty node hosts of scripts/cluster.py."""
    if _requirements() is not None:
        pytest.skip(_requirements())
    cluster_script = _cluster_module()
    workdir = Path(tempfile.mkdtemp(prefix=f"cbc-cluster-{os.getpid()}-"))
    os.chmod(workdir, 0o755)
    hosts = cluster_script.Cluster(cluster_script.Config(), workdir, log=print)
    try:
        hosts.net.build()
        hosts.start_db_host()
        yield hosts
    finally:
        hosts.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def run_inserts_blocked(cluster):
    """A SHARE lock on orchestrator_run: a transaction that inserts a run waits there, holding what it
    locked before. Yields the session; its commit lets the waiting INSERTs complete."""
    blocker = cluster.pg.connect(DATABASE)
    blocker.autocommit = False
    try:
        blocker.cursor().execute("LOCK TABLE orchestrator_run IN SHARE MODE")
        yield blocker
    finally:
        blocker.close()


def session_of(cluster, host: str, where: str) -> list[tuple]:
    return cluster.sql(
        f"""SELECT round(extract(epoch FROM now() - state_change)) FROM pg_stat_activity
             WHERE host(client_addr) = %s AND {where}""",
        [cluster.net.addr[host]],
    )


def waiting_inside(cluster, host: str) -> None:
    _wait(
        lambda: session_of(
            cluster, host, """wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO "orchestrator_run"%%'"""
        ),
        120,
        f"{host}'s session to wait inside its transaction",
    )


def dispatched(cluster, schedule_id: int) -> bool:
    return bool(
        cluster.sql(
            "SELECT 1 FROM schedules_scheduledrun WHERE schedule_id = %s AND trigger = 'schedule'",
            [schedule_id],
        )
    )


def test_scheduler_and_web_cut_off_inside_their_transactions__another_scheduler_dispatches_both(cluster):
    """n3's scheduler waits inside its dispatch transaction (it locked the schedule's row FOR UPDATE,
    then inserts the run); n1's web waits inside a run-now (it holds the other schedule's key FOR KEY
    SHARE, schedules/dispatch.py, then inserts the run). Both are cut from PostgreSQL, the lock goes, and
    their replies go unacknowledged. n2's scheduler must dispatch both schedules' slots."""
    by_scheduler = int(cluster.manage("n1", "shell", "-c", CREATE_SCHEDULE % ("scheduler", 2)).split()[-1])
    by_web = int(cluster.manage("n1", "shell", "-c", CREATE_SCHEDULE % ("web", 3600)).split()[-1])
    cluster.start_node("n1", scheduler=False)  # the web (and a worker) on n1
    _wait(lambda: cluster.api("GET", "/api/health/")[0] == 200, 120, "the web to answer")
    with run_inserts_blocked(cluster) as blocker:
        cluster.env["SCHEDULER_LOCK_TIMEOUT_MS"] = "120000"
        # Below the cluster's claim TTL (6 s): the cut-off scheduler's session, idle in its transaction
        # once the lock goes, is ended by the server after 5 s (docs/OPERATIONS.md, "A frozen scheduler").
        cluster.env["SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS"] = "5000"
        cluster.start_scheduler("n3")
        cluster.env.pop("SCHEDULER_LOCK_TIMEOUT_MS")
        cluster.env.pop("SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS")
        waiting_inside(cluster, "n3")
        request = threading.Thread(
            target=cluster.api, args=("POST", f"/api/schedules/{by_web}/run-now"), daemon=True
        )
        request.start()
        waiting_inside(cluster, "n1")
        # The peer is up before the cut (its start-up is not what is measured); it skips the locked rows.
        cluster.start_scheduler("n2")
        for host in ("n1", "n3"):
            cluster.net.partition(host, "cut_db")
        blocker.commit()
        cut_at = time.monotonic()
    _wait(
        lambda: session_of(cluster, "n1", "state LIKE 'idle in transaction%%'"),
        30,
        "n1's session to sit in its open transaction",
    )
    cluster.sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [by_web])

    # The scheduler's slot: its row is free once the server ends the idle session (5 s), and the peer's
    # next pass (--interval=5) dispatches it. Without the timeout the row stays locked until TCP gives the
    # session up (about 30 s here, project/settings.py's keepalive and user timeout).
    _wait(lambda: dispatched(cluster, by_scheduler), 75, "the cut-off scheduler's slot to be dispatched")
    took = time.monotonic() - cut_at
    print(f"cut-off scheduler's slot dispatched by the peer {took:.1f} s after the cut")
    assert took < 20, f"{took:.1f} s: the cut-off scheduler's session held its rows past its idle timeout"

    deadline = time.monotonic() + 75
    while time.monotonic() < deadline and not (
        dispatched(cluster, by_scheduler) and dispatched(cluster, by_web)
    ):
        time.sleep(1)
    held = {h: session_of(cluster, h, "state LIKE 'idle in transaction%%'") for h in ("n1", "n3")}
    for host, schedule_id in (("n3", by_scheduler), ("n1", by_web)):
        assert dispatched(cluster, schedule_id), (
            f"the slot was never dispatched: {host}'s cut-off session still holds the schedule's row"
            f" ({held[host][0][0] if held[host] else '?'} s idle in transaction)"
        )
        assert not held[host], f"{host}'s cut-off session still exists"
