"""The soak with faults in its CI form (issues 8, 13): scripts/soak.py for 100 s of faults, then its checks.

Three schedulers, two workers and the web on private PostgreSQL and Redis; 300 schedules; SIGKILLs of
schedulers (~10 s, preferring one that holds claims) and workers (~30 s), a PostgreSQL crash-restart and a
PostgreSQL outage of 2.5 worker leases while runs execute, a Redis restart with its data lost and a Redis
restored from an early snapshot under full caps, run-now bursts. Running runs are counted from SQL and,
as the operating system sees them, from /proc. The script's own verdict (no lost slot or slot at a time
the schedule does not have, every run ended, no run executed twice, no cap exceeded at any moment by
either count, no 5xx) is the assertion; the long form is `scripts/soak.py` (10 min).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.scheduler_support import PYTHON, REPO

pytestmark = [pytest.mark.slow]


def test_soak_ci_form__no_lost_unfinished_or_twice_executed_run_and_caps_hold(tmp_path):
    report_path = tmp_path / "soak.json"
    done = subprocess.run(
        [PYTHON, "scripts/soak.py", "--duration", "100", "--drain", "240", "--report", str(report_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert report_path.exists(), done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    print(json.dumps({k: report[k] for k in ("slots", "caps", "faults", "problems")}, indent=1))

    assert report["problems"] == [], done.stderr[-4000:]
    assert done.returncode == 0
    # The faults really happened, and there was something to lose.
    faults = report["faults"]
    assert faults["scheduler_kills"] >= 5
    assert faults["scheduler_kills_with_claims"] >= 1
    assert faults["worker_kills"] >= 2
    assert faults["postgres_restarts"] == faults["postgres_outages"] == 1
    assert faults["postgres_outage_seconds"] >= 2.5 * report["config"]["lease"]
    assert faults["redis_restarts"] == faults["redis_restores"] == 1
    assert any(key.startswith("cb:sem") for key in faults["snapshot_keys"])  # an old epoch/sequence
    assert faults["run_now_status"].get("202", 0) >= 10
    assert report["slots"]["slots_expected"] >= 30
    assert report["slots"]["slots_dispatched"] == report["slots"]["slots_expected"]
    assert report["runs"]["runs_by_status"].get("succeeded", 0) >= 50
    # The /proc sampler saw this soak's task processes, so its cap and twice-executed checks checked.
    assert report["caps"]["proc"]["samples"] >= 100
    assert report["caps"]["proc"]["samples_with_runs"] > 0
