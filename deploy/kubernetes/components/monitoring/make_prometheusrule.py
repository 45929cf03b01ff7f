"""Write prometheusrule.yaml beside this file from deploy/prometheus/cyber-brain.rules.yml, so the
PrometheusRule carries exactly the project's alert rules (tests/integration/test_kubernetes.py checks
that it does). Run it after changing the rules file:

    .venv/bin/python deploy/kubernetes/components/monitoring/make_prometheusrule.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parents[2] / "prometheus" / "cyber-brain.rules.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/cyber-brain.rules.yml by make_prometheusrule.py (beside this file):
# edit the rules file, then run that script. The PrometheusRule carries the same groups.
"""


def prometheus_rule() -> dict:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "cyber-brain"},
        "spec": {"groups": groups},
    }


def render() -> str:
    return HEADER + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=100)


if __name__ == "__main__":
    TARGET.write_text(render())
