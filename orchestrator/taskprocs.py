"""What is executing, as the operating system sees it: the task process groups of runs, read from /proc.

Every task of a run executes in a process group of its own, led by a process labelled `python -m
orchestrator.taskrunner --run-id N --job KEY --task NAME` (see orchestrator/services.py): its argv when
exec'd, or its title when forked from a task template (orchestrator/template.py), which /proc shows as
one string with spaces (job keys are slugs; task names have no spaces either). Whatever the task starts
stays in that group, so the group is the run's footprint on the host, whatever the database says. Tests,
the soak and operators count live runs here rather than trusting the rows the code under test writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

RUNNER_MODULE = "orchestrator.taskrunner"
PROC = Path("/proc")


@dataclass
class TaskGroup:
    """One run's task process group on this host: its leader and every live member."""

    run_id: int
    job_key: str
    task: str
    pgid: int
    pids: list[int] = field(default_factory=list)


def runner_argv(*, run_id: int, job_key: str, task: str) -> list[str]:
    """The arguments after `python`, also a forked task's title: they only label the process."""
    return ["-m", RUNNER_MODULE, "--run-id", str(run_id), "--job", job_key, "--task", task]


def _read_stat(pid: str) -> tuple[str, int] | None:
    """(state, pgid) of a process, or None if it is gone."""
    try:
        raw = (PROC / pid / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return rest[0], int(rest[2])


def _read_cmdline(pid: str) -> list[str]:
    """The words of a process's command line, whether argv (NUL-separated) or a title (one string)."""
    try:
        raw = (PROC / pid / "cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").replace("\0", " ").split()


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
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        stat = _read_stat(entry)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        pid, pgid = int(entry), stat[1]
        members.setdefault(pgid, []).append(pid)
        if pgid not in leaders:
            labels = _labels(_read_cmdline(entry))
            if labels is not None:
                try:
                    run_id = int(labels["--run-id"])
                except ValueError:
                    continue
                leaders[pgid] = TaskGroup(
                    run_id=run_id, job_key=labels.get("--job", ""), task=labels.get("--task", ""), pgid=pgid
                )
    for pgid, group in leaders.items():
        group.pids = sorted(members.get(pgid, []))
    return leaders


def live_runs() -> dict[int, TaskGroup]:
    """Runs with a task executing on this host right now, by run id (one group per run at a time)."""
    return {group.run_id: group for group in live_task_groups().values()}


def processes_of_run(run_id: int) -> list[int]:
    """Every live pid of the run's task groups on this host, grandchildren included.

    A grandchild whose group leader already died is found too: it keeps the group's id, and processes
    that carry the runner's labels are matched by run id as well.
    """
    pids: set[int] = set()
    groups: set[int] = set()
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        labels = _labels(_read_cmdline(entry))
        if labels is not None and labels.get("--run-id") == str(run_id):
            stat = _read_stat(entry)
            if stat is not None and stat[0] not in ("Z", "X"):
                pids.add(int(entry))
                groups.add(stat[1])
    if groups:
        for entry in os.listdir(PROC):
            if entry.isdigit():
                stat = _read_stat(entry)
                if stat is not None and stat[0] not in ("Z", "X") and stat[1] in groups:
                    pids.add(int(entry))
    return sorted(pids)
