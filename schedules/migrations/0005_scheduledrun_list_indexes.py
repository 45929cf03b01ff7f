"""Indexes in the history list's order (newest first) and for its rare triggers (issue 31.5).

Built CONCURRENTLY: on a production history (millions of scheduled runs) a plain CREATE INDEX would block
the scheduler's inserts for as long as the build takes.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("schedules", "0004_created_at_database_clock"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="scheduledrun",
            index=models.Index(fields=["-scheduled_for", "-id"], name="scheduledrun_list_idx"),
        ),
        AddIndexConcurrently(
            model_name="scheduledrun",
            index=models.Index(
                condition=models.Q(("trigger__in", ["manual", "backfill"])),
                fields=["trigger", "-scheduled_for", "-id"],
                name="scheduledrun_trigger_list_idx",
            ),
        ),
    ]
