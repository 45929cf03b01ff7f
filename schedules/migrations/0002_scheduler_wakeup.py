"""Scheduler support: a NOTIFY trigger for fast pickup, and an index for the overlap check.

The trigger lives in the database so every path that changes when a schedule is due (the API, the
admin, raw SQL) wakes sleeping `run_scheduler` loops; it does not fire for the scheduler's own
dispatch (which releases its claim in the same UPDATE), so dispatching does not wake every instance.
The payload is empty on purpose: PostgreSQL folds identical notifications in one transaction into one.
"""

from django.db import migrations, models

CREATE = r"""
CREATE OR REPLACE FUNCTION schedules_schedule_notify_wake() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('schedules_wake', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER schedule_wake_on_insert
    AFTER INSERT ON schedules_schedule
    FOR EACH ROW WHEN (NEW.enabled AND NEW.next_run_at IS NOT NULL)
    EXECUTE FUNCTION schedules_schedule_notify_wake();

CREATE TRIGGER schedule_wake_on_update
    AFTER UPDATE OF next_run_at, enabled, claimed_until ON schedules_schedule
    FOR EACH ROW WHEN (
        NEW.enabled AND NEW.next_run_at IS NOT NULL
        -- not the scheduler's own dispatch (advances next_run_at and releases its claim at once)
        AND NOT (OLD.claimed_by <> '' AND NEW.claimed_by = '' AND OLD.next_run_at IS DISTINCT FROM NEW.next_run_at)
        -- an edit of when it is due, an enable, or a claim given back undispatched (SIGTERM)
        AND (OLD.next_run_at IS DISTINCT FROM NEW.next_run_at
             OR OLD.enabled IS DISTINCT FROM NEW.enabled
             OR (OLD.claimed_by <> '' AND NEW.claimed_by = ''))
    )
    EXECUTE FUNCTION schedules_schedule_notify_wake();
"""

DROP = r"""
DROP TRIGGER IF EXISTS schedule_wake_on_update ON schedules_schedule;
DROP TRIGGER IF EXISTS schedule_wake_on_insert ON schedules_schedule;
DROP FUNCTION IF EXISTS schedules_schedule_notify_wake();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("schedules", "0001_initial"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="scheduledrun",
            index=models.Index(
                fields=["schedule"],
                name="scheduledrun_unfinished_idx",
                condition=models.Q(status__in=["queued", "throttled", "running"]),
            ),
        ),
        migrations.RunSQL(CREATE, DROP),
    ]
