"""The outbox sweep tells a taken-and-lost message from one waiting in a long queue (issue 34.4).

A worker whose host is cut off as its blocking read takes a run message leaves the run `queued` and its
message in no queue. The sweep publishes such a run again `republish_after` seconds after its publish
(15 s by default), but only when the run's queue holds no message: a run still waiting in a long queue
gets no copy from that rule, however long it waits (the backstop, `republish_backlog_after`, backs off).
The broker is asked for queue depths only (a passive queue declare); rows are aged with SQL.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.models import Job, Run
from schedules.publishing import RunMessage, publish_messages, sweep_outbox
from tests.scheduler_support import sleep_job, sql

QUEUE = "jobs.sleep"


def manual_runs(job: Job, count: int, prefix: str) -> list[Run]:
    """`count` manual runs of `job`, published to its queue."""
    runs = [
        Run.objects.create(job=job, trigger="manual", task_id=f"{prefix}-{i}", custom_directive_text="0.1")
        for i in range(count)
    ]
    publish_messages(
        [RunMessage.build(run_id=r.pk, task_id=r.task_id, job_key=job.key, job_queue=job.queue) for r in runs]
    )
    return runs


def age(runs: list[Run], seconds: int) -> None:
    """Created and last published `seconds` ago (database clock)."""
    sql(
        "UPDATE orchestrator_run SET created_at = now() - make_interval(secs => %s),"
        " published_at = now() - make_interval(secs => %s) WHERE id = ANY(%s)",
        [seconds, seconds, [r.pk for r in runs]],
    )


def queued_ids(redis_client, queue: str = QUEUE) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in redis_client.lrange(queue, 0, -1)]


def sweep(**kwargs):
    return sweep_outbox(grace=10, republish_after=15, republish_backlog_after=300, **kwargs)


@pytest.mark.django_db(transaction=True)
def test_sweep__a_taken_message_whose_run_never_started_is_published_again_after_republish_after(
    redis_client,
):
    (run,) = manual_runs(sleep_job(), 1, "taken")
    # A worker's blocking read took it, and its host vanished: the message is in no queue.
    assert redis_client.rpop(QUEUE) is not None

    age([run], 10)
    assert sweep().published == 0  # not yet republish_after

    age([run], 20)
    result = sweep()
    assert (result.published, result.republished) == (1, 1)
    assert queued_ids(redis_client) == ["taken-0"]  # the same task id, for the start gate

    # The copy is in the queue now: however old the publish, no second copy while it waits there.
    age([run], 200)
    assert sweep().published == 0
    assert queued_ids(redis_client) == ["taken-0"]


@pytest.mark.django_db(transaction=True)
def test_sweep__a_backlog_waiting_in_its_queue_gets_no_copy_before_the_backstop_and_one_each_then(
    redis_client,
):
    """A long queue behind busy workers: its runs are not lost, so the quick rule copies none of them,
    however often the sweep runs; the backstop gives each one copy, then backs off."""
    runs = manual_runs(sleep_job(), 40, "backlog")
    age(runs, 120)
    for _ in range(5):
        assert sweep().published == 0
    assert redis_client.llen(QUEUE) == 40

    age(runs, 301)  # the backstop: published 300 s ago, whatever the queue holds
    assert sweep().published == 40
    for _ in range(3):
        assert sweep().published == 0
    assert redis_client.llen(QUEUE) == 80  # one extra message per run, not one per sweep


@pytest.mark.django_db(transaction=True)
def test_sweep__a_long_backlog_does_not_hide_a_taken_message_of_another_queue(redis_client):
    """The queues are asked before the candidates are read: a backlog that fills the sweep's LIMIT in
    one queue must not keep a lost run of another queue from being found."""
    other, _ = Job.objects.get_or_create(key="sleep-other", defaults={"name": "o", "queue": "jobs.other"})
    backlog = manual_runs(sleep_job(), 30, "backlog")
    (lost,) = manual_runs(other, 1, "lost")
    assert redis_client.rpop("jobs.other") is not None
    age([*backlog, lost], 60)

    result = sweep(limit=10)

    assert result.published == 1
    assert queued_ids(redis_client, "jobs.other") == ["lost-0"]
    assert redis_client.llen(QUEUE) == 30


@pytest.mark.django_db(transaction=True)
def test_sweep__a_scheduled_run_taken_and_lost_is_published_again(redis_client):
    from schedules.dispatch import message_for
    from schedules.models import ScheduledRun
    from tests.scheduler_support import db_now, make_schedule

    s = make_schedule("taken-scheduled")
    run = Run.objects.create(job=s.job, trigger="schedule", task_id="t-sched", custom_directive_text="0.1")
    sr = ScheduledRun.objects.create(schedule=s, run=run, scheduled_for=db_now(), task_id="t-sched")
    publish_messages([message_for(s.job, run, sr)])
    sql(
        "UPDATE schedules_scheduledrun SET created_at = now() - interval '20 seconds',"
        " published_at = now() - interval '20 seconds' WHERE id = %s",
        [sr.pk],
    )
    assert sweep().published == 0  # still in its queue: waiting, not lost

    assert redis_client.rpop(QUEUE) is not None
    assert sweep().republished == 1
    assert queued_ids(redis_client) == ["t-sched"]
