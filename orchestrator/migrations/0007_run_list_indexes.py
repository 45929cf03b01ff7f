"""Indexes in the run list's order (newest first) and for its rare triggers (issue 31.5).

Built CONCURRENTLY: on a production history (millions of runs) a plain CREATE INDEX would block every
run's insert and update for as long as the build takes.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("orchestrator", "0006_run_waiting_since"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="run",
            index=models.Index(fields=["-created_at", "-id"], name="run_list_idx"),
        ),
        AddIndexConcurrently(
            model_name="run",
            index=models.Index(
                condition=models.Q(("trigger__in", ["manual", "backfill"])),
                fields=["trigger", "-created_at", "-id"],
                name="run_trigger_list_idx",
            ),
        ),
    ]
