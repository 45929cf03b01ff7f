import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from orchestrator.models import Job
from schedules.models import Schedule, ScheduledRun

pytestmark = pytest.mark.django_db


def test_jobs_are_synced_from_the_registry_at_migrate():
    assert set(Job.objects.values_list("key", flat=True)) >= {"log_triage", "sleep"}
    assert Job.objects.get(key="log_triage").queue == "jobs.log_triage"


def _schedule(**kw):
    base = {
        "name": "s",
        "job": Job.objects.get(key="sleep"),
        "schedule_type": "interval",
        "interval_minutes": 5,
    }
    base.update(kw)
    return Schedule(**base)


@pytest.mark.parametrize(
    "fields",
    [
        {"schedule_type": "interval", "interval_minutes": None},
        {"schedule_type": "interval", "interval_minutes": 5, "cron_expr": "* * * * *"},
        {"schedule_type": "cron", "interval_minutes": None, "cron_expr": ""},
        {"schedule_type": "cron", "interval_minutes": 5, "cron_expr": "* * * * *"},
        {"max_global": 0},
        {"max_per_job": 0},
    ],
)
def test_schedule_constraints__refuse_inconsistent_rows(fields):
    with pytest.raises(IntegrityError), transaction.atomic():
        _schedule(**fields).save()


def test_scheduledrun_unique_slot__only_for_scheduled_trigger():
    schedule = _schedule()
    schedule.save()
    slot = timezone.now().replace(microsecond=0)
    ScheduledRun.objects.create(schedule=schedule, trigger="manual", scheduled_for=slot)
    ScheduledRun.objects.create(schedule=schedule, trigger="manual", scheduled_for=slot)
    ScheduledRun.objects.create(schedule=schedule, trigger="schedule", scheduled_for=slot)
    with pytest.raises(IntegrityError), transaction.atomic():
        ScheduledRun.objects.create(schedule=schedule, trigger="schedule", scheduled_for=slot)
