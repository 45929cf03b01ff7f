"""The process table in one place (deploy/processes.toml): docker-compose.yml, the Procfile that `make run`
starts, and the Kubernetes manifests name the same processes, with the same commands, ports, probes and
settings. A process, an option or a setting added to one of them and missed in another fails here."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.kubernetes_support import main_container, named, of_kind, rendered

ROOT = Path(__file__).resolve().parents[2]
TABLE = tomllib.loads((ROOT / "deploy" / "processes.toml").read_text())
PROCESSES = TABLE["processes"]
PLACES = ("compose", "make_run", "kubernetes")
BACKING_SERVICES = {"db", "redis"}
# $NAME, ${NAME...}, $$NAME (compose's escape), $(NAME) (Kubernetes').
REFERENCE = re.compile(r"\$\$?[{(]?([A-Z_][A-Z0-9_]*)")


def words(command: str | list[str]) -> list[str]:
    """A command as words, shell strings (`sh -c "..."`) split too, paths reduced to their base name."""
    text = command if isinstance(command, str) else shlex.join(command)
    out: list[str] = []
    for word in shlex.split(text):
        if " " in word.strip():
            out += words(word)
        else:
            out.append(word.rsplit("/", 1)[-1] if word.startswith("/") else word)
    return out


def contains(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# --- each place's table ------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


def commands(place: str) -> dict[str, list[list[str]]]:
    """Each process's commands (one per Deployment in Kubernetes), as words."""
    if place == "compose":
        services = compose()["services"]
        return {name: [words(s["command"])] for name, s in services.items() if name not in BACKING_SERVICES}
    if place == "make_run":
        return {name: [words(line)] for name, line in procfile().items()}
    docs = rendered("small")
    found: dict[str, list[list[str]]] = {}
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        (process,) = [p for p, spec in PROCESSES.items() if name in spec["kubernetes"]] or [name]
        found.setdefault(process, []).append(words(main_container(deployment)["command"]))
    return found


def settings(place: str) -> set[str]:
    if place == "compose":
        data = compose()
        names = set(data["x-app"]["environment"])
        env_example = (ROOT / ".env.example").read_text()
        names |= set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", env_example, re.MULTILINE))
        names |= set(REFERENCE.findall((ROOT / "docker-compose.yml").read_text()))
        return names
    if place == "make_run":
        script = (ROOT / "scripts" / "run_local.sh").read_text()
        names = set(re.findall(r"^\s*export ([A-Z_][A-Z0-9_]*)", script, re.MULTILINE))
        return names | set(REFERENCE.findall((ROOT / "Procfile").read_text()))
    docs = rendered("small")
    names = set(named(docs, "ConfigMap", "cyber-brain-config")["data"])
    names |= set(named(docs, "Secret", "cyber-brain-secrets")["stringData"])
    for deployment in of_kind(docs, "Deployment"):
        names |= set(REFERENCE.findall(" ".join(main_container(deployment)["command"])))
    return names


def expected_settings(place: str) -> set[str]:
    table = TABLE["settings"]
    deployed = set(table["deployed"]) if place != "make_run" else set()
    return set(table["everywhere"]) | deployed | set(table["only"][place])


# --- the comparisons ---------------------------------------------------------------------------------


@pytest.mark.parametrize("place", PLACES)
def test_every_place_runs_the_processes_of_the_table(place):
    assert set(commands(place)) == set(PROCESSES)


def test_kubernetes_runs_the_deployments_the_table_names():
    deployments = {d["metadata"]["name"] for d in of_kind(rendered("small"), "Deployment")}
    assert deployments == {name for spec in PROCESSES.values() for name in spec["kubernetes"]}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_every_place_runs_the_command_options_and_port_of_the_table(place, process):
    spec = PROCESSES[process]
    for command in commands(place)[process]:
        assert contains(command, spec["command"]), (place, process, command)
        for option in spec.get("options", []):
            assert contains(command, option), (place, process, option, command)
        if "port" in spec:
            assert any(re.search(rf"\b{spec['port']}\b", word) for word in command), (place, process, command)


@pytest.mark.parametrize("process", sorted(PROCESSES))
def test_compose_and_kubernetes_check_the_health_the_table_names(process):
    probe = PROCESSES[process]["probe"]
    healthcheck = compose()["services"][process]["healthcheck"]["test"]
    docs = rendered("small")
    for deployment in PROCESSES[process]["kubernetes"]:
        container = main_container(named(docs, "Deployment", deployment))
        for kind in ("livenessProbe", "readinessProbe"):
            if "http" in probe:
                assert container[kind]["httpGet"]["path"] == probe["http"]
            else:
                assert words(container[kind]["exec"]["command"]) == probe["command"]
    if "http" in probe:
        assert any(probe["http"] in word for word in healthcheck)
    else:
        assert words([word for word in healthcheck if word != "CMD"]) == probe["command"]


@pytest.mark.parametrize("place", PLACES)
def test_every_place_sets_the_settings_of_the_table(place):
    found, expected = settings(place), expected_settings(place)
    assert sorted(expected - found) == [], f"{place} misses settings the table names"
    assert sorted(found - expected) == [], f"{place} sets settings deploy/processes.toml does not name"


def test_a_setting_added_to_one_place_only_is_caught(tmp_path):
    """The comparison itself: one more ConfigMap key, not in the table, is a difference."""
    found = settings("kubernetes") | {"WORKER_LEASE_SECONDS"}
    assert found - expected_settings("kubernetes") == {"WORKER_LEASE_SECONDS"}
    assert "WORKER_LEASE_SECONDS" not in settings("compose")
