"""Schedules (when a job runs) and scheduled runs (one per slot, or per run-now)."""

from __future__ import annotations

from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import Q
from django.db.models.functions import Greatest, Now

from orchestrator.models import Directive, Job, Run, Task3Scope, Trigger
from schedules import calendars


class ScheduleType(models.TextChoices):
    INTERVAL = "interval", "interval"
    CRON = "cron", "cron"
    # No timing of its own: it runs only after its upstreams (run_after); next_run_at stays null.
    NONE = "none", "none"


class RunAfterMode(models.TextChoices):
    # A downstream run for each qualifying upstream run.
    ANY = "any", "any"
    # One downstream run per date (in the downstream's zone) once every upstream has a qualifying run
    # scheduled for that date.
    ALL = "all", "all"


# The upstream run statuses run_after_statuses may name: the ends of a run that was launched.
RUN_AFTER_STATUSES = ("succeeded", "failed", "cancelled")


def default_run_after_statuses() -> list[str]:
    return ["succeeded"]


class MisfirePolicy(models.TextChoices):
    RUN_ONCE = "run_once", "run_once"
    SKIP = "skip", "skip"
    RUN_ALL = "run_all", "run_all"


class OverlapPolicy(models.TextChoices):
    BUFFER_ONE = "buffer_one", "buffer_one"
    SKIP = "skip", "skip"
    ALLOW = "allow", "allow"
    # Every overlapping slot waits, and they run one at a time in slot order (at most 100 waiting).
    BUFFER_ALL = "buffer_all", "buffer_all"
    # The new slot cancels the unfinished run (SIGTERM, then SIGKILL after the grace), then starts.
    CANCEL_OTHER = "cancel_other", "cancel_other"
    # The new slot kills the unfinished run at once (SIGKILL), then starts.
    TERMINATE_OTHER = "terminate_other", "terminate_other"


class CalendarPolicy(models.TextChoices):
    # A slot the calendars rule out is not run and is recorded `skipped`, naming the calendar.
    SKIP = "skip", "skip"
    # It runs at the same local time on the next allowed day instead.
    NEXT_ALLOWED = "next_allowed", "next_allowed"


class Calendar(models.Model):
    """A named set of days and windows (schedules/calendars.py), shared by schedules: as
    `exclude_calendars` it rules their slots out, as `only_calendars` it is where they may run."""

    name = models.CharField(max_length=200, unique=True)
    timezone = models.CharField(max_length=64, default="UTC")
    # [{"date": ...}, {"start": ..., "end": ...}, {"yearly": ...}, {"nth_weekday": {...}}, {"weekdays":
    # [...]}, {"cron": ...}]: validated by schedules.calendar_service.
    rules = models.JSONField(default=list, blank=True)
    # {"country" | "market", "subdiv"?, "years"}: the days of the `holidays` package, or null.
    holidays = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def spec(self) -> calendars.CalendarSpec:
        return calendars.spec_from(self.name, self.timezone, self.rules or [], self.holidays)


class Schedule(models.Model):
    name = models.CharField(max_length=200, unique=True)
    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="schedules")
    directive = models.ForeignKey(
        Directive, null=True, blank=True, on_delete=models.PROTECT, related_name="schedules"
    )
    custom_directive_text = models.TextField(blank=True, default="")
    enabled = models.BooleanField(default=True)
    schedule_type = models.CharField(max_length=16, choices=ScheduleType.choices)
    interval_minutes = models.PositiveIntegerField(null=True, blank=True)
    cron_expr = models.CharField(max_length=200, blank=True, default="")
    timezone = models.CharField(max_length=64, default="UTC")
    task3_scope = models.CharField(max_length=16, choices=Task3Scope.choices, default=Task3Scope.ALLOWLIST)
    max_global = models.PositiveIntegerField(null=True, blank=True)
    max_per_job = models.PositiveIntegerField(null=True, blank=True)
    misfire_policy = models.CharField(
        max_length=16, choices=MisfirePolicy.choices, default=MisfirePolicy.RUN_ONCE
    )
    overlap_policy = models.CharField(
        max_length=16, choices=OverlapPolicy.choices, default=OverlapPolicy.BUFFER_ONE
    )
    # High-water mark: the slot last dispatched. No slot at or before it is ever created again.
    last_run_at = models.DateTimeField(null=True, blank=True)
    next_run_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=255, blank=True, default="")
    claimed_until = models.DateTimeField(null=True, blank=True)
    # Timing beyond the incumbents (docs/SCHEDULES.md: jitter, bounds, limited runs, catch-up window).
    # Each slot's dispatch is delayed by a deterministic offset in [0, jitter_seconds) from (id, slot).
    jitter_seconds = models.PositiveIntegerField(default=0, db_default=0)
    # No slot before start_at or after end_at (aware datetimes; both optional).
    start_at = models.DateTimeField(null=True, blank=True)
    end_at = models.DateTimeField(null=True, blank=True)
    # After this many scheduled runs (manual runs do not count) the schedule disables itself.
    max_runs = models.PositiveIntegerField(null=True, blank=True)
    # Scheduled (and backfilled) runs created so far: a counter, so retention pruning never revives
    # a completed schedule. runs_remaining = max_runs - scheduled_run_count.
    scheduled_run_count = models.PositiveIntegerField(default=0, db_default=0)
    # How late a slot may still run after downtime before misfire_policy treats it as missed
    # (null: the default grace, interval + 30 s).
    catchup_window_seconds = models.PositiveIntegerField(null=True, blank=True)
    # Why and by whom it was paused (POST /disable {"note": ...}); cleared by enable.
    paused_note = models.CharField(max_length=500, blank=True, default="", db_default="")
    paused_at = models.DateTimeField(null=True, blank=True)
    paused_by = models.CharField(max_length=150, blank=True, default="", db_default="")
    # Declared in a schedules file (manage.py sync_schedules): the API and admin refuse to edit the
    # declared fields.
    managed = models.BooleanField(default=False, db_default=False)
    # Retention: keep at least the last N runs, whatever HISTORY_KEEP_DAYS says.
    history_keep = models.PositiveIntegerField(default=100, db_default=100)
    # Alerts: after this many consecutive failures (0 = off); when a run has been running longer than
    # alert_after_seconds (null = off); a per-schedule webhook instead of ALERT_WEBHOOK_URLS.
    alert_after_failures = models.PositiveIntegerField(default=1, db_default=1)
    alert_after_seconds = models.PositiveIntegerField(null=True, blank=True)
    alert_webhook_url = models.URLField(max_length=500, blank=True, default="", db_default="")
    # After this many consecutive failed slots the schedule disables itself (null = never), evaluated
    # with the alerts (monitoring/alerts.py). Only slots created at or after failures_counted_since
    # count: enabling sets it, so a schedule enabled again starts a fresh count.
    pause_after_failures = models.PositiveIntegerField(null=True, blank=True)
    failures_counted_since = models.DateTimeField(null=True, blank=True)
    # Inputs for each run (a JSON object, checked against the job's params_schema on save); a run-now
    # may override keys. Stored and shown in history: never a secret.
    params = models.JSONField(default=dict, blank=True, db_default=models.Value({}, models.JSONField()))
    # key=value pairs as in Kubernetes (schedules/labels.py): what ?label= and a bulk selector match.
    labels = models.JSONField(default=dict, blank=True, db_default=models.Value({}, models.JSONField()))
    # Calendars (docs/SCHEDULES.md, "Calendars"): slots on their days are ruled out, or (only) kept.
    exclude_calendars = models.ManyToManyField(Calendar, blank=True, related_name="excluding_schedules")
    only_calendars = models.ManyToManyField(Calendar, blank=True, related_name="only_schedules")
    calendar_policy = models.CharField(
        max_length=16, choices=CalendarPolicy.choices, default=CalendarPolicy.SKIP, db_default="skip"
    )
    # Overrides the job's retry policy (schedules/retries.py); null: the job's.
    retry_policy = models.JSONField(null=True, blank=True)
    # Run after other schedules (schedules/dependencies.py): when a run of an upstream ends in one of
    # run_after_statuses, this schedule gets a run with trigger `dependency`.
    run_after = models.ManyToManyField(
        "self",
        through="ScheduleDependency",
        through_fields=("downstream", "upstream"),
        symmetrical=False,
        related_name="run_before",
        blank=True,
    )
    run_after_statuses = models.JSONField(
        default=default_run_after_statuses,
        blank=True,
        db_default=models.Value(["succeeded"], models.JSONField()),
    )
    run_after_mode = models.CharField(
        max_length=8, choices=RunAfterMode.choices, default=RunAfterMode.ANY, db_default=RunAfterMode.ANY
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(
                        schedule_type="interval",
                        interval_minutes__isnull=False,
                        interval_minutes__gte=1,
                        cron_expr="",
                    )
                    | (Q(schedule_type="cron", interval_minutes__isnull=True) & ~Q(cron_expr=""))
                    | Q(schedule_type="none", interval_minutes__isnull=True, cron_expr="")
                ),
                name="schedule_interval_xor_cron",
            ),
            models.CheckConstraint(
                condition=Q(directive__isnull=True) | Q(custom_directive_text=""),
                name="schedule_directive_xor_custom_text",
            ),
            models.CheckConstraint(
                condition=Q(max_global__isnull=True) | Q(max_global__gte=1),
                name="schedule_max_global_positive",
            ),
            models.CheckConstraint(
                condition=Q(max_per_job__isnull=True) | Q(max_per_job__gte=1),
                name="schedule_max_per_job_positive",
            ),
            models.CheckConstraint(
                condition=Q(pause_after_failures__isnull=True) | Q(pause_after_failures__gte=1),
                name="schedule_pause_after_failures_positive",
            ),
        ]
        indexes = [
            # The due query: a row is claimable when both next_run_at and its claim (if any) have
            # passed. GREATEST ignores NULLs, so rows held by a live claim sort past now() and drop
            # out of the range scan instead of being stepped over on every tick.
            models.Index(
                Greatest("next_run_at", "claimed_until"),
                name="schedule_due_idx",
                condition=Q(enabled=True),
            ),
            # Label selectors (`labels @> '{"team": "payments"}'`, `labels ? 'team'`): one index scan
            # over any number of schedules.
            GinIndex(fields=["labels"], name="schedule_labels_idx"),
        ]

    def __str__(self) -> str:
        return self.name


class ScheduleDependency(models.Model):
    """One edge of run_after: `downstream` runs after `upstream`. Deleting the downstream deletes it; the
    upstream's delete is refused while it exists (services.delete_schedules), unless the downstream goes
    in the same delete (then the cascade takes it)."""

    downstream = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="upstream_links")
    upstream = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="downstream_links")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["downstream", "upstream"], name="scheduledependency_unique"),
            models.CheckConstraint(
                condition=~Q(downstream=models.F("upstream")), name="scheduledependency_not_self"
            ),
        ]
        # The end trigger's probe (does this schedule have downstreams?) and the fire sweep's join.
        indexes = [models.Index(fields=["upstream"], name="schedule_dep_upstream_idx")]

    def __str__(self) -> str:
        return f"{self.downstream_id} after {self.upstream_id}"


class UpstreamEnd(models.Model):
    """A run of a schedule with downstreams ended: written by a database trigger in the transaction that
    ends the run (migration 0009), consumed by the scheduler's dependency sweep in the transaction
    that creates the downstream runs. Plain ids, no foreign keys: it is a queue, not history."""

    scheduled_run_id = models.BigIntegerField()
    schedule_id = models.BigIntegerField()
    status = models.CharField(max_length=16)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.schedule_id} run {self.scheduled_run_id} {self.status}"


class ScheduledRunStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    THROTTLED = "throttled", "throttled"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    SKIPPED = "skipped", "skipped"
    # Cancelled (POST /api/runs/{id}/cancel, an overlap policy, its schedule deleted): a waiting run
    # never starts; a running one was stopped (Run.cancelled_by says who).
    CANCELLED = "cancelled", "cancelled"


SCHEDULED_RUN_TERMINAL = frozenset(
    {
        ScheduledRunStatus.SUCCEEDED,
        ScheduledRunStatus.FAILED,
        ScheduledRunStatus.SKIPPED,
        ScheduledRunStatus.CANCELLED,
    }
)
SCHEDULED_RUN_UNFINISHED = frozenset(
    {ScheduledRunStatus.QUEUED, ScheduledRunStatus.THROTTLED, ScheduledRunStatus.RUNNING}
)


class ScheduledRun(models.Model):
    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="scheduled_runs")
    # Null for a skipped slot: nothing was launched for it.
    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.SET_NULL, related_name="scheduled_runs"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.SCHEDULE)
    scheduled_for = models.DateTimeField()
    status = models.CharField(
        max_length=16, choices=ScheduledRunStatus.choices, default=ScheduledRunStatus.QUEUED
    )
    task_id = models.CharField(max_length=255, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The database's clock (the outbox sweep compares it with now()), whoever inserts the row.
    created_at = models.DateTimeField(db_default=Now())
    # When the run message was last handed to the broker (the outbox sweep's clock).
    published_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_summary = models.CharField(max_length=500, blank=True, default="")
    # trigger `dependency`: the upstream scheduled run whose end started this one (for run_after_mode
    # `all`: the one that completed the set) and, for `all`, the date (downstream's zone) it is for.
    # The database nulls it when the upstream row goes (scheduledrun_upstream_run_fk, ON DELETE SET NULL,
    # migration 0009): Django's SET_NULL would load a deleted schedule's whole history to do it.
    upstream_run = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        related_name="downstream_runs",
    )
    dependency_date = models.DateField(null=True, blank=True)

    class Meta:
        ordering = ["-scheduled_for", "-id"]
        constraints = [
            # Exactly once per upstream run (run_after_mode any) and per date (all): the dependency
            # sweep inserts with ON CONFLICT DO NOTHING, so a re-run of it changes nothing.
            models.UniqueConstraint(
                fields=["schedule", "upstream_run"],
                condition=Q(trigger="dependency", dependency_date__isnull=True),
                name="scheduledrun_unique_upstream_run",
            ),
            models.UniqueConstraint(
                fields=["schedule", "dependency_date"],
                condition=Q(trigger="dependency"),
                name="scheduledrun_unique_dependency_date",
            ),
            models.UniqueConstraint(
                fields=["schedule", "scheduled_for"],
                condition=Q(trigger__in=["schedule", "backfill"]),
                name="scheduledrun_unique_slot",
            ),
        ]
        indexes = [
            models.Index(fields=["schedule", "-scheduled_for"], name="scheduledrun_history_idx"),
            # The admin's list of every schedule's runs, newest first, and its rare triggers.
            models.Index(fields=["-scheduled_for", "-id"], name="scheduledrun_list_idx"),
            models.Index(
                fields=["trigger", "-scheduled_for", "-id"],
                name="scheduledrun_trigger_list_idx",
                condition=Q(trigger__in=["manual", "backfill"]),
            ),
            models.Index(
                fields=["published_at"],
                name="scheduledrun_outbox_idx",
                condition=Q(status="queued"),
            ),
            models.Index(fields=["status"], name="scheduledrun_status_idx"),
            # The overlap check: a schedule's unfinished runs, without walking its whole history.
            models.Index(
                fields=["schedule"],
                name="scheduledrun_unfinished_idx",
                condition=Q(status__in=["queued", "throttled", "running"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.schedule_id}@{self.scheduled_for.isoformat()} ({self.status})"


class ChangeSource(models.TextChoices):
    API = "api", "api"
    ADMIN = "admin", "admin"
    SYNC = "sync", "sync"
    # The scheduler itself (a pause after failures).
    SYSTEM = "system", "system"


class ScheduleChange(models.Model):
    """One write to a schedule: who, when, how, and each changed field's old and new value.

    `schedule` is kept as a plain id (not a foreign key) so the record of a delete outlives the schedule.
    """

    schedule_id = models.BigIntegerField(db_index=True)
    schedule_name = models.CharField(max_length=200)
    # create | update | enable | disable | delete | sync
    action = models.CharField(max_length=16)
    source = models.CharField(max_length=16, choices=ChangeSource.choices)
    actor = models.CharField(max_length=150, blank=True, default="")
    at = models.DateTimeField(db_default=Now())
    # {"field": {"old": ..., "new": ...}, ...}
    changes = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["schedule_id", "-at"], name="schedulechange_history_idx")]

    def __str__(self) -> str:
        return f"{self.schedule_name} {self.action} by {self.actor or '?'} ({self.source})"


class AlertKind(models.TextChoices):
    # A slot did not start within its grace (dead-man).
    MISSED = "missed", "missed"
    # alert_after_failures consecutive failures.
    FAILING = "failing", "failing"
    # A run has been running longer than alert_after_seconds.
    OVERDUE = "overdue", "overdue"


class Alert(models.Model):
    """An alert opens once per condition and resolves when the condition clears."""

    schedule = models.ForeignKey(Schedule, on_delete=models.CASCADE, related_name="alerts")
    kind = models.CharField(max_length=16, choices=AlertKind.choices)
    opened_at = models.DateTimeField(db_default=Now())
    resolved_at = models.DateTimeField(null=True, blank=True)
    # Counts, ids and times only: never LLM text or a secret.
    details = models.JSONField(default=dict, blank=True)
    # Notification bookkeeping (which transitions were delivered), so several schedulers never send twice.
    notified_open_at = models.DateTimeField(null=True, blank=True)
    notified_resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-opened_at", "-id"]
        constraints = [
            # At most one open alert per (schedule, kind): an alert opens once.
            models.UniqueConstraint(
                fields=["schedule", "kind"],
                condition=Q(resolved_at__isnull=True),
                name="alert_one_open_per_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.schedule_id} {self.kind} ({'open' if self.resolved_at is None else 'resolved'})"
