"""Jobs (kinds of work), directives (reusable instructions) and runs (one execution each)."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from orchestrator.rates import RATE_LIMIT_HELP, RATE_LIMIT_PATTERN, validate_rate_limit
from orchestrator.retry_policy import attempt_outcome


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
    # Starts per second, minute or hour across all workers (`10/m`), or null for none (worker/ratelimit.py).
    rate_limit = models.CharField(
        max_length=16, null=True, blank=True, validators=[validate_rate_limit], help_text=RATE_LIMIT_HELP
    )
    # What a run's params may hold (JSON Schema), the job code's declaration (registry.JobSpec), copied
    # here by the job sync: not editable, because the code reads the params.
    params_schema = models.JSONField(
        default=dict, blank=True, db_default=models.Value({}, models.JSONField())
    )
    # How a failed run is retried (schedules/retries.py): {} is one attempt; a schedule may override it.
    retry_policy = models.JSONField(default=dict, blank=True, db_default=models.Value({}, models.JSONField()))

    class Meta:
        ordering = ["key"]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_concurrency__isnull=True) | Q(max_concurrency__gte=1),
                name="job_max_concurrency_positive",
            ),
            models.CheckConstraint(condition=Q(timeout_seconds__gte=1), name="job_timeout_positive"),
            models.CheckConstraint(
                condition=Q(rate_limit__isnull=True) | Q(rate_limit__regex=RATE_LIMIT_PATTERN),
                name="job_rate_limit_form",
            ),
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
    # Waiting to retry (schedules/retries.py): the run is `queued` again and its next attempt starts no
    # earlier than this (database clock); kept after the start, as when the last retry was due.
    retry_at = models.DateTimeField(null=True, blank=True)
    # A cancel asked of the run while it was running (POST /api/runs/{id}/cancel, or an overlap policy:
    # schedules/cancelling.py): who asked, when, and when its grace ends. Its worker SIGTERMs the task
    # process group, SIGKILLs it at the deadline; any finish but a success then writes `cancelled`.
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    cancel_deadline = models.DateTimeField(null=True, blank=True)
    cancelled_by = models.CharField(max_length=200, blank=True, default="", db_default="")

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
            # The scheduler's wake-up for the next retry due (schedules/retries.py).
            models.Index(
                fields=["retry_at"],
                name="run_retry_idx",
                condition=Q(status="queued", retry_at__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"run {self.pk} ({self.job_id}, {self.status})"

    def attempt_history(self) -> list[Any]:
        """Every attempt so far, oldest first: the recorded ones (RunAttempt rows, when it was retried),
        then its current one as a dict the run itself describes (for a run of one attempt, the only
        one), with the same keys."""
        history: list[Any] = list(self.attempts.all())
        if self.attempt >= 1 and all(row.attempt != self.attempt for row in history):
            history.append(
                {
                    "attempt": self.attempt,
                    "outcome": attempt_outcome(self.status, self.error_summary),
                    "error_summary": self.error_summary,
                    "started_at": self.started_at,
                    "finished_at": self.finished_at,
                    "worker": self.worker,
                }
            )
        return history

    @property
    def directive_text(self) -> str:
        """The instructions this run executes with: the directive's text or the custom text."""
        if self.directive_id is not None:
            return self.directive.text
        return self.custom_directive_text


class RunAttempt(models.Model):
    """One finished attempt of a run that was retried (schedules/retries.py): its number, outcome
    (`succeeded`, `failed`, `timed_out`, `worker_lost`, `cancelled`), error and times. A run of a single
    attempt has none: the run is its own record."""

    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempts")
    attempt = models.PositiveIntegerField()
    outcome = models.CharField(max_length=16)
    error_summary = models.CharField(max_length=500, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        ordering = ["run_id", "attempt"]
        constraints = [models.UniqueConstraint(fields=["run", "attempt"], name="runattempt_unique_attempt")]

    def __str__(self) -> str:
        return f"run {self.run_id} attempt {self.attempt} ({self.outcome})"


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
