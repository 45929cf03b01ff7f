"""The soak with faults in its CI form (issue 8): scripts/soak.py for 100 s of faults, then its checks.

Three schedulers, two workers and the web on private PostgreSQL and Redis; 300 schedules; SIGKILLs of
schedulers (~10 s) and workers (~30 s), a PostgreSQL crash-restart, a Redis restart with its data lost,
run-now bursts. The script's own verdict (0 duplicate or lost slots, every run ended, no cap exceeded
outside the Redis-restart window, no 5xx) is the assertion; the long form is `scripts/soak.py` (10 min).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.scheduler_support import PYTHON, REPO

pytestmark = [pytest.mark.slow]


def test_soak_ci_form__no_duplicate_lost_or_unfinished_run_and_caps_hold(tmp_path):
    report_path = tmp_path / "soak.json"
    done = subprocess.run(
        [PYTHON, "scripts/soak.py", "--duration", "100", "--drain", "240", "--report", str(report_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=570,
    )
    assert report_path.exists(), done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    print(json.dumps({k: report[k] for k in ("slots", "caps", "faults", "problems")}, indent=1))

    assert report["problems"] == [], done.stderr[-4000:]
    assert done.returncode == 0
    # The faults really happened, and there was something to lose.
    faults = report["faults"]
    assert faults["scheduler_kills"] >= 5
    assert faults["worker_kills"] >= 2
    assert faults["postgres_restarts"] == faults["redis_restarts"] == 1
    assert faults["run_now_status"].get("202", 0) >= 10
    assert report["slots"]["slots_expected"] >= 30
    assert report["slots"]["slots_dispatched"] == report["slots"]["slots_expected"]
    assert report["runs"]["runs_by_status"].get("succeeded", 0) >= 50
