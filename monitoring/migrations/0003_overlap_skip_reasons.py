"""The skip reasons of the overlap policies of issue 32 in `cb_slots_skipped_total`: a slot refused by a
full `buffer_all` counts as `overlap_buffer` (as a full `buffer_one`), one superseded by a later slot under
`cancel_other` / `terminate_other` as `overlap_replaced`. Replaces monitoring_slot_facts (0002) only;
slots counted before keep their reason (`other`)."""

from django.db import migrations

# As in 0002 (the lag buckets are not changed here).
LAG_BUCKETS = "ARRAY[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]::float8[]"


def _slot_facts(extra_reasons: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION monitoring_slot_facts(r schedules_scheduledrun,
    OUT status text, OUT reason text, OUT dispatch_le float8, OUT start_le float8,
    OUT dispatch_seconds float8, OUT start_seconds float8)
LANGUAGE sql IMMUTABLE AS $$
    SELECT r.status,
           CASE WHEN r.status <> 'skipped' THEN ''
                WHEN r.error_summary LIKE 'missed%' THEN 'missed'
                WHEN r.error_summary LIKE '%(overlap_policy skip)' THEN 'overlap_skip'
                WHEN r.error_summary LIKE '%(overlap_policy buffer_one)' THEN 'overlap_buffer'{extra_reasons}
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
"""


NEW_REASONS = """
                WHEN r.error_summary LIKE '%(overlap_policy buffer_all)' THEN 'overlap_buffer'
                WHEN r.error_summary LIKE 'superseded by a later slot%' THEN 'overlap_replaced'"""


class Migration(migrations.Migration):
    dependencies = [("monitoring", "0002_history_totals")]

    operations = [migrations.RunSQL(_slot_facts(NEW_REASONS), _slot_facts(""))]
