"""pause_after_failures (issue 32.4): the threshold, the count's start (set by enable), and the `system`
source of the change the automatic pause records.

Two nullable columns without a default (no table rewrite); the check constraint scans the table once.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("schedules", "0005_scheduledrun_list_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="schedule",
            name="pause_after_failures",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="schedule",
            name="failures_counted_since",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AlterField(
            model_name="schedulechange",
            name="source",
            field=models.CharField(
                choices=[("api", "api"), ("admin", "admin"), ("sync", "sync"), ("system", "system")],
                max_length=16,
            ),
        ),
        migrations.AddConstraint(
            model_name="schedule",
            constraint=models.CheckConstraint(
                condition=models.Q(pause_after_failures__isnull=True) | models.Q(pause_after_failures__gte=1),
                name="schedule_pause_after_failures_positive",
            ),
        ),
    ]
