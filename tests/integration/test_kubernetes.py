"""deploy/kubernetes/ (docs/KUBERNETES.md): every overlay renders with kustomize and every manifest is valid,
offline, against the Kubernetes 1.30 schemas (kubernetes-validate) and, for KEDA and Prometheus Operator
objects, against the CRD schemas vendored in deploy/kubernetes/schemas/. Every process has probes,
resources, a locked-down securityContext and a PodDisruptionBudget; the PrometheusRule carries the
project's alert rules; every setting a process reads is set or has a default.

The probes against real processes: tests/acceptance/test_health_probes.py.
"""

from __future__ import annotations

import ast
import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.kubernetes_support import (
    KUBERNETES,
    OVERLAYS,
    ROOT,
    containers,
    exec_probe,
    main_container,
    named,
    of_kind,
    rendered,
)

KUBERNETES_VERSION = "1.30.0"
SCHEMAS = KUBERNETES / "schemas"
CRD_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCHEMAS / "keda" / "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS
    / "prometheus-operator"
    / "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMAS
    / "prometheus-operator"
    / "monitoring.coreos.com_prometheusrules.yaml",
}
PROCESSES = ("web", "scheduler", "worker-triage", "worker-general", "flower")


def strict(schema: object) -> object:
    """An OpenAPI schema of a CRD as JSON Schema that refuses unknown fields (as kubernetes-validate's
    --strict does): a typo in a field name fails instead of being pruned silently by the API server."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load(CRD_FILES[(api_version, kind)].read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    # metadata is the API server's (ObjectMeta), not the CRD's: kubernetes-validate checks its shape.
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        # Not checked as a schema first: CRD patterns are Go regular expressions (`^(?i)...`), which
        # Python's `re` refuses; a pattern is compiled only for a field a manifest sets.
        jsonschema.Draft7Validator(crd_schema(*key)).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_every_manifest_validates(overlay):
    docs = rendered(overlay)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "Job", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds
    assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= kinds
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize(
    ("api_version", "kind", "path", "bad"),
    [
        ("apps/v1", "Deployment", ["spec", "replicas"], "two"),
        ("apps/v1", "Deployment", ["spec", "template", "spec", "restartPolcy"], "Always"),
        ("keda.sh/v1alpha1", "ScaledObject", ["spec", "minReplicaCount"], "zero"),
        ("keda.sh/v1alpha1", "ScaledObject", ["spec", "pollingIntervall"], 15),
        ("monitoring.coreos.com/v1", "ServiceMonitor", ["spec", "endpoints"], "http"),
        ("monitoring.coreos.com/v1", "PrometheusRule", ["spec", "groups", 0, "rules", 0, "for"], "2 minutes"),
    ],
)
def test_validation_refuses_a_wrong_type_or_an_unknown_field(api_version, kind, path, bad):
    (doc,) = [d for d in rendered("ha") if d["kind"] == kind][:1]
    broken = copy.deepcopy(doc)
    target = broken
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = bad
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(broken)


def test_every_custom_resource_schema_is_vendored_with_its_licence():
    for path in CRD_FILES.values():
        assert path.exists()
        assert "Apache License" in (path.parent / "LICENSE").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_process_has_probes_resources_a_locked_down_context_and_a_disruption_budget(overlay):
    docs = rendered(overlay)
    budgets = {
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for pdb in of_kind(docs, "PodDisruptionBudget")
    }
    for name in PROCESSES:
        deployment = named(docs, "Deployment", f"cyber-brain-{name}")
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        main = main_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in main, (name, probe)
        for container in containers(deployment):
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert {"requests", "limits"} <= set(container["resources"]), (name, container["name"])
            # The one writable place: /tmp, an emptyDir (gunicorn's heartbeat files, the health stamps).
            (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
            assert "emptyDir" in volume
        assert f"cyber-brain-{name}" in budgets, name


def test_web_probes_ask_the_health_endpoint_as_an_allowed_host():
    docs = rendered("small")
    web = main_container(named(docs, "Deployment", "cyber-brain-web"))
    allowed = named(docs, "ConfigMap", "cyber-brain-config")["data"]["ALLOWED_HOSTS"].split(",")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = web[probe]["httpGet"]
        assert get["path"] == "/api/health/"
        host = {h["name"]: h["value"] for h in get["httpHeaders"]}["Host"]
        assert host in allowed  # Django answers a pod-IP Host header with 400


def test_scheduler_and_worker_probes_are_manage_py_health_subcommands():
    """The probe commands exist and take these flags (their behaviour against real processes:
    tests/acceptance/test_health_probes.py)."""
    from django.core.management import load_command_class

    docs = rendered("ha")
    parser = load_command_class("monitoring", "health").create_parser("manage.py", "health")
    for name, flag in (
        ("scheduler", "--scheduler"),
        ("worker-triage", "--worker"),
        ("worker-general", "--worker"),
    ):
        deployment = named(docs, "Deployment", f"cyber-brain-{name}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = exec_probe(deployment, probe)
            assert command[:3] == ["python", "manage.py", "health"]
            assert command[3:] == [flag]
            parser.parse_args(command[3:])


def test_ha_runs_two_schedulers_and_two_web_pods_and_keeps_a_worker_per_group():
    docs = rendered("ha")
    assert named(docs, "Deployment", "cyber-brain-scheduler")["spec"]["replicas"] == 2
    assert named(docs, "Deployment", "cyber-brain-web")["spec"]["replicas"] == 2
    assert {so["spec"]["minReplicaCount"] for so in of_kind(docs, "ScaledObject")} == {1}
    small = rendered("small")
    assert named(small, "Deployment", "cyber-brain-scheduler")["spec"]["replicas"] == 1
    assert {so["spec"]["minReplicaCount"] for so in of_kind(small, "ScaledObject")} == {0}


def _worker_jobs(deployment: dict) -> list[str]:
    (jobs,) = [
        arg.split("=", 1)[1] for arg in main_container(deployment)["command"] if arg.startswith("--jobs=")
    ]
    return jobs.split(",")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_worker_deployment_has_a_scaled_object_counting_its_own_jobs(overlay):
    docs = rendered(overlay)
    config = named(docs, "ConfigMap", "cyber-brain-config")["data"]
    secret = named(docs, "Secret", "cyber-brain-secrets")["stringData"]
    workers = [
        d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].startswith("cyber-brain-worker-")
    ]
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(docs, "ScaledObject")}
    assert sorted(scaled) == sorted(d["metadata"]["name"] for d in workers)
    seen_jobs: list[str] = []
    for deployment in workers:
        jobs = _worker_jobs(deployment)
        seen_jobs += jobs
        (trigger,) = scaled[deployment["metadata"]["name"]]["spec"]["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "postgresql"
        # The same database the processes use; the password from the worker's own environment.
        assert (meta["host"], meta["port"], meta["userName"], meta["dbName"]) == (
            config["POSTGRES_HOST"],
            config["POSTGRES_PORT"],
            config["POSTGRES_USER"],
            config["POSTGRES_DB"],
        )
        assert meta["passwordFromEnv"] in secret
        assert re.search(r"j.key IN \(([^)]*)\)\s*$", meta["query"]).group(1) == ", ".join(
            f"'{j}'" for j in jobs
        )
        concurrency = [a for a in main_container(deployment)["command"] if a.startswith("--concurrency=")]
        assert meta["targetQueryValue"] == concurrency[0].split("=")[1]
    assert len(seen_jobs) == len(set(seen_jobs)), "a job's queue in two worker groups"
    # Every job the project ships has workers (tests may register more jobs of their own).
    import importlib

    from orchestrator.jobs import registry

    shipped = [importlib.import_module(module).JOB.key for module in registry._BUILTIN_MODULES]
    assert sorted(seen_jobs) == sorted(shipped)


@pytest.mark.django_db
def test_the_scaled_object_query_counts_queued_and_running_runs_of_its_jobs():
    from django.db import connection

    from orchestrator.models import Job, Run

    so = named(rendered("small"), "ScaledObject", "cyber-brain-worker-general")
    job = Job.objects.get(key="sleep")
    for status in ("queued", "running", "running", "succeeded", "failed"):
        Run.objects.create(job=job, status=status)
    with connection.cursor() as cursor:
        cursor.execute(so["spec"]["triggers"][0]["metadata"]["query"])
        assert cursor.fetchone()[0] == 3


def test_the_prometheus_rule_carries_the_project_alert_rules():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "cyber-brain.rules.yml").read_text())
    for overlay in OVERLAYS:
        (rule,) = of_kind(rendered(overlay), "PrometheusRule")
        assert rule["spec"]["groups"] == rules["groups"]
    generated = KUBERNETES / "components" / "monitoring" / "prometheusrule.yaml"
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_rule", generated.with_name("make_prometheusrule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert generated.read_text() == module.render(), "run make_prometheusrule.py"


def test_the_service_monitor_scrapes_metrics_with_the_job_label_the_rules_expect():
    docs = rendered("ha")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    service = named(docs, "Service", "cyber-brain-web")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "cyber-brain"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    auth = named(docs, "Secret", endpoint["basicAuth"]["username"]["name"])["stringData"]
    pair = named(docs, "Secret", "cyber-brain-secrets")["stringData"]["METRICS_BASIC_AUTH"]
    assert pair == f"{auth['username']}:{auth['password']}"


# --- settings ---------------------------------------------------------------------------------------

ENV_HELPERS = {"env_str", "env_bool", "env_int", "env_list"}
# Read with a default that no deployment can run on: the process refuses to start without it.
REQUIRED = {"SECRET_KEY"}


def settings_read() -> dict[str, bool]:
    """Every environment variable the processes read through project/env.py, and whether the read has a
    default: settings.py, celery.py and env.py's database parts."""
    found: dict[str, bool] = {}
    for path in (
        ROOT / "project" / "settings.py",
        ROOT / "project" / "celery.py",
        ROOT / "project" / "env.py",
    ):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ENV_HELPERS
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found[node.args[0].value] = len(node.args) + len(node.keywords) >= 2
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_a_process_reads_is_set_or_has_a_default(overlay):
    docs = rendered(overlay)
    provided = set(named(docs, "ConfigMap", "cyber-brain-config")["data"])
    provided |= set(named(docs, "Secret", "cyber-brain-secrets")["stringData"])
    read = settings_read()
    assert {"SECRET_KEY", "REDIS_URL", "POSTGRES_HOST", "WORKER_LEASE_SECONDS"} <= set(read)
    missing = sorted(name for name, has_default in read.items() if not has_default and name not in provided)
    assert missing == []
    assert REQUIRED <= provided
    # What the commands name themselves ($VAR, ${VAR:-...}, $(VAR)), and Flower's login.
    for name in PROCESSES:
        for container in containers(named(docs, "Deployment", f"cyber-brain-{name}")):
            refs = re.findall(r"\$\{?\(?([A-Z_][A-Z0-9_]*)", " ".join(container["command"]))
            assert set(refs) <= provided, (name, refs)
            sources = {ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]}
            assert sources == {"cyber-brain-config", "cyber-brain-secrets"}
    assert "FLOWER_BASIC_AUTH" in provided
    # Nothing set that no process reads (a typo would be silently ignored).
    extra = provided - set(read) - {"WEB_CONCURRENCY", "FLOWER_BASIC_AUTH", "METRICS_BASIC_AUTH"}
    assert extra == set(), extra


def test_the_secret_holds_placeholders_the_processes_refuse():
    from django.core.exceptions import ImproperlyConfigured

    secret = named(rendered("small"), "Secret", "cyber-brain-secrets")["stringData"]
    assert set(secret.values()) <= {"change-me", "admin:change-me", "prometheus:change-me"}
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={
            "DJANGO_SETTINGS_MODULE": "project.settings",
            "SECRET_KEY": secret["SECRET_KEY"],
            "CB_LOCAL_ENV_FILE": "",
        },
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode != 0
    assert ImproperlyConfigured.__name__ in result.stderr
    assert "placeholder" in result.stderr


def test_docs_describe_every_manifest():
    text = (ROOT / "docs" / "KUBERNETES.md").read_text()
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if SCHEMAS in path.parents:
            continue
        assert str(path.relative_to(KUBERNETES)) in text, path
    assert "docs/KUBERNETES.md" in (ROOT / "README.md").read_text()
    assert Path(KUBERNETES / "render").stat().st_mode & 0o111


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_process_starts_before_the_migration_job_has_migrated(overlay):
    docs = rendered(overlay)
    (job,) = of_kind(docs, "Job")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["command"][:3] == ["python", "manage.py", "migrate"]
    for name in PROCESSES:
        deployment = named(docs, "Deployment", f"cyber-brain-{name}")
        (wait,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert "manage.py migrate --check" in " ".join(wait["command"])
        # The same image as the Job and the process: a new release waits for its own migrations.
        assert wait["image"] == migrate["image"] == main_container(deployment)["image"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_get_time_to_drain_before_they_are_killed(overlay):
    docs = rendered(overlay)
    config = named(docs, "ConfigMap", "cyber-brain-config")["data"]
    for deployment in of_kind(docs, "Deployment"):
        if not deployment["metadata"]["name"].startswith("cyber-brain-worker-"):
            continue
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= 300
        if "WORKER_DRAIN_SECONDS" in config:
            assert float(config["WORKER_DRAIN_SECONDS"]) < grace
