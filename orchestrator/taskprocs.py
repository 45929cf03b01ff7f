"""What is executing, as the operating system sees it: the task process groups of runs (psutil, /proc).

Every task of a run executes in a process group of its own, led by a process titled `python -m
orchestrator.taskrunner --run-id N --job KEY --task NAME` (orchestrator/services.py, taskrunner.py),
which /proc shows as one string with spaces (job keys are slugs; task names have no spaces either).
Whatever the task starts stays in that group, so the group is the run's footprint on the host, whatever
the database says. Tests, the soak and operators count live runs here rather than trusting the rows the
code under test writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

RUNNER_MODULE = "orchestrator.taskrunner"


@dataclass
class TaskGroup:
    """One run's task process group on this host: its leader and every live member."""

    run_id: int
    job_key: str
    task: str
    pgid: int
    pids: list[int] = field(default_factory=list)


def runner_argv(*, run_id: int, job_key: str, task: str) -> list[str]:
    """The arguments after `python` in a task process's title: they only label the process."""
    return ["-m", RUNNER_MODULE, "--run-id", str(run_id), "--job", job_key, "--task", task]


def _live_processes() -> list[tuple[int, int, list[str]]]:
    """(pid, pgid, words of its command line) of every live, non-zombie process.

    The words are the same whether the command line is an argv or a title (one string with spaces)."""
    found = []
    for proc in psutil.process_iter(["status", "cmdline"]):
        if proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            pgid = os.getpgid(proc.pid)
        except OSError:  # gone meanwhile
            continue
        found.append((proc.pid, pgid, " ".join(proc.info["cmdline"] or ()).split()))
    return found


def _labels(argv: list[str]) -> dict[str, str] | None:
    if RUNNER_MODULE not in argv:
        return None
    labels: dict[str, str] = {}
    for flag in ("--run-id", "--job", "--task"):
        if flag in argv and argv.index(flag) + 1 < len(argv):
            labels[flag] = argv[argv.index(flag) + 1]
    return labels if "--run-id" in labels else None


def live_task_groups() -> dict[int, TaskGroup]:
    """Task process groups with at least one live (non-zombie) labelled member, by pgid."""
    leaders: dict[int, TaskGroup] = {}
    members: dict[int, list[int]] = {}
    for pid, pgid, argv in _live_processes():
        members.setdefault(pgid, []).append(pid)
        labels = _labels(argv) if pgid not in leaders else None
        if labels is not None and labels["--run-id"].isdigit():
            leaders[pgid] = TaskGroup(
                run_id=int(labels["--run-id"]),
                job_key=labels.get("--job", ""),
                task=labels.get("--task", ""),
                pgid=pgid,
            )
    for pgid, group in leaders.items():
        group.pids = sorted(members[pgid])
    return leaders


def live_runs() -> dict[int, TaskGroup]:
    """Runs with a task executing on this host right now, by run id (one group per run at a time)."""
    return {group.run_id: group for group in live_task_groups().values()}


def processes_of_run(run_id: int) -> list[int]:
    """Every live pid of the run's task groups on this host, grandchildren included.

    A grandchild whose group leader already died is found too: it keeps the group's id, and processes
    that carry the runner's labels are matched by run id as well.
    """
    processes = _live_processes()
    groups = {pgid for _, pgid, argv in processes if (_labels(argv) or {}).get("--run-id") == str(run_id)}
    return sorted(pid for pid, pgid, _ in processes if pgid in groups)
