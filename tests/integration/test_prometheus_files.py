"""The shipped Prometheus rules and Grafana dashboard (deploy/): `promtool check rules` on the rules,
`promtool check metrics` on a real scrape of the running app (gunicorn), and every metric they use is
one /metrics exports.

promtool comes with Debian's `prometheus` package (.ci/run installs it); without it these skip saying so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_metrics_totals import finish_slot, skip_slots
from tests.scheduler_support import db_now, make_schedule
from tests.support import process_env
from tests.webproc import api_token, start_web

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "cyber-brain.rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "cyber-brain.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package (apt-get install prometheus)")
    return path


def some_history() -> None:
    """Something in every series: a finished slot (runs, durations, lags, last success), skipped
    slots, an enabled schedule's next run."""
    schedule = make_schedule("files", next_run_at=db_now() + timedelta(hours=1))
    finish_slot(schedule, 10, "succeeded")
    skip_slots(schedule, [20])


def expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    found = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    found += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return found


def test_the_rules_file_passes_promtool_check_rules():
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)  # the web process reads what the test wrote
def test_a_scrape_of_the_running_app_passes_promtool_check_metrics(tmp_path, redis_client):
    tool = promtool()
    some_history()
    web = start_web(process_env(METRICS_MAX_AGE_SECONDS="0"), tmp_path, token=api_token())
    try:
        status, text = web.call("GET", "/metrics")
    finally:
        web.stop()
    assert status == 200, text
    assert "cb_runs_total{" in text
    result = subprocess.run(
        [tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db
@override_settings(METRICS_MAX_AGE_SECONDS=0)
def test_every_metric_the_rules_and_the_dashboard_use_is_exported(api, redis_client):
    some_history()
    text = api.get("/metrics").content.decode()
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    used = {name for expr in expressions() for name in re.findall(r"\bcb_[a-z_]+", expr)}
    assert len(used) >= 10
    assert used - exported == set()


def test_the_dashboard_is_grafana_json_with_a_datasource_on_every_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "cyber-brain"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
