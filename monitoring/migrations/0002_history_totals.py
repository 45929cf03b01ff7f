"""History totals (monitoring/models.py): triggers count each run and scheduled run once, when it
reaches a final status, so /metrics' history counters survive retention and a scrape reads no history.

- a row-level trigger per table for an UPDATE into a final status (WHEN filters in C: a heartbeat or a
  start calls nothing);
- a statement-level trigger per table for INSERTs, reading the statement's inserted rows at once: a
  dispatch batch's skipped slots, or a bulk load, add one row per key, not one per inserted row;
- the rows already final when this migrates are counted once, here.

The bucket bounds are monitoring.metrics' DURATION_BUCKETS and LAG_BUCKETS as of this migration; a
change of those needs a migration that replaces the *_facts functions (rows counted before keep their
bounds: a bound that is gone still counts under every larger bound).

The UPDATE triggers name `status` (UPDATE OF, WHEN), so PostgreSQL refuses to change that column's type
("cannot alter type of a column used in a trigger definition"): a migration that must, drops the
trigger first and creates it again after.
"""

from django.db import migrations, models

DURATION_BUCKETS = "ARRAY[1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200]::float8[]"
LAG_BUCKETS = "ARRAY[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]::float8[]"
RUN_FINAL = "('succeeded', 'failed', 'cancelled')"
SLOT_FINAL = "('succeeded', 'failed', 'skipped', 'cancelled')"

FUNCTIONS = f"""
-- The smallest bound a value fits under (Prometheus' le), Infinity above the last, NULL for NULL.
CREATE FUNCTION monitoring_bucket(value float8, bounds float8[]) RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN value IS NOT NULL
                THEN coalesce((SELECT min(b) FROM unnest(bounds) AS b WHERE b >= value), 'Infinity') END
$$;

-- What a finished run adds to monitoring_runtotal.
CREATE FUNCTION monitoring_run_facts(r orchestrator_run,
    OUT job text, OUT run_trigger text, OUT status text, OUT le float8, OUT seconds float8)
LANGUAGE sql STABLE AS $$
    SELECT (SELECT j.key FROM orchestrator_job j WHERE j.id = r.job_id), r.trigger, r.status,
           monitoring_bucket(d, {DURATION_BUCKETS}), coalesce(d, 0)
      FROM (SELECT extract(epoch FROM r.finished_at - r.started_at)::float8 AS d) AS t
$$;

-- What a settled scheduled run adds to monitoring_slottotal: the skip reason (the text
-- schedules/dispatch.py records), the dispatch lag (scheduled slots handed over: slot to hand-over)
-- and the start lag (hand-over, or the last wake-up of a run that waited, to start).
CREATE FUNCTION monitoring_slot_facts(r schedules_scheduledrun,
    OUT status text, OUT reason text, OUT dispatch_le float8, OUT start_le float8,
    OUT dispatch_seconds float8, OUT start_seconds float8)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.status,
           CASE WHEN r.status <> 'skipped' THEN ''
                WHEN r.error_summary LIKE 'missed%' THEN 'missed'
                WHEN r.error_summary LIKE '%(overlap_policy skip)' THEN 'overlap_skip'
                WHEN r.error_summary LIKE '%(overlap_policy buffer_one)' THEN 'overlap_buffer'
                WHEN r.error_summary = 'job disabled' THEN 'job_disabled'
                ELSE 'other' END,
           monitoring_bucket(dispatch, {LAG_BUCKETS}), monitoring_bucket(start, {LAG_BUCKETS}),
           coalesce(dispatch, 0), coalesce(start, 0)
      FROM (SELECT CASE WHEN r.trigger = 'schedule' AND r.run_id IS NOT NULL AND r.published_at IS NOT NULL
                        THEN greatest(0, extract(epoch FROM r.published_at - r.scheduled_for))::float8
                   END AS dispatch,
                   CASE WHEN r.started_at IS NOT NULL AND r.published_at IS NOT NULL
                        THEN greatest(0, extract(epoch FROM r.started_at - r.published_at))::float8
                   END AS start) AS t
$$;

CREATE FUNCTION monitoring_count_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_runtotal (job, trigger, status, le, runs, seconds)
    SELECT f.job, f.run_trigger, f.status, f.le, 1, f.seconds FROM monitoring_run_facts(NEW) AS f;
    RETURN NULL;
END $$;

CREATE FUNCTION monitoring_count_inserted_runs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_runtotal (job, trigger, status, le, runs, seconds)
    SELECT f.job, f.run_trigger, f.status, f.le, count(*), sum(f.seconds)
      FROM inserted AS i CROSS JOIN LATERAL monitoring_run_facts(i::orchestrator_run) AS f
     WHERE i.status IN {RUN_FINAL}
     GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END $$;

CREATE FUNCTION monitoring_count_slot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_slottotal
           (status, reason, dispatch_le, start_le, slots, dispatch_seconds, start_seconds)
    SELECT f.status, f.reason, f.dispatch_le, f.start_le, 1, f.dispatch_seconds, f.start_seconds
      FROM monitoring_slot_facts(NEW) AS f;
    RETURN NULL;
END $$;

CREATE FUNCTION monitoring_count_inserted_slots() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO monitoring_slottotal
           (status, reason, dispatch_le, start_le, slots, dispatch_seconds, start_seconds)
    SELECT f.status, f.reason, f.dispatch_le, f.start_le, count(*), sum(f.dispatch_seconds),
           sum(f.start_seconds)
      FROM inserted AS i CROSS JOIN LATERAL monitoring_slot_facts(i::schedules_scheduledrun) AS f
     WHERE i.status IN {SLOT_FINAL}
     GROUP BY 1, 2, 3, 4;
    RETURN NULL;
END $$;

CREATE TRIGGER monitoring_run_finished AFTER UPDATE OF status ON orchestrator_run FOR EACH ROW
    WHEN (OLD.status NOT IN {RUN_FINAL} AND NEW.status IN {RUN_FINAL})
    EXECUTE FUNCTION monitoring_count_run();
CREATE TRIGGER monitoring_runs_inserted AFTER INSERT ON orchestrator_run
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT
    EXECUTE FUNCTION monitoring_count_inserted_runs();
CREATE TRIGGER monitoring_slot_settled AFTER UPDATE OF status ON schedules_scheduledrun FOR EACH ROW
    WHEN (OLD.status NOT IN {SLOT_FINAL} AND NEW.status IN {SLOT_FINAL})
    EXECUTE FUNCTION monitoring_count_slot();
CREATE TRIGGER monitoring_slots_inserted AFTER INSERT ON schedules_scheduledrun
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT
    EXECUTE FUNCTION monitoring_count_inserted_slots();

-- What is final already, counted once.
INSERT INTO monitoring_runtotal (job, trigger, status, le, runs, seconds)
SELECT f.job, f.run_trigger, f.status, f.le, count(*), sum(f.seconds)
  FROM orchestrator_run AS r CROSS JOIN LATERAL monitoring_run_facts(r) AS f
 WHERE r.status IN {RUN_FINAL}
 GROUP BY 1, 2, 3, 4;
INSERT INTO monitoring_slottotal (status, reason, dispatch_le, start_le, slots, dispatch_seconds, start_seconds)
SELECT f.status, f.reason, f.dispatch_le, f.start_le, count(*), sum(f.dispatch_seconds), sum(f.start_seconds)
  FROM schedules_scheduledrun AS r CROSS JOIN LATERAL monitoring_slot_facts(r) AS f
 WHERE r.status IN {SLOT_FINAL}
 GROUP BY 1, 2, 3, 4;
"""

DROP = """
DROP TRIGGER monitoring_run_finished ON orchestrator_run;
DROP TRIGGER monitoring_runs_inserted ON orchestrator_run;
DROP TRIGGER monitoring_slot_settled ON schedules_scheduledrun;
DROP TRIGGER monitoring_slots_inserted ON schedules_scheduledrun;
DROP FUNCTION monitoring_count_run(), monitoring_count_inserted_runs(), monitoring_count_slot(),
    monitoring_count_inserted_slots(), monitoring_run_facts(orchestrator_run),
    monitoring_slot_facts(schedules_scheduledrun), monitoring_bucket(float8, float8[]);
"""


class Migration(migrations.Migration):
    dependencies = [
        ("monitoring", "0001_viewers_group"),
        ("orchestrator", "0006_run_waiting_since"),
        ("schedules", "0004_created_at_database_clock"),
    ]

    operations = [
        migrations.CreateModel(
            name="RunTotal",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("job", models.CharField(max_length=64)),
                ("trigger", models.CharField(max_length=16)),
                ("status", models.CharField(max_length=16)),
                ("le", models.FloatField(null=True)),
                ("runs", models.BigIntegerField()),
                ("seconds", models.FloatField()),
            ],
        ),
        migrations.CreateModel(
            name="SlotTotal",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("status", models.CharField(max_length=16)),
                ("reason", models.CharField(max_length=16)),
                ("dispatch_le", models.FloatField(null=True)),
                ("start_le", models.FloatField(null=True)),
                ("slots", models.BigIntegerField()),
                ("dispatch_seconds", models.FloatField()),
                ("start_seconds", models.FloatField()),
            ],
        ),
        migrations.RunSQL(FUNCTIONS, DROP),
    ]
