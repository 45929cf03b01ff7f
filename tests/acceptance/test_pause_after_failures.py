"""pause_after_failures with real processes: two schedulers and a Celery worker run a job that fails while
a file exists, under an interval schedule whose next slot the test brings forward once the last one
finished (slots are a minute apart at the least). After N failed slots the schedule is disabled with
its note, once; the `failing` alert opens and its webhook is called; no slot is dispatched while it is
paused; `enable` clears the note; the first success after it resolves the alert and the webhook hears of
the recovery."""

from __future__ import annotations

import pytest

from monitoring import metrics
from orchestrator.models import Job
from schedules.models import Alert, Schedule, ScheduleChange, ScheduledRun
from tests.integration.test_alerts import Receiver
from tests.scheduler_support import Processes, make_schedule, sql
from tests.support import process_env, wait_for
from tests.workerproc import running_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

N = 3


def slots(schedule: Schedule) -> list[ScheduledRun]:
    return list(ScheduledRun.objects.filter(schedule=schedule).order_by("scheduled_for"))


def bring_next_slot_forward(schedule: Schedule) -> None:
    sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [schedule.pk])


def run_one_slot(schedule: Schedule, status: str, procs: Processes, worker) -> None:
    """Make the next slot due and wait until it has finished with `status`."""
    before = len(slots(schedule))
    bring_next_slot_forward(schedule)
    wait_for(
        lambda: len(slots(schedule)) == before + 1 and slots(schedule)[-1].status in ("succeeded", "failed"),
        timeout=60,
        what=f"slot {before + 1} settled\n{procs.logs()}\n{worker.log()[-3000:]}",
    )
    assert slots(schedule)[-1].status == status


def test_n_failed_slots_pause_once_enable_clears_it_and_the_recovery_resolves_the_alert(
    tmp_path, redis_client, api
):
    Job.objects.get_or_create(key="flaky", defaults={"name": "flaky", "queue": "jobs.flaky"})
    fail_flag = tmp_path / "fail"
    fail_flag.write_text("fail\n")
    with Receiver(fail=0) as receiver:
        schedule = make_schedule(
            "pauses",
            job=Job.objects.get(key="flaky"),
            custom_directive_text=str(fail_flag),
            interval_minutes=1,
            next_run_at=None,
            pause_after_failures=N,
            alert_after_failures=0,  # the alert opens with the pause, not before
            alert_webhook_url=receiver.url,
        )
        env = process_env(
            ALERT_WEBHOOK_ALLOWED_HOSTS="127.0.0.1",  # the receiver is on loopback: refused otherwise
            ALERT_EVALUATE_EVERY_SECONDS="0.5",
            ALERT_RETRY_BASE_SECONDS="0.2",
        )
        procs = Processes(env, tmp_path)
        try:
            with running_worker(
                ["jobs.flaky"], tmp_path=tmp_path, include="tests.worker_jobs", concurrency=1
            ) as worker:
                procs.start("--interval", "1", "--claimant", "sched-a")
                procs.start("--interval", "1", "--claimant", "sched-b")
                for _ in range(N):
                    assert Schedule.objects.get(pk=schedule.pk).enabled, "paused before N failures"
                    run_one_slot(schedule, "failed", procs, worker)

                wait_for(
                    lambda: not Schedule.objects.get(pk=schedule.pk).enabled,
                    timeout=30,
                    what=f"the pause\n{procs.logs()}",
                )
                schedule.refresh_from_db()
                assert schedule.paused_note == f"paused after {N} consecutive failures"
                assert schedule.paused_by == "scheduler"
                alert = Alert.objects.get(schedule=schedule)
                assert (alert.kind, alert.resolved_at) == ("failing", None)
                wait_for(lambda: receiver.bodies, timeout=30, what=f"the open notification\n{procs.logs()}")
                assert "the schedule is paused after 3 consecutive failures" in receiver.bodies[0]["text"]

                # Paused: a slot made due is not dispatched, however many passes both schedulers make.
                bring_next_slot_forward(schedule)
                ticks = int(redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "ticks"))
                wait_for(
                    lambda: int(redis_client.hget(metrics.SCHEDULER_COUNTERS_KEY, "ticks")) >= ticks + 6,
                    timeout=60,
                    what="more scheduler passes",
                )
                assert len(slots(schedule)) == N
                pauses = ScheduleChange.objects.filter(schedule_id=schedule.pk, source="system")
                assert [(c.action, c.actor) for c in pauses] == [("disable", "scheduler")]

                # The cause is fixed, the schedule enabled: the note goes, the old failures do not count
                # again, and the first success resolves the alert.
                fail_flag.unlink()
                body = api.post(f"/api/schedules/{schedule.pk}/enable").json()
                assert (body["enabled"], body["paused_note"], body["paused_by"]) == (True, "", "")
                run_one_slot(schedule, "succeeded", procs, worker)
                wait_for(
                    lambda: Alert.objects.get(pk=alert.pk).resolved_at is not None,
                    timeout=30,
                    what=f"the alert resolved\n{procs.logs()}",
                )
                wait_for(
                    lambda: len(receiver.bodies) == 2,
                    timeout=30,
                    what=f"the resolve notification\n{procs.logs()}",
                )
                assert Schedule.objects.get(pk=schedule.pk).enabled
        finally:
            procs.stop_all()
    assert [(b["event"], b["alert"]["kind"], b["alert"]["id"]) for b in receiver.bodies] == [
        ("alert.open", "failing", alert.pk),
        ("alert.resolved", "failing", alert.pk),
    ]
    assert receiver.bodies[1]["text"].startswith("[RESOLVED] failing alert on schedule 'pauses'")
    assert pauses.count() == 1
    logs = procs.full_logs()
    assert logs.count("schedule paused after failures") == 1
