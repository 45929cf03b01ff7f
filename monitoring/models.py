"""History totals: what /metrics counts as `cb_runs_total`, `cb_slots_skipped_total` and the histograms.

Counted once, when a run or a scheduled run reaches a final status, by PostgreSQL triggers on
`orchestrator_run` and `schedules_scheduledrun` (monitoring/migrations/0002_history_totals.py), so the
counters never go down when retention deletes old history, and a scrape reads these small tables
instead of the history itself. A final status never changes again (schedules/runstate.py), so each
row counts exactly once.

Each finishing statement appends rows here (no update of a shared row: no lock contention between
workers finishing at once, nothing quadratic in a bulk insert); `monitoring.metrics.compact_totals`
folds them into one row per key. A total is always `sum()` over its key, compacted or not.
"""

from django.db import models


class RunTotal(models.Model):
    """Finished runs: `runs` of them, of `job` / `trigger` / `status`, whose duration is at most `le`
    seconds (the smallest bucket bound it fits; Infinity above the last; null when the run never
    started), `seconds` being their summed duration."""

    job = models.CharField(max_length=64)
    trigger = models.CharField(max_length=16)
    status = models.CharField(max_length=16)
    le = models.FloatField(null=True)
    runs = models.BigIntegerField()
    seconds = models.FloatField()

    def __str__(self) -> str:
        return f"{self.job} {self.trigger} {self.status} le={self.le}: {self.runs}"


class SlotTotal(models.Model):
    """Scheduled runs settled (succeeded, failed, skipped, cancelled): `slots` of them with this
    `status` and skip `reason` ('' unless skipped), and their dispatch and start lags' bucket bounds
    (null when the slot has no such lag) and sums."""

    status = models.CharField(max_length=16)
    reason = models.CharField(max_length=16)
    dispatch_le = models.FloatField(null=True)
    start_le = models.FloatField(null=True)
    slots = models.BigIntegerField()
    dispatch_seconds = models.FloatField()
    start_seconds = models.FloatField()

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.slots}"


class SlotCount(models.Model):
    """Scheduled runs settled (succeeded, failed, skipped, cancelled) per quarter hour of `scheduled_for`
    (UTC), schedule job and labels and status: the calendar view's past (monitoring/calendar_view.py).
    Appended by triggers (monitoring/migrations/0004_slot_counts.py) and folded by `compact_totals` as
    the totals above; a count is `sum(slots)` over its key."""

    quarter = models.DateTimeField()
    job_id = models.BigIntegerField()
    labels = models.JSONField(default=dict)
    status = models.CharField(max_length=16)
    slots = models.BigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["quarter"], name="slotcount_quarter_idx")]

    def __str__(self) -> str:
        return f"{self.quarter:%Y-%m-%dT%H:%M} job {self.job_id} {self.status}: {self.slots}"
