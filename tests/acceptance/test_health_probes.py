"""The Kubernetes probes (deploy/kubernetes/), run as the manifests write them against real processes:
`manage.py health --scheduler` passes while a run_scheduler loop goes round and fails once it stops
(frozen with SIGSTOP, or killed); `manage.py health --worker` passes while a Celery worker's event loop
sends heartbeats and Redis answers, and fails when either stops; gunicorn answers the web probe's request
(path and Host header) and Flower its probe's, without the login its dashboard asks for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from tests.kubernetes_support import exec_probe, local_argv, main_container, named, rendered
from tests.scheduler_support import REPO, Processes, free_port
from tests.support import process_env, wait_for
from tests.webproc import start_web
from tests.workerproc import CELERY, start_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def probe_command(deployment: str) -> list[str]:
    command = exec_probe(named(rendered("ha"), "Deployment", deployment))
    return local_argv(command)


def probe(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def passes(command, env):
    result = probe(command, env)
    return result if result.returncode == 0 else None


def fails(command, env):
    result = probe(command, env)
    return result if result.returncode == 1 else None


def test_scheduler_probe__passes_while_the_loop_goes_round_and_fails_once_it_stops(tmp_path, redis_client):
    env = process_env(HEALTH_DIR=str(tmp_path / "health"))
    command = probe_command("cyber-brain-scheduler")
    procs = Processes(env, tmp_path)
    try:
        assert fails(command, env), "no scheduler yet"
        scheduler = procs.start("--interval", "1")
        result = wait_for(lambda: passes(command, env), timeout=90, what="scheduler probe passes")
        assert result.stdout.startswith("ok: scheduler")
        assert f"pid {scheduler.pid}" in result.stdout
        assert len(result.stdout.strip().splitlines()) == 1

        # A loop that stops going round (frozen here) fails within twice its interval.
        procs.kill(scheduler, signal.SIGSTOP)
        result = wait_for(lambda: fails(command, env), timeout=60, what="scheduler probe fails")
        assert "last went round" in result.stderr
        assert "over 2 x 1s" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        procs.kill(scheduler, signal.SIGCONT)
        wait_for(lambda: passes(command, env), timeout=60, what="scheduler probe passes again")

        procs.kill(scheduler, signal.SIGKILL)
        scheduler.wait(timeout=30)
        result = wait_for(lambda: fails(command, env), timeout=60, what="probe of a dead scheduler fails")
        assert "has exited" in result.stderr
    finally:
        procs.stop_all()


def test_worker_probe__passes_on_heartbeats_with_redis_and_fails_without_either(tmp_path, redis_client):
    health = {"HEALTH_DIR": str(tmp_path / "health")}
    env = process_env(**health)
    command = probe_command("cyber-brain-worker-general")
    assert fails(command, env), "no worker yet"
    worker = start_worker(["jobs.health-probe"], tmp_path=tmp_path, env=health, concurrency=1)
    try:
        result = wait_for(lambda: passes(command, env), timeout=60, what="worker probe passes")
        assert "Redis answers" in result.stdout

        # Redis unreachable: the same worker fails the probe.
        unreachable = process_env(**health, REDIS_URL="redis://127.0.0.1:1/0")
        result = fails(command, unreachable)
        assert result
        assert "Redis unreachable" in result.stderr

        # An event loop that stops sending heartbeats (the whole worker frozen) fails.
        worker.kill(signal.SIGSTOP)
        result = wait_for(lambda: fails(command, env), timeout=60, what="worker probe fails")
        assert "last went round" in result.stderr
        worker.kill(signal.SIGCONT)
        wait_for(lambda: passes(command, env), timeout=60, what="worker probe passes again")

        # SIGTERM: the stamp says "draining" from the warm shutdown on (the probe passes while the
        # worker lets its runs finish), and once the worker is gone the probe fails.
        worker.kill(signal.SIGTERM)
        worker.proc.wait(timeout=60)
        stamp = json.loads((tmp_path / "health" / "worker.json").read_text())
        assert stamp["state"] == "draining"
        assert stamp["pid"] == worker.proc.pid
        result = fails(command, env)
        assert result
        assert "has exited" in result.stderr
    finally:
        worker.stop()


def http_status(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def http_probes(deployment: str) -> list[tuple[str, dict[str, str]]]:
    container = main_container(named(rendered("ha"), "Deployment", deployment))
    found = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[kind]["httpGet"]
        found.append((get["path"], {h["name"]: h["value"] for h in get.get("httpHeaders", [])}))
    return found


def test_web_probe__gunicorn_answers_its_path_and_host_header_with_debug_off(tmp_path, redis_client):
    config = named(rendered("ha"), "ConfigMap", "cyber-brain-config")["data"]
    # 127.0.0.1 too: start_web waits for the health check at that address.
    allowed = f"{config['ALLOWED_HOSTS']},127.0.0.1"
    web = start_web(process_env(DEBUG="0", ALLOWED_HOSTS=allowed), tmp_path)
    try:
        for path, headers in http_probes("cyber-brain-web"):
            assert http_status(web.url + path, headers) == 200, web.log()[-2000:]
        # What the header is for: a kubelet would send the pod's address, which Django refuses.
        assert http_status(web.url + path, {"Host": "10.1.2.3:9595"}) == 400
    finally:
        web.stop()


def test_flower_probe__answers_without_the_dashboard_login(tmp_path, redis_client):
    port = free_port()
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen(
            [CELERY, "-A", "project", "flower", "--address=127.0.0.1", f"--port={port}"],
            cwd=REPO,
            env=process_env(FLOWER_BASIC_AUTH="ops:probe-test-password"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
            try:
                return http_status(base + "/", {}) == 401
            except OSError:
                return False

        wait_for(answers, timeout=60, what="flower asking for its login")
        for path, headers in http_probes("cyber-brain-flower"):
            assert http_status(base + path, headers) == 200
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
