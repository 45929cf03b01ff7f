"""OrchestratorService.execute: each task in a fresh child process, with time and memory limits.

The child processes are forked from this process's task template (orchestrator/template.py), which
lives on between tests as it lives on in a pool process; tests/integration/test_task_template.py covers
the template itself.

Children run against the test database, so these tests commit (transaction=True).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings

from orchestrator.jobs.registry import register, unregister
from orchestrator.models import Job, Run
from orchestrator.services import OrchestratorService, TaskFailed
from orchestrator.template import running_template_pid
from tests.integration.orchestrator_jobs_for_tests import JOBS
from tests.support import process_env, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie has exited, only its entry remains)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def test_jobs():
    for spec in JOBS.values():
        register(spec)
        Job.objects.update_or_create(
            key=spec.key, defaults={"name": spec.name, "timeout_seconds": spec.timeout_seconds}
        )
    yield
    for key in JOBS:
        unregister(key)


def launch(key: str, pid_file: Path) -> Run:
    return OrchestratorService.launch(job=Job.objects.get(key=key), custom_directive_text=str(pid_file))


def pids_in(pid_file: Path) -> list[int]:
    return [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []


def test_execute__runs_each_task_in_its_own_child_that_exits(test_jobs, tmp_path):
    run = launch("t_ok", tmp_path / "pids")

    stats = OrchestratorService.execute(run)

    tasks = stats["tasks"]
    assert [tasks[name]["outcome"] for name in ("first", "middle", "last")] == ["succeeded"] * 3
    pids = {tasks[name]["pid"] for name in tasks}
    assert len(pids) == 3
    assert os.getpid() not in pids
    assert pids_in(tmp_path / "pids") == [tasks["first"]["pid"]]
    assert not any(alive(pid) for pid in pids)
    assert children_of(os.getpid()) == [running_template_pid()]  # the template forks; it runs no task
    # Numbers are counted; text never reaches stats.
    assert tasks["middle"]["items"] == 3
    assert tasks["middle"]["ratio"] == 0.5
    assert "label" not in tasks["middle"]


def test_execute__overrunning_task_is_killed_with_its_children(test_jobs, tmp_path):
    run = launch("t_hang", tmp_path / "pids")
    started = time.monotonic()

    with pytest.raises(TaskFailed) as info:
        OrchestratorService.execute(run)

    assert time.monotonic() - started < 60
    assert str(info.value) == "task hang failed: time limit reached (run timeout 15s)"
    assert info.value.stats["tasks"]["hang"]["outcome"] == "timed_out"
    child, grandchild = pids_in(tmp_path / "pids")
    assert not alive(child)
    assert not alive(grandchild)
    assert [pid for pid in children_of(os.getpid()) if pid != running_template_pid()] == []


def test_execute__crashing_task_fails_the_run_with_the_signal(test_jobs, tmp_path):
    with pytest.raises(TaskFailed) as info:
        OrchestratorService.execute(launch("t_crash", tmp_path / "pids"))

    assert str(info.value) == "task middle failed: child process crashed (signal SIGKILL)"
    assert info.value.stats["tasks"]["first"]["outcome"] == "succeeded"
    assert "last" not in info.value.stats["tasks"]


def test_execute__memory_hog_hits_the_memory_limit(test_jobs, tmp_path):
    with pytest.raises(TaskFailed) as info:
        OrchestratorService.execute(launch("t_memory", tmp_path / "pids"))

    assert str(info.value) == "task middle failed: memory limit exceeded (512 MiB)"


def test_execute__exception_summary_names_the_type_not_the_message(test_jobs, tmp_path, capfd):
    with pytest.raises(TaskFailed) as info:
        OrchestratorService.execute(launch("t_raise", tmp_path / "pids"))

    assert str(info.value) == "task middle failed: ValueError"
    assert len(str(info.value)) <= 500
    assert "hunter2" not in str(info.value.stats)


def test_execute__task_dies_when_the_worker_is_hard_killed(test_jobs, tmp_path):
    run = launch("t_hang", tmp_path / "pids")
    Job.objects.filter(key="t_hang").update(timeout_seconds=300)
    script = (
        "import django; django.setup()\n"
        "from tests.integration.orchestrator_jobs_for_tests import JOBS\n"
        "from orchestrator.jobs.registry import register\n"
        "from orchestrator.models import Run\n"
        "from orchestrator.services import OrchestratorService\n"
        "register(JOBS['t_hang'])\n"
        f"OrchestratorService.execute(Run.objects.get(pk={run.pk}))\n"
    )
    # The killed worker cannot remove its run's work dir: keep it in this test's tmp_path.
    (tmp_path / "tmp").mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=settings.BASE_DIR,
        env=process_env(TMPDIR=str(tmp_path / "tmp")),
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(pids_in(tmp_path / "pids")) == 2, timeout=60, what="the hanging task started")
        child, grandchild = pids_in(tmp_path / "pids")
        assert alive(child)
        (template,) = children_of(worker.pid)  # the task was forked from it, not by the worker

        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)

        wait_for(
            lambda: not alive(child) and not alive(grandchild) and not alive(template),
            timeout=2,
            interval=0.02,
            what="the task, what it started and the template gone within 2 s of the worker",
        )
        assert [p.name[:7] for p in (tmp_path / "tmp").iterdir()] == ["cb-run-"]
    finally:
        for pid in [worker.pid, *pids_in(tmp_path / "pids")]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait(timeout=30)


def test_execute__task_dies_when_the_worker_and_its_template_are_killed_together(test_jobs, tmp_path):
    """Nobody is left to kill the task's group: the task's own parent-death signal does it."""
    run = launch("t_hang", tmp_path / "pids")
    Job.objects.filter(key="t_hang").update(timeout_seconds=300)
    script = (
        "import django; django.setup()\n"
        "from tests.integration.orchestrator_jobs_for_tests import JOBS\n"
        "from orchestrator.jobs.registry import register\n"
        "from orchestrator.models import Run\n"
        "from orchestrator.services import OrchestratorService\n"
        "register(JOBS['t_hang'])\n"
        f"OrchestratorService.execute(Run.objects.get(pk={run.pk}))\n"
    )
    (tmp_path / "tmp").mkdir()
    worker = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=settings.BASE_DIR,
        env=process_env(TMPDIR=str(tmp_path / "tmp")),
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(pids_in(tmp_path / "pids")) == 2, timeout=60, what="the hanging task started")
        child, grandchild = pids_in(tmp_path / "pids")
        (template,) = children_of(worker.pid)

        os.kill(worker.pid, signal.SIGSTOP)  # so that it cannot kill the group when its template goes
        os.kill(template, signal.SIGKILL)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)

        wait_for(
            lambda: not alive(child) and not alive(grandchild),
            timeout=2,
            interval=0.02,
            what="the task and what it started gone within 2 s",
        )
    finally:
        for pid in [worker.pid, *pids_in(tmp_path / "pids")]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait(timeout=30)
