"""/metrics' history counters (issue 31.4): monotonic totals that retention's pruning never lowers, equal
to the runs and slots that finished; and per-schedule series bounded by METRICS_PER_SCHEDULE.

Runs finish through the real status transitions (schedules.runstate) and slots are inserted by the
dispatcher's own statement (schedules.dispatch.insert_slots), so the triggers see what production does.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from monitoring import metrics
from monitoring.models import RunTotal, SlotTotal
from orchestrator.models import Run
from schedules import retention, runstate
from schedules.dispatch import insert_slots
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import db_now, make_schedule, sleep_job, sql

pytestmark = pytest.mark.django_db

# Which samples are history counters (they must never go down); gauges may.
HISTORY = (
    "cb_runs_total",
    "cb_run_duration_seconds_bucket",
    "cb_run_duration_seconds_count",
    "cb_run_duration_seconds_sum",
    "cb_slots_skipped_total",
    "cb_dispatch_lag_seconds_bucket",
    "cb_dispatch_lag_seconds_count",
    "cb_dispatch_lag_seconds_sum",
    "cb_start_lag_seconds_bucket",
    "cb_start_lag_seconds_count",
    "cb_start_lag_seconds_sum",
)


def samples(api) -> dict[tuple, float]:
    with override_settings(METRICS_MAX_AGE_SECONDS=0):
        text = api.get("/metrics").content.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(found: dict[tuple, float], name: str, **labels) -> float:
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and all(dict(sample_labels).get(k) == v for k, v in labels.items())
    )


def finish_slot(schedule: Schedule, minutes_ago: int, status: str) -> ScheduledRun:
    """A scheduled slot taken from queued to `status` by runstate, as a worker does."""
    run = Run.objects.create(
        job=sleep_job(), trigger="schedule", task_id=str(uuid.uuid4()), custom_directive_text="0"
    )
    slot = ScheduledRun.objects.create(
        schedule=schedule,
        run=run,
        trigger="schedule",
        scheduled_for=db_now() - timedelta(minutes=minutes_ago),
        task_id=run.task_id,
    )
    sql("UPDATE schedules_scheduledrun SET published_at = now() WHERE id = %s", [slot.pk])
    attempt = runstate.run_start(run.pk, slot.pk, worker="w@h:1", lease_seq=1)
    assert attempt == 1
    assert runstate.run_finish(run.pk, slot.pk, status=status, attempt=attempt)
    return slot


def skip_slots(schedule: Schedule, minutes_ago: list[int]) -> None:
    """Missed slots recorded as skipped by the dispatcher's INSERT (one statement for all)."""
    now = db_now()
    slots = [now - timedelta(minutes=m) for m in minutes_ago]
    insert_slots(
        {
            "schedule_ids": [schedule.pk] * len(slots),
            "run_ids": [None] * len(slots),
            "slots": slots,
            "statuses": ["skipped"] * len(slots),
            "task_ids": [""] * len(slots),
            "reasons": ["missed (misfire_policy skip)"] * len(slots),
        },
        trigger="schedule",
    )


def age_everything() -> None:
    sql("UPDATE orchestrator_run SET created_at = now() - interval '40 days'")
    sql("UPDATE schedules_scheduledrun SET created_at = now() - interval '40 days'")


def test_history_counters_never_go_down_when_retention_prunes_and_count_every_finished_run(api, redis_client):
    schedule = make_schedule("pruned", history_keep=2, enabled=False)
    statuses = ["succeeded", "failed", "succeeded", "succeeded", "failed", "succeeded"]
    for i, status in enumerate(statuses):
        finish_slot(schedule, 600 - i, status)
    skip_slots(schedule, [900, 899, 898])

    before = samples(api)
    assert total(before, "cb_runs_total") == 6
    assert total(before, "cb_runs_total", status="failed", trigger="schedule", job="sleep") == 2
    assert total(before, "cb_run_duration_seconds_count", job="sleep") == 6
    assert total(before, "cb_slots_skipped_total", reason="missed") == 3
    assert total(before, "cb_dispatch_lag_seconds_count") == 6
    assert total(before, "cb_start_lag_seconds_count") == 6

    age_everything()
    pruned = retention.prune_history()
    assert pruned.scheduled_runs == 7  # all but the newest 2 of 9
    assert pruned.runs == 4
    after = samples(api)
    lower = {k: (v, after.get(k)) for k, v in before.items() if k[0] in HISTORY and after.get(k, 0) < v}
    assert lower == {}, "history counters went down after a prune"

    # More runs finish after the prune: counted on top, as they would be without it.
    # A run still queued and one running are not finished: not counted.
    Run.objects.create(job=sleep_job(), trigger="manual", task_id="q", custom_directive_text="0")
    running = Run.objects.create(job=sleep_job(), trigger="manual", task_id="r", custom_directive_text="0")
    runstate.run_start(running.pk, None, worker="w@h:1", lease_seq=1)
    finish_slot(schedule, 1, "failed")
    skip_slots(schedule, [2])
    later = samples(api)
    assert total(later, "cb_runs_total") == 7
    assert total(later, "cb_runs_total", status="failed") == 3
    assert total(later, "cb_run_duration_seconds_count") == 7
    assert total(later, "cb_slots_skipped_total", reason="missed") == 4
    assert total(later, "cb_dispatch_lag_seconds_count") == 7
    assert Run.objects.filter(status__in=["succeeded", "failed"]).count() < 7  # the history is smaller


def test_compaction_folds_the_totals_into_one_row_per_key_and_keeps_every_count(api, redis_client):
    schedule = make_schedule("compacted", enabled=False)
    for i in range(12):
        finish_slot(schedule, 100 - i, "succeeded")
    assert RunTotal.objects.count() == 12  # one row per finish until folded
    before = samples(api)  # a build compacts first
    keys = RunTotal.objects.values_list("job", "trigger", "status", "le").distinct().count()
    assert RunTotal.objects.count() == keys
    assert (
        SlotTotal.objects.count()
        == SlotTotal.objects.values_list("status", "reason", "dispatch_le", "start_le").distinct().count()
    )
    assert samples(api) == before
    assert total(before, "cb_runs_total") == 12


def test_a_duration_or_lag_on_a_bound_counts_under_that_bound(api, redis_client):
    """The triggers' bucket bounds (migration 0002) are the ones /metrics renders."""
    job = sleep_job()
    start = db_now()
    for bound in metrics.DURATION_BUCKETS:
        Run.objects.create(
            job=job,
            trigger="manual",
            status="succeeded",
            task_id=f"b{bound}",
            custom_directive_text="0",
            started_at=start,
            finished_at=start + timedelta(seconds=bound),
        )
    found = samples(api)
    for i, bound in enumerate(metrics.DURATION_BUCKETS):
        le = repr(float(bound))
        assert total(found, "cb_run_duration_seconds_bucket", job="sleep", le=le) == i + 1, le
    schedule = make_schedule("lags", enabled=False)
    for i, bound in enumerate(metrics.LAG_BUCKETS):
        run = Run.objects.create(job=job, trigger="schedule", task_id=f"l{i}", custom_directive_text="0")
        slot = ScheduledRun.objects.create(
            schedule=schedule, run=run, trigger="schedule", scheduled_for=db_now() - timedelta(hours=i + 1)
        )
        sql(
            "UPDATE schedules_scheduledrun SET published_at = scheduled_for + make_interval(secs => %s),"
            " started_at = scheduled_for + make_interval(secs => %s * 2), status = 'succeeded'"
            " WHERE id = %s",
            [bound, bound, slot.pk],
        )
    found = samples(api)
    for i, bound in enumerate(metrics.LAG_BUCKETS):
        le = repr(float(bound))
        assert total(found, "cb_dispatch_lag_seconds_bucket", le=le) == i + 1, le
        assert total(found, "cb_start_lag_seconds_bucket", le=le) == i + 1, le


def _many_schedules(count: int) -> None:
    job = sleep_job()
    now = db_now()
    Schedule.objects.bulk_create(
        [
            Schedule(
                name=f"many-{i:05d}",
                job=job,
                custom_directive_text="0.1",
                schedule_type="interval",
                interval_minutes=10,
                enabled=True,
                next_run_at=now + timedelta(seconds=i),
            )
            for i in range(count)
        ]
    )


def _per_schedule(api) -> tuple[set[str], int]:
    found = samples(api)
    next_runs = {
        dict(labels)["schedule"] for name, labels in found if name == "cb_schedule_next_run_timestamp_seconds"
    }
    last = sum(1 for name, _ in found if name == "cb_schedule_last_success_timestamp_seconds")
    return next_runs, last


def test_per_schedule_series_are_bounded_to_the_latest_schedules(api, redis_client):
    _many_schedules(3000)
    # The most overdue one, last by id: it must be among the chosen.
    make_schedule("late-one", next_run_at=db_now() - timedelta(hours=3))
    with override_settings(METRICS_PER_SCHEDULE="top:100"):
        names, _ = _per_schedule(api)
    assert len(names) == 100
    assert "late-one" in names
    assert names - {"late-one"} == {f"many-{i:05d}" for i in range(99)}
    with override_settings(METRICS_PER_SCHEDULE="none"):
        assert _per_schedule(api) == (set(), 0)
    with override_settings(METRICS_PER_SCHEDULE="all"):
        assert len(_per_schedule(api)[0]) == 3001
    # The default is bounded too.
    assert len(_per_schedule(api)[0]) == 1000


def test_per_schedule_last_success_follows_the_chosen_schedules(api, redis_client):
    schedule = make_schedule("succeeded-one", next_run_at=db_now() + timedelta(hours=1))
    slot = finish_slot(schedule, 5, "succeeded")
    with override_settings(METRICS_PER_SCHEDULE="top:1"):
        found = samples(api)
    last = total(found, "cb_schedule_last_success_timestamp_seconds", schedule="succeeded-one")
    slot.refresh_from_db()
    assert abs(last - slot.finished_at.timestamp()) < 0.01


@pytest.mark.parametrize("value", ["top", "top:-1", "top:x", "some", ""])
def test_a_bad_metrics_per_schedule_is_refused_naming_the_setting(value):
    with pytest.raises(ImproperlyConfigured, match="METRICS_PER_SCHEDULE"):
        metrics.per_schedule_limit(value)


def test_overlap_skips_and_cancelled_runs_are_counted_by_reason_and_status(api, redis_client):
    """Issue 32's overlap policies: a full buffer_all counts as overlap_buffer, a slot superseded under
    cancel_other as overlap_replaced (migration 0003); a cancelled run under status cancelled."""
    from schedules import cancelling
    from schedules.slots import OVERLAP_BUFFER_ALL_REASON, OVERLAP_SUPERSEDED_REASON

    schedule = make_schedule("overlap-metrics", enabled=False)
    now = db_now()
    reasons = [OVERLAP_BUFFER_ALL_REASON, OVERLAP_SUPERSEDED_REASON.format(policy="cancel_other")]
    insert_slots(
        {
            "schedule_ids": [schedule.pk] * 2,
            "run_ids": [None] * 2,
            "slots": [now - timedelta(minutes=m) for m in (5, 4)],
            "statuses": ["skipped"] * 2,
            "task_ids": [""] * 2,
            "reasons": reasons,
        },
        trigger="schedule",
    )
    run = Run.objects.create(job=sleep_job(), trigger="manual", task_id="c", custom_directive_text="0")
    assert runstate.run_start(run.pk, None, worker="w@h:1", lease_seq=1) == 1
    cancelling.cancel_runs([run.pk], by="ops", grace=0)
    assert runstate.run_finish(run.pk, None, status="failed", attempt=1)

    found = samples(api)
    assert total(found, "cb_slots_skipped_total", reason="overlap_buffer") == 1
    assert total(found, "cb_slots_skipped_total", reason="overlap_replaced") == 1
    assert total(found, "cb_runs_total", status="cancelled", trigger="manual") == 1
