"""Cancelling runs against PostgreSQL and Redis (issue 32, items 2 and 3): the API's answers, the
writes, the fencing of every finish, the reaper's path for an unreachable worker, the admin and the
dashboard, and the overlap policies' dispatch. With real workers: tests/acceptance/test_run_cancel.py
and tests/acceptance/test_overlap_policies.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from orchestrator.models import Run
from schedules import cancelling, runleases, runstate
from schedules.dispatch import dispatch_claimed, run_now
from schedules.models import ScheduledRun
from schedules.slots import MAX_BUFFERED_SLOTS, OVERLAP_BUFFER_ALL_REASON
from tests.scheduler_support import db_now, make_schedule, sql

pytestmark = pytest.mark.django_db(transaction=True)


def _running(schedule, worker: str = "w@h:1") -> ScheduledRun:
    scheduled = run_now(schedule)
    assert runstate.run_start(scheduled.run_id, scheduled.pk, worker=worker, lease_seq=1) == 1
    return scheduled


def _cancel(api, run_id: int, body: dict | None = None):
    return api.post(f"/api/runs/{run_id}/cancel", body or {}, format="json")


def test_api__a_waiting_run_is_cancelled_at_once_and_never_starts(api, redis_client):
    schedule = make_schedule("api-waiting", enabled=False)
    queued, throttled = run_now(schedule), run_now(schedule)
    runstate.run_mark_throttled(throttled.run_id, throttled.pk, "waiting: per-job cap 1/1 for sleep")

    for scheduled in (queued, throttled):
        response = _cancel(api, scheduled.run_id)
        assert response.status_code == 200, response.content
        assert response.json()["status"] == "cancelled"
        assert response.json()["cancelled_by"] == "alice"
        scheduled.refresh_from_db()
        assert (scheduled.status, scheduled.error_summary) == ("cancelled", "cancelled by alice")
        assert runstate.run_start(scheduled.run_id, scheduled.pk, worker="w@h:1", lease_seq=1) is None
    assert Run.objects.filter(status="cancelled", attempt=0, started_at=None).count() == 2


def test_api__a_running_run_is_asked_to_stop_and_told_through_redis(api, redis_client):
    schedule = make_schedule("api-running", enabled=False)
    scheduled = _running(schedule)
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(cancelling.CANCEL_CHANNEL)
    pubsub.get_message(timeout=1)

    response = _cancel(api, scheduled.run_id, {"cancel_grace_seconds": 30})

    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["status"], body["cancelled_by"]) == ("running", "alice")
    run = Run.objects.get(pk=scheduled.run_id)
    assert 29 <= (run.cancel_deadline - run.cancel_requested_at).total_seconds() <= 30
    message = pubsub.get_message(timeout=5)
    request = cancelling.CancelRequest.decode(message["data"])
    assert (request.run_id, request.by) == (scheduled.run_id, "alice")
    assert 25 < request.grace <= 30
    assert redis_client.get(cancelling.cancel_key(scheduled.run_id)) is not None
    pubsub.close()

    # Asked again: still 202, the first author stays, and the deadline only comes closer.
    assert _cancel(api, scheduled.run_id, {"cancel_grace_seconds": 0}).status_code == 202
    again = Run.objects.get(pk=scheduled.run_id)
    assert again.cancelled_by == "alice"
    assert again.cancel_deadline <= run.cancel_deadline
    assert _cancel(api, scheduled.run_id, {"cancel_grace_seconds": 600}).status_code == 202
    assert Run.objects.get(pk=scheduled.run_id).cancel_deadline == again.cancel_deadline


def test_api__404_409_and_400_naming_the_field(api, redis_client):
    schedule = make_schedule("api-refusals", enabled=False)
    done = _running(schedule)
    assert runstate.run_finish(done.run_id, done.pk, status="succeeded", attempt=1)

    assert _cancel(api, 999_999).status_code == 404
    response = _cancel(api, done.run_id)
    assert response.status_code == 409
    assert "already succeeded" in json.dumps(response.json())
    for bad in (-1, 3601, "soon", None, True):
        response = _cancel(api, done.run_id, {"cancel_grace_seconds": bad})
        assert response.status_code == 400, (bad, response.content)
        assert "cancel_grace_seconds" in response.json()
    response = _cancel(api, done.run_id, {"grace": 1})
    assert response.status_code == 400
    assert "grace" in response.json()
    assert Run.objects.get(pk=done.run_id).status == "succeeded"


def test_finish__of_a_run_asked_to_cancel_writes_cancelled_unless_it_succeeded(redis_client):
    schedule = make_schedule("finish-fenced", enabled=False)
    failed, succeeded, by_parent = _running(schedule), _running(schedule), _running(schedule, "w@h:9")
    for scheduled in (failed, succeeded, by_parent):
        cancelling.cancel_runs([scheduled.run_id], by="erin", grace=5)

    # The pool process's finish after the kill (a crashed task: failed), and the parent's.
    assert runstate.run_finish(failed.run_id, failed.pk, status="failed", error_summary="crash", attempt=1)
    assert runstate.run_finish(by_parent.run_id, None, status="failed", error_summary="lost", worker="w@h:9")
    assert runstate.run_finish(succeeded.run_id, succeeded.pk, status="succeeded", attempt=1)

    for scheduled in (failed, by_parent):
        scheduled.refresh_from_db()
        run = Run.objects.get(pk=scheduled.run_id)
        assert (run.status, run.error_summary) == ("cancelled", "cancelled by erin")
        assert (scheduled.status, scheduled.error_summary) == ("cancelled", "cancelled by erin")
    succeeded.refresh_from_db()
    assert succeeded.status == "succeeded"


def test_heartbeat__stops_at_the_deadline_of_a_cancel_its_worker_never_heard(redis_client):
    schedule = make_schedule("missed-message", enabled=False)
    scheduled = _running(schedule)
    cancelling.cancel_runs([scheduled.run_id], by="frank", grace=60)
    assert runstate.run_heartbeat(scheduled.run_id, scheduled.pk, 1), "within its grace it runs on"
    sql(
        "UPDATE orchestrator_run SET cancel_deadline = now() - interval '1 second' WHERE id = %s",
        [scheduled.run_id],
    )
    assert not runstate.run_heartbeat(scheduled.run_id, scheduled.pk, 1), "past it, the run is stopped"


def test_reaper__ends_a_cancelled_run_whose_worker_is_unreachable_and_a_returning_worker_writes_nothing(
    settings, redis_client
):
    settings.WORKER_LEASE_SECONDS = 60
    schedule = make_schedule("unreachable", enabled=False)
    scheduled = _running(schedule)
    cancelling.cancel_runs([scheduled.run_id], by="grace", grace=10)
    sql(
        "UPDATE orchestrator_run SET heartbeat_at = now() - interval '61 seconds' WHERE id = %s",
        [scheduled.run_id],
    )
    redis_client.set(runleases.EPOCH_KEY, 0)  # Redis has kept its data for long: absence means dead

    assert runstate.reap_lost_runs() == [scheduled.run_id]

    scheduled.refresh_from_db()
    assert (scheduled.status, scheduled.error_summary) == ("cancelled", "cancelled by grace")
    assert Run.objects.get(pk=scheduled.run_id).status == "cancelled"
    # Its worker comes back: its finish and heartbeat are fenced out.
    assert not runstate.run_finish(scheduled.run_id, scheduled.pk, status="succeeded", attempt=1)
    assert not runstate.run_heartbeat(scheduled.run_id, scheduled.pk, 1)
    assert Run.objects.get(pk=scheduled.run_id).status == "cancelled"


def test_admin__cancel_action_and_button(staff, redis_client):
    schedule = make_schedule("admin-cancel", enabled=False)
    queued, running = run_now(schedule), _running(schedule)

    response = staff.post(
        "/admin/schedules/scheduledrun/",
        {"action": "cancel_runs", "_selected_action": [queued.pk]},
        follow=True,
    )
    assert response.status_code == 200
    assert Run.objects.get(pk=queued.run_id).status == "cancelled"

    page = staff.get(f"/admin/orchestrator/run/{running.run_id}/change/")
    assert b"Cancel run" in page.content
    response = staff.post(f"/admin/orchestrator/run/{running.run_id}/cancel/", follow=True)
    assert response.status_code == 200
    run = Run.objects.get(pk=running.run_id)
    assert (run.status, run.cancelled_by) == ("running", "root")
    assert run.cancel_requested_at is not None
    # Once ended, the action leaves it alone.
    assert runstate.run_finish(running.run_id, running.pk, status="failed", attempt=1)
    staff.post("/admin/orchestrator/run/", {"action": "cancel_runs", "_selected_action": [running.run_id]})
    assert Run.objects.get(pk=running.run_id).status == "cancelled"


def test_dashboard__cancel_button(staff, redis_client):
    schedule = make_schedule("dashboard-cancel", enabled=False)
    queued = run_now(schedule)
    page = staff.get(f"/dashboard/runs/{queued.run_id}/")
    assert b"Cancel run" in page.content
    response = staff.post(f"/dashboard/runs/{queued.run_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert staff.post(f"/dashboard/runs/{queued.run_id}/cancel").status_code == 409
    assert b"Cancel run" not in staff.get(f"/dashboard/runs/{queued.run_id}/").content


@pytest.mark.parametrize(("policy", "grace"), [("cancel_other", 10.0), ("terminate_other", 0.0)])
def test_dispatch__cancelling_policies_cancel_the_unfinished_runs_of_the_schedule(
    redis_client, policy, grace
):
    slot = db_now().replace(second=0, microsecond=0)
    schedule = make_schedule(f"dispatch-{policy}", next_run_at=slot, overlap_policy=policy, enabled=True)
    running, waiting = _running(schedule), run_now(schedule)
    sql(
        "UPDATE schedules_schedule SET claimed_by = 'me', claimed_until = now() + interval '60 seconds'"
        " WHERE id = %s",
        [schedule.pk],
    )

    dispatch_claimed([schedule.pk], claimant="me", grace=timedelta(seconds=60), ttl=60.0)

    new = ScheduledRun.objects.get(schedule=schedule, trigger="schedule", scheduled_for=slot)
    assert new.status == "queued"
    by = f"overlap_policy {policy} (slot {slot.isoformat()})"
    waiting.refresh_from_db()
    assert (waiting.status, waiting.error_summary) == ("cancelled", f"cancelled by {by}")
    run = Run.objects.get(pk=running.run_id)
    assert (run.status, run.cancelled_by) == ("running", by)
    assert abs((run.cancel_deadline - run.cancel_requested_at).total_seconds() - grace) < 1


def test_dispatch__buffer_all_records_a_slot_skipped_beyond_100_waiting(redis_client):
    slot = db_now().replace(second=0, microsecond=0)
    schedule = make_schedule(
        "dispatch-buffer-all", next_run_at=slot, overlap_policy="buffer_all", enabled=True
    )
    for i in range(MAX_BUFFERED_SLOTS + 1):
        ScheduledRun.objects.create(
            schedule=schedule,
            trigger="manual",
            scheduled_for=slot - timedelta(minutes=i + 1),
            status="queued",
        )
    sql(
        "UPDATE schedules_schedule SET claimed_by = 'me', claimed_until = now() + interval '60 seconds'"
        " WHERE id = %s",
        [schedule.pk],
    )

    dispatch_claimed([schedule.pk], claimant="me", grace=timedelta(seconds=60), ttl=60.0)

    new = ScheduledRun.objects.get(schedule=schedule, trigger="schedule", scheduled_for=slot)
    assert (new.status, new.error_summary, new.run_id) == ("skipped", OVERLAP_BUFFER_ALL_REASON, None)


def test_api__schedules_take_the_new_overlap_policies(api, redis_client):
    for policy in ("buffer_all", "cancel_other", "terminate_other"):
        response = api.post(
            "/api/schedules/",
            {
                "name": f"new-{policy}",
                "job_key": "sleep",
                "schedule_type": "interval",
                "interval_minutes": 10,
                "overlap_policy": policy,
            },
            format="json",
        )
        assert response.status_code == 201, response.content
        assert response.json()["overlap_policy"] == policy
    response = api.post(
        "/api/schedules/",
        {"name": "bad", "job_key": "sleep", "schedule_type": "interval", "interval_minutes": 10,
         "overlap_policy": "replace"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 400
    assert "overlap_policy" in response.json()


def test_task_fence__sigterm_then_sigkill_at_the_grace_and_a_second_stop_brings_it_closer():
    """TaskFence.kill(grace=): a task that ignores SIGTERM lives until the SIGKILL; a second kill (a
    terminate after a cancel, or the lease lost meanwhile) brings that SIGKILL forward."""
    import subprocess
    import sys
    import threading
    import time

    from orchestrator.services import TaskFence

    stubborn = "; ".join(
        [
            "import signal, time",
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
            "print(1, flush=True)",
            "time.sleep(60)",
        ]
    )
    proc = subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"1"  # SIGTERM is ignored from here on
        fence = TaskFence()
        assert fence.enter(proc.pid)
        started = time.monotonic()
        stopping = threading.Thread(target=fence.kill, args=("cancelled by test",), kwargs={"grace": 60})
        stopping.start()
        time.sleep(1.0)
        assert proc.poll() is None, "SIGTERM is ignored: alive within the grace"
        fence.kill("terminated", grace=0)
        stopping.join(timeout=10)
        assert not stopping.is_alive()
        assert proc.wait(timeout=5) == -9
        assert time.monotonic() - started < 10
        assert fence.reason == "cancelled by test"
        assert not fence.enter(12345678), "no task starts once the run is stopped"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_backfill__cancel_other_creates_the_last_slot_and_cancels_the_unfinished_runs(api, redis_client):
    schedule = make_schedule("backfill-cancel-other", next_run_at=db_now(), enabled=False)
    waiting = run_now(schedule)
    body = {
        "start": (schedule.next_run_at - timedelta(minutes=30)).isoformat(),
        "end": schedule.next_run_at.isoformat(),
        "overlap_policy": "cancel_other",
    }
    result = api.post(f"/api/schedules/{schedule.pk}/backfill", body, format="json").json()
    assert result == {"created": 1, "skipped": 0, "overlap_skipped": 2, "slots": 3}
    waiting.refresh_from_db()
    assert waiting.status == "cancelled"
    assert waiting.error_summary.startswith("cancelled by overlap_policy cancel_other (slot ")
    assert ScheduledRun.objects.filter(schedule=schedule, trigger="backfill", status="queued").count() == 1
