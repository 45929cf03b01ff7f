"""Run-after dependencies with real processes (issue 33.3): a real `run_scheduler` and a real Celery
worker; a chain A -> B -> C and a fan-in A1 + A2 -> F (`all`), each started by a run-now of the first
upstream through the API. Every run's tasks append their run id to a file (tests/worker_jobs.py,
`context_recorder`), so executions are counted from what ran, not only from the database."""

from __future__ import annotations

import json

import pytest

from orchestrator.jobs.registry import sync_jobs
from orchestrator.models import Job
from schedules.models import ScheduledRun, UpstreamEnd
from tests import worker_jobs
from tests.scheduler_support import Processes
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

JOB = worker_jobs.CONTEXT_RECORDER.key
QUEUE = f"jobs.{JOB}"


@pytest.fixture
def procs(tmp_path, redis_client):
    sync_jobs(Job)
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _create(api, name: str, out, **fields) -> int:
    body = {"name": name, "job_key": JOB, "params": {"out": str(out)}, "overlap_policy": "allow", **fields}
    if "run_after" not in fields:
        body.update(schedule_type="interval", interval_minutes=60 * 24)
    else:
        body["schedule_type"] = "none"
    response = api.post("/api/schedules/", body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _runs(schedule_id: int) -> list[ScheduledRun]:
    return list(ScheduledRun.objects.filter(schedule_id=schedule_id).order_by("pk"))


def _done(schedule_id: int, n: int) -> list[ScheduledRun] | None:
    rows = _runs(schedule_id)
    return rows if len(rows) >= n and all(r.status == "succeeded" for r in rows) else None


def _executions(path) -> dict[int, int]:
    """Task executions per run id (three tasks per run)."""
    counts: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            run_id = json.loads(line)["run_id"]
            counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def test_a_chain_and_a_fan_in_run_each_downstream_once(api, procs, tmp_path):
    """What this proves: a run-now of A runs A, then B (trigger dependency, linked to A's run), then C
    (linked to B's), each exactly once and each executed once by the worker; with `all`, F waits for
    both A1 and A2 and then runs once, linked to the run that completed the set."""
    out = tmp_path / "executions.jsonl"
    a = _create(api, "chain-a", out)
    b = _create(api, "chain-b", out, run_after=["chain-a"])
    c = _create(api, "chain-c", out, run_after=[b])
    a1 = _create(api, "fan-a1", out)
    a2 = _create(api, "fan-a2", out)
    f = _create(api, "fan-f", out, run_after=["fan-a1", "fan-a2"], run_after_mode="all")

    procs.start("--interval", "30")  # a long interval: the end of a run must wake it (NOTIFY)
    with running_worker([QUEUE], tmp_path=tmp_path, include="tests.worker_jobs"):
        assert api.post(f"/api/schedules/{a}/run-now").status_code == 202
        (c_run,) = wait_for(lambda: _done(c, 1), timeout=120, what="C ran after B after A")
        (a_run,) = _runs(a)
        (b_run,) = _runs(b)
        assert (b_run.trigger, b_run.upstream_run_id) == ("dependency", a_run.pk)
        assert (c_run.trigger, c_run.upstream_run_id) == ("dependency", b_run.pk)

        assert api.post(f"/api/schedules/{a1}/run-now").status_code == 202
        wait_for(lambda: _done(a1, 1), timeout=60, what="A1 ran")
        wait_for(lambda: not UpstreamEnd.objects.exists(), timeout=60, what="A1's end consumed")
        assert _runs(f) == []  # `all`: A2 has no run that date yet
        assert api.post(f"/api/schedules/{a2}/run-now").status_code == 202
        (f_run,) = wait_for(lambda: _done(f, 1), timeout=120, what="F ran after A1 and A2")
        (a2_run,) = _runs(a2)
        assert f_run.upstream_run_id == a2_run.pk
        assert f_run.dependency_date is not None

    history = api.get(f"/api/schedules/{c}/history").json()["results"]
    assert [(h["trigger"], h["upstream_run"]) for h in history] == [("dependency", b_run.pk)]
    for sid in (a, b, c, a1, a2, f):
        assert len(_runs(sid)) == 1, sid
    executed = _executions(out)
    runs = [r.run_id for sid in (a, b, c, a1, a2, f) for r in _runs(sid)]
    assert {run_id: executed.get(run_id) for run_id in runs} == dict.fromkeys(runs, 3)
    assert len(executed) == 6
