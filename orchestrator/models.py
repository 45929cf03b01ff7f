"""Jobs (kinds of work), directives (reusable instructions) and runs (one execution each)."""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class Trigger(models.TextChoices):
    MANUAL = "manual", "manual"
    SCHEDULE = "schedule", "schedule"
    # A past slot created on request (POST /api/schedules/{id}/backfill); unique per slot like SCHEDULE.
    BACKFILL = "backfill", "backfill"
    # Started because an upstream schedule's run ended (Schedule.run_after; schedules/dependencies.py).
    DEPENDENCY = "dependency", "dependency"


class Task3Scope(models.TextChoices):
    ALLOWLIST = "allowlist", "allowlist"
    ALL = "all", "all"


# A job's run messages go to `jobs.<key>` unless `Job.queue` names another queue (docs/ARCHITECTURE.md, "Data
# model"); the one
# definition of that name (publishing, routing and the job sync all use it).
QUEUE_PREFIX = "jobs."


def default_queue(job_key: str) -> str:
    return f"{QUEUE_PREFIX}{job_key}"


class Job(models.Model):
    """A kind of work. Rows are synced from the code registry at migrate time; settings are editable."""

    key = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True, default="")
    enabled = models.BooleanField(default=True)
    queue = models.CharField(max_length=200, blank=True, default="")
    max_concurrency = models.PositiveIntegerField(null=True, blank=True)
    timeout_seconds = models.PositiveIntegerField(default=600)
    task3_allowlist = models.JSONField(default=list, blank=True)
    # What a run's params may hold (JSON Schema), the job code's declaration (registry.JobSpec), copied
    # here by the job sync: not editable, because the code reads the params.
    params_schema = models.JSONField(
        default=dict, blank=True, db_default=models.Value({}, models.JSONField())
    )

    class Meta:
        ordering = ["key"]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_concurrency__isnull=True) | Q(max_concurrency__gte=1),
                name="job_max_concurrency_positive",
            ),
            models.CheckConstraint(condition=Q(timeout_seconds__gte=1), name="job_timeout_positive"),
        ]

    def __str__(self) -> str:
        return self.key

    def save(self, *args, **kwargs) -> None:
        if not self.queue:
            self.queue = default_queue(self.key)
        super().save(*args, **kwargs)


class Directive(models.Model):
    """Reusable instructions for a job (the LLM step's system prompt, for log_triage)."""

    key = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    text = models.TextField()
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="directives")

    class Meta:
        ordering = ["key"]

    def __str__(self) -> str:
        return self.key


class RunStatus(models.TextChoices):
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


RUN_TERMINAL = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


class Run(models.Model):
    """One execution of a job, however launched. Stores counters only, never LLM text."""

    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="runs")
    directive = models.ForeignKey(
        Directive, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs"
    )
    custom_directive_text = models.TextField(blank=True, default="")
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.MANUAL)
    task3_scope = models.CharField(max_length=16, choices=Task3Scope.choices, default=Task3Scope.ALLOWLIST)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    # The database's clock, not the launching host's: it orders waiters for a cap (worker/semaphore.py)
    # and times the outbox sweep's grace, both against now() (docs/OPERATIONS.md, "The clock").
    created_at = models.DateTimeField(db_default=Now())
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error_summary = models.CharField(max_length=500, blank=True, default="")
    stats = models.JSONField(default=dict, blank=True)
    llm_calls = models.PositiveIntegerField(default=0)
    llm_prompt_tokens = models.PositiveIntegerField(default=0)
    llm_completion_tokens = models.PositiveIntegerField(default=0)
    # Where the job wrote its report (log_triage: UPLOADS_DIR/reports/<run id>.md), empty if none.
    report_path = models.CharField(max_length=1024, blank=True, default="")
    # Execution bookkeeping (the worker's): the Celery task id of the run message, who runs it, the
    # last heartbeat, and the attempt that fences writes so a stale worker never overwrites a newer one.
    task_id = models.CharField(max_length=255, blank=True, default="")
    worker = models.CharField(max_length=255, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempt = models.PositiveIntegerField(default=0)
    # The concurrency semaphore's grant number for this run's start (worker/semaphore.py): the highest
    # among running runs shows whether Redis came back behind the database and must be rebuilt.
    lease_seq = models.BigIntegerField(null=True, blank=True)
    published_at = models.DateTimeField(null=True, blank=True)
    # Set when the run found a concurrency cap full and waits for a slot (its status stays `queued`, the
    # reason is in error_summary; its ScheduledRun is `throttled`); cleared when it starts.
    waiting_since = models.DateTimeField(null=True, blank=True)
    # The run's inputs, fixed at launch and handed to its tasks in TaskContext (docs/SCHEDULES.md, "Run
    # inputs"): its params (the schedule's, a run-now's override merged over them, or a launch's), the
    # slot it is for and the schedule's previous slot that launched a run (null without a schedule).
    # Stored and shown in history: never a secret.
    params = models.JSONField(default=dict, blank=True, db_default=models.Value({}, models.JSONField()))
    scheduled_for = models.DateTimeField(null=True, blank=True)
    previous_scheduled_for = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(directive__isnull=True) | Q(custom_directive_text=""),
                name="run_directive_xor_custom_text",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "heartbeat_at"], name="run_status_heartbeat_idx"),
            # The run lists (API and admin), newest first, without sorting millions of rows; filtered by
            # trigger, the rare ones (the common `schedule` walks run_list_idx).
            models.Index(fields=["-created_at", "-id"], name="run_list_idx"),
            models.Index(
                fields=["trigger", "-created_at", "-id"],
                name="run_trigger_list_idx",
                condition=Q(trigger__in=["manual", "backfill"]),
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.job_id}, {self.status})"

    @property
    def directive_text(self) -> str:
        """The instructions this run executes with: the directive's text or the custom text."""
        if self.directive_id is not None:
            return self.directive.text
        return self.custom_directive_text


class Severity(models.TextChoices):
    INFO = "info", "info"
    LOW = "low", "low"
    MEDIUM = "medium", "medium"
    HIGH = "high", "high"
    CRITICAL = "critical", "critical"


# Severity order for thresholds: a finding is "at or above" a level when its rank is >= the level's.
SEVERITY_RANK = {level: rank for rank, level in enumerate(Severity.values)}


class Finding(models.Model):
    """One security signal a run's triage found: what rule, about whom, how often, when, where."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="findings")
    rule = models.CharField(max_length=64)
    severity = models.CharField(max_length=16, choices=Severity.choices)
    subject = models.CharField(max_length=512)
    count = models.PositiveIntegerField()
    first_seen = models.DateTimeField(null=True, blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    source_file = models.CharField(max_length=1024)
    risk_score = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        # Triage inserts findings most severe first, so id order is the analyst's reading order.
        ordering = ["run_id", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(risk_score__isnull=True) | Q(risk_score__lte=10), name="finding_risk_score_0_10"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.rule} {self.subject} x{self.count}"


class LogCursor(models.Model):
    """How far log triage has read one file, so each line is triaged once across runs.

    `head_hash` fingerprints the file's first `head_len` bytes (decompressed for .gz): it tells a file
    rewritten in place from one that grew, and finds the cursor of a file renamed or compressed by rotation.
    """

    path = models.TextField()
    inode = models.BigIntegerField()
    offset = models.BigIntegerField(default=0)
    size = models.BigIntegerField(default=0)
    head_hash = models.CharField(max_length=64, blank=True, default="")
    head_len = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["path"]
        constraints = [models.UniqueConstraint(fields=["path"], name="logcursor_unique_path")]
        indexes = [models.Index(fields=["head_hash"], name="logcursor_head_hash_idx")]

    def __str__(self) -> str:
        return f"{self.path}@{self.offset}"
