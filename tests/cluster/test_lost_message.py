"""A run message taken by a worker whose host is then cut off runs elsewhere within about 30 s, once
(issue 34.4; docs/RELIABILITY.md, guarantee 4).

Worker A on host n2 is cut from PostgreSQL, so it cannot start a run; a run's message is published and
A's blocking read takes it (the queue is empty: nobody else consumes), then A's host is cut off
entirely (iptables DROP on its interface). The message is in no queue, and the Redis broker would hand
it back only after its visibility timeout (4 h). Worker B on n3 and a scheduler on n1 start: the
scheduler's outbox sweep, with its default `--republish-after`, sees the run still `queued` and its queue
empty, and publishes it again; B runs it. The partition then heals and A comes back with the delivery it
held: the start gate drops it. Executions are counted from /proc (the run's task process groups, put on
their host by network namespace) across both workers, until A has run a later run itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.cluster.test_partitioned_session import _cluster_module, _requirements, _wait
from tests.scheduler_support import PYTHON

pytestmark = [pytest.mark.slow]

QUEUE = "jobs.sleep"

PUBLISH_RUN = """
from orchestrator.models import Job, Run
from schedules.publishing import RunMessage, publish_messages
job = Job.objects.get(key="sleep")
run = Run.objects.create(job=job, trigger="manual", task_id="%s", custom_directive_text="2")
publish_messages([RunMessage.build(run_id=run.pk, task_id=run.task_id, job_key=job.key, job_queue=job.queue)])
print(run.pk)
"""


@pytest.fixture
def cluster():
    """scripts/cluster.py's db host (PostgreSQL, Redis, migrated) and its empty node hosts."""
    if _requirements() is not None:
        pytest.skip(_requirements())
    import shutil
    import tempfile

    cluster_script = _cluster_module()
    workdir = Path(tempfile.mkdtemp(prefix="cbc-lost-message-"))
    workdir.chmod(0o755)
    hosts = cluster_script.Cluster(cluster_script.Config(concurrency=1), workdir, log=print)
    sampler = None
    try:
        hosts.net.build()
        hosts.start_db_host()
        sampler = cluster_script.NodeProcSampler(hosts)
        sampler.start()
        hosts.sampler = sampler
        yield hosts
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        hosts.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


def consuming(cluster, host: str) -> bool:
    """The host's worker is blocked in its read of the queue (Redis's own client list)."""
    address = cluster.net.addr[host]
    try:
        clients = cluster.redis.client().client_list()
    except Exception:
        return False
    return any(c["addr"].startswith(f"{address}:") and c.get("cmd") == "brpop" for c in clients)


def publish_run(cluster, task_id: str) -> int:
    return int(cluster.manage("n1", "shell", "-c", PUBLISH_RUN % task_id).split()[-1])


def run_row(cluster, run_id: int) -> tuple:
    return cluster.sql(
        "SELECT status, attempt, worker, extract(epoch FROM started_at - created_at) FROM orchestrator_run"
        " WHERE id = %s",
        [run_id],
    )[0]


def executions(cluster, run_id: int) -> dict[int, str]:
    """The run's task process groups seen in /proc, by process group, with their host."""
    return {g[3]: g[4] for _, _, groups in cluster.sampler.samples for g in groups if g[0] == run_id}


def test_message_taken_by_a_worker_cut_off_before_the_start__runs_on_another_within_30s_once(cluster):
    cluster.start_node("n2", scheduler=False)  # worker A
    _wait(lambda: consuming(cluster, "n2"), 120, "worker A on n2 to read its queue")

    cluster.net.partition("n2", "cut_db")  # A cannot start a run any more
    run_id = publish_run(cluster, "lost-on-n2")
    redis = cluster.redis.client()
    _wait(lambda: redis.llen(QUEUE) == 0, 30, "A's blocking read to take the message")
    cluster.net.partition("n2", "isolate")  # and now its host is gone
    cut_at = time.monotonic()

    cluster.start_node("n3", scheduler=False)  # worker B
    cluster.add(
        "scheduler-n1",
        "n1",
        [PYTHON, "manage.py", "run_scheduler", "--interval=5", "--claimant=lost-message-n1"],
    )  # --republish-after and the rest at their defaults
    _wait(lambda: run_row(cluster, run_id)[0] == "succeeded", 90, "the run to succeed on B")
    _, attempt, worker, waited = run_row(cluster, run_id)
    assert worker.startswith("n3@"), f"run by {worker}, not by B on n3"
    assert attempt == 1
    # From its creation (and publish) to its start on B: the default --republish-after (15 s), the sweep
    # period and B's start-up (already running by then on a loaded machine: generous slack).
    assert waited < 30 + 30, f"the lost message ran again only {waited:.0f} s after its publish"
    print(
        f"lost message: started on B {waited:.1f} s after its publish"
        f" ({time.monotonic() - cut_at:.1f} s after the cut)"
    )

    cluster.net.heal("n2")
    # B stops; A, back, must run a new run itself: by then it has dealt with the delivery it held.
    cluster.procs["worker-n3"].kill()
    later = publish_run(cluster, "after-heal")
    _wait(lambda: run_row(cluster, later)[0] == "succeeded", 120, "A to run a run after the heal")
    assert run_row(cluster, later)[2].startswith("n2@")
    time.sleep(1)  # one more /proc sample after A's run

    assert run_row(cluster, run_id)[:2] == ("succeeded", 1)
    seen = executions(cluster, run_id)
    assert list(seen.values()) == ["n3"], f"the lost run executed as {seen} (process group: host)"
