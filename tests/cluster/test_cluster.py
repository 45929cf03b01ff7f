"""Several hosts for real (issue 18), the CI form: scripts/cluster.py for a short seeded run, then its checks.

A `db` namespace runs PostgreSQL and Redis; three `node` namespaces each run a scheduler and a worker (the
web on n1), joined by veth pairs to a bridge. For 90 seconds a seeded driver cuts nodes from PostgreSQL,
from Redis, from both, isolates them, slows their links, skews their clocks (libfaketime) and crashes them
(SIGKILL of every process in the namespace), at most two nodes at a time, while run-now bursts come through
the web API. The script's own verdict is the assertion: no duplicate or lost slot, every run ended, none
started twice (attempt > 1, or its task in two process groups or on two nodes, from /proc), no cap exceeded
by live task processes at any sample. The long form is `scripts/cluster.py --minutes 20`
(docs/cluster-runs/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.scheduler_support import PYTHON, REPO

pytestmark = [pytest.mark.slow]

FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces (ip netns), iptables and tc"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("iptables", "iptables")):
        if not shutil.which(tool):
            return f"needs {tool} (Debian package {package})"
    if not FAKETIME_LIB.exists():
        return "needs libfaketime (Debian package faketime)"
    if not Path("/usr/lib/postgresql").is_dir():
        return "needs the PostgreSQL server binaries (Debian package postgresql)"
    return None


@pytest.mark.skipif(_requirements() is not None, reason=_requirements() or "")
def test_cluster_ci_form__partitions_skew_and_crashes_lose_no_slot_and_break_no_cap(tmp_path):
    report_path = tmp_path / "cluster.json"
    done = subprocess.run(
        [PYTHON, "scripts/cluster.py", "--minutes", "1.5", "--seed", "3", "--report", str(report_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert report_path.exists(), (done.stdout[-3000:], done.stderr[-4000:])
    report = json.loads(report_path.read_text())
    print(json.dumps({k: report[k] for k in ("slots", "slot_lag_by_node", "faults", "problems")}, indent=1))

    assert report["problems"] == [], done.stderr[-4000:]
    assert done.returncode == 0
    slots, runs, caps = report["slots"], report["runs"], report["caps"]
    assert slots["slots_duplicated"] == slots["slots_lost"] == 0
    assert slots["slots_expected"] >= 30
    assert slots["slots_dispatched"] == slots["slots_expected"]
    assert runs["not_terminal"] == 0
    assert runs["runs_started_twice_sql"] == runs["runs_executed_twice"] == runs["runs_on_two_nodes"] == 0
    for scope, cap in caps["caps"].items():
        assert caps["proc"]["max_running"][scope] <= cap, scope
    # The faults really happened, and /proc saw task processes on every node.
    kinds = {kind.partition(":")[0] for kind in report["faults"]["counts"]}
    assert len(kinds) >= 4, report["faults"]["counts"]
    assert report["faults"]["run_now_status"].get("202", 0) >= 10
    assert caps["proc"]["samples_with_runs"] > 0
    assert all(caps["proc"]["max_running_per_node"][node] > 0 for node in ("n1", "n2", "n3"))
    assert set(report["slot_lag_by_node"]) >= {"n1", "n2", "n3"}
