"""A scheduler host cut off in the middle of its dispatch transaction must not hold its schedules' rows
for good (found by scripts/cluster.py's idle-in-transaction sampler; DESIGN 6.2).

On one host a killed process's connection is reset by its kernel, and PostgreSQL ends the session at
once. A host that is cut off (or frozen) sends nothing: the server keeps the session, its transaction
and its row locks until TCP gives up on the connection, which by default takes ~15 minutes while the
server has an unacknowledged reply in flight, and 2 hours of keepalive when it has none. Every other
scheduler claims with SKIP LOCKED, so the locked schedules are dispatched by nobody all that time: their
slots are lost, although healthy schedulers run and the claim expired long ago.

Here a real scheduler on host n1 is made to wait inside its dispatch transaction (after locking the
schedule's row, before inserting the run: a test session holds a SHARE lock on orchestrator_run), n1 is
cut from PostgreSQL by iptables inside its namespace, and the lock is let go, so the server's reply is
what goes unacknowledged. A second scheduler on n2 must dispatch the slot within a minute: the
scheduler's sessions carry TCP keepalive and a TCP user timeout (project/dbsession.py) that let the
server drop a silent peer's session, and its locks, in about 30 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.scheduler_support import REPO

pytestmark = [pytest.mark.slow]


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
from django.db.models.functions import Now
from django.utils import timezone
from orchestrator.models import Job
from schedules.models import Schedule
s = Schedule.objects.create(
    name="cut-mid-transaction", job=Job.objects.get(key="sleep"), custom_directive_text="0.1",
    schedule_type="interval", interval_minutes=10, misfire_policy="run_all", overlap_policy="allow",
    next_run_at=timezone.now() + timedelta(seconds=2),
)
print(s.pk)
"""


@pytest.mark.skipif(_requirements() is not None, reason=_requirements() or "")
def test_scheduler_cut_off_inside_its_dispatch_transaction__another_dispatches_the_slot():
    cluster_script = _cluster_module()
    workdir = Path(tempfile.mkdtemp(prefix=f"cbc-cluster-{os.getpid()}-"))
    os.chmod(workdir, 0o755)
    cluster = cluster_script.Cluster(cluster_script.Config(), workdir, log=print)
    blocker = None
    try:
        cluster.net.build()
        cluster.start_db_host()
        n1 = cluster.net.addr["n1"]
        schedule_id = int(cluster.manage("n1", "shell", "-c", CREATE_SCHEDULE).split()[-1])
        # The run INSERT of the dispatch transaction waits behind this lock, after the row lock.
        blocker = cluster.pg.connect(cluster_script.DATABASE)
        blocker.autocommit = False
        blocker.cursor().execute("LOCK TABLE orchestrator_run IN SHARE MODE")
        cluster.env["SCHEDULER_LOCK_TIMEOUT_MS"] = "120000"
        cluster.start_scheduler("n1")
        _wait(
            lambda: cluster.sql(
                """SELECT 1 FROM pg_stat_activity WHERE host(client_addr) = %s AND wait_event_type = 'Lock'
                      AND query LIKE 'INSERT INTO "orchestrator_run"%%'""",
                [n1],
            ),
            120,
            "n1's scheduler to wait inside its dispatch transaction",
        )
        cluster.net.partition("n1", "cut_db")
        blocker.commit()  # the INSERT completes; its reply can no longer reach n1
        _wait(
            lambda: cluster.sql(
                """SELECT 1 FROM pg_stat_activity WHERE host(client_addr) = %s
                      AND state LIKE 'idle in transaction%%'""",
                [n1],
            ),
            30,
            "n1's session to sit in its open transaction",
        )
        cluster.env.pop("SCHEDULER_LOCK_TIMEOUT_MS")
        cluster.start_scheduler("n2")

        def dispatched():
            return cluster.sql(
                "SELECT 1 FROM schedules_scheduledrun WHERE schedule_id = %s AND trigger = 'schedule'",
                [schedule_id],
            )

        deadline = time.monotonic() + 75
        while time.monotonic() < deadline and not dispatched():
            time.sleep(1)
        held = cluster.sql(
            """SELECT round(extract(epoch FROM now() - state_change)) FROM pg_stat_activity
                WHERE host(client_addr) = %s AND state LIKE 'idle in transaction%%'""",
            [n1],
        )
        assert dispatched(), (
            f"the slot was never dispatched: n1's cut-off session still holds the schedule's row"
            f" ({held[0][0] if held else '?'} s idle in transaction)"
        )
        assert not held, "the cut-off session still exists"
    finally:
        if blocker is not None:
            blocker.close()
        cluster.teardown()
        shutil.rmtree(workdir, ignore_errors=True)
