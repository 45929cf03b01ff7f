"""Slot counts (monitoring/models.py SlotCount): the calendar view's past, counted when each scheduled run
settles, so a month of 10,000,000 runs is read from a few thousand rows instead of the history.

As the history totals of 0002: a row-level trigger for an UPDATE into a final status (a WHEN in C: a
heartbeat or a start calls nothing), a statement-level trigger for INSERTs of rows already final (a
dispatch batch's skipped slots, a bulk load), each appending rows that `compact_totals` folds; and what is
final already, counted once, here. A slot is counted under its schedule's job and labels as they are when
it settles; deleting the row later (retention, a deleted schedule) does not uncount it.

The quarter hour is `scheduled_for` rounded down to 15 minutes of UTC: every zone's hour and day begins
on one, so a quarter lies in one cell of any viewer's calendar.
"""

from django.db import migrations, models

SLOT_FINAL = "('succeeded', 'failed', 'skipped', 'cancelled')"
QUARTER = "to_timestamp(floor(extract(epoch FROM {at}) / 900) * 900)"

FUNCTIONS = f"""
CREATE FUNCTION monitoring_count_settled_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_slotcount (quarter, job_id, labels, status, slots)
    SELECT {QUARTER.format(at="NEW.scheduled_for")}, s.job_id, s.labels, NEW.status, 1
      FROM schedules_schedule s WHERE s.id = NEW.schedule_id;
    RETURN NULL;
END $$;

CREATE FUNCTION monitoring_count_inserted_settled_slots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_slotcount (quarter, job_id, labels, status, slots)
    SELECT {QUARTER.format(at="i.scheduled_for")}, s.job_id, s.labels, i.status, count(*)
      FROM inserted AS i JOIN schedules_schedule s ON s.id = i.schedule_id
     WHERE i.status IN {SLOT_FINAL}
     GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END $$;

CREATE TRIGGER monitoring_slot_counted AFTER UPDATE OF status ON schedules_scheduledrun FOR EACH ROW
    WHEN (OLD.status NOT IN {SLOT_FINAL} AND NEW.status IN {SLOT_FINAL})
    EXECUTE FUNCTION monitoring_count_settled_slot();
CREATE TRIGGER monitoring_slots_counted AFTER INSERT ON schedules_scheduledrun
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT
    EXECUTE FUNCTION monitoring_count_inserted_settled_slots();

INSERT INTO monitoring_slotcount (quarter, job_id, labels, status, slots)
SELECT {QUARTER.format(at="r.scheduled_for")}, s.job_id, s.labels, r.status, count(*)
  FROM schedules_scheduledrun AS r JOIN schedules_schedule s ON s.id = r.schedule_id
 WHERE r.status IN {SLOT_FINAL}
 GROUP BY 1, 2, 3, 4;
"""

DROP = """
DROP TRIGGER monitoring_slot_counted ON schedules_scheduledrun;
DROP TRIGGER monitoring_slots_counted ON schedules_scheduledrun;
DROP FUNCTION monitoring_count_settled_slot(), monitoring_count_inserted_settled_slots();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0003_overlap_skip_reasons"),
        ("schedules", "0012_run_after"),
    ]

    operations = [
        migrations.CreateModel(
            name="SlotCount",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("quarter", models.DateTimeField()),
                ("job_id", models.BigIntegerField()),
                ("labels", models.JSONField(default=dict)),
                ("status", models.CharField(max_length=16)),
                ("slots", models.BigIntegerField()),
            ],
            options={"indexes": [models.Index(fields=["quarter"], name="slotcount_quarter_idx")]},
        ),
        migrations.RunSQL(FUNCTIONS, DROP),
    ]
