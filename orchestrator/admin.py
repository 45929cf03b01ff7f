"""Admin for jobs (settings only: rows come from the code registry), directives and runs (view only)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import states as celery_states
from django import forms
from django.apps import apps
from django.conf import settings
from django.contrib import admin
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django_celery_results.admin import TaskResultAdmin
from django_celery_results.models import TaskResult

from orchestrator import models
from orchestrator.api.serializers import JobSerializer
from project.pagination import EstimatedCountPaginator


def format_duration(started: datetime | None, finished: datetime | None) -> str:
    """How long a run took, for a list column: "12.3 s", "4 min 05 s", "2 h 03 min"; "-" if unfinished."""
    if started is None or finished is None:
        return "-"
    seconds = max(0.0, (finished - started).total_seconds())
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


JOB_SETTINGS = [
    "name",
    "description",
    "enabled",
    "max_concurrency",
    "timeout_seconds",
    "rate_limit",
    "task3_allowlist",
    "retry_policy",
]


class JobAdminForm(forms.ModelForm):
    class Meta:
        model = models.Job
        fields = JOB_SETTINGS
        help_texts = {
            "retry_policy": 'How a failed run is retried, e.g. {"max_attempts": 3, '
            '"initial_interval_seconds": 10, "backoff_coefficient": 2, "max_interval_seconds": 600, '
            '"retry_on": ["failed", "timed_out", "worker_lost"]}; missing keys take these defaults. '
            "Blank: one attempt.",
        }

    def clean_retry_policy(self) -> Any:
        value = self.cleaned_data.get("retry_policy")
        return {} if value is None else value

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        # The API's rules for job settings, so a cap of 0 is refused here too (not an IntegrityError).
        data = {field: cleaned.get(field) for field in JOB_SETTINGS}
        serializer = JobSerializer(instance=self.instance, data=data, partial=True)
        if not serializer.is_valid():
            for field, problems in serializer.errors.items():
                if isinstance(problems, dict):  # a retry policy's, by key
                    problems = [f"{key}: {p}" for key, items in problems.items() for p in items]
                self.add_error(field if field in self.fields else None, [str(p) for p in problems])
        elif "rate_limit" in serializer.validated_data:
            cleaned["rate_limit"] = serializer.validated_data["rate_limit"]  # canonical: ` 10 / m` -> `10/m`
        return cleaned


@admin.register(models.Job)
class JobAdmin(admin.ModelAdmin):
    form = JobAdminForm
    list_display = ["key", "name", "enabled", "queue", "max_concurrency", "rate_limit", "timeout_seconds"]
    list_filter = ["enabled"]
    search_fields = ["key", "name"]
    # params_schema is the job's code's (orchestrator/jobs/registry.py), synced at migrate.
    readonly_fields = ["key", "queue", "params_schema"]
    fields = ["key", "queue", *JOB_SETTINGS, "params_schema"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A job is code (orchestrator.jobs); a row without it could never run.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: models.Job | None = None) -> bool:
        return False


@admin.register(models.Directive)
class DirectiveAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "job"]
    list_filter = ["job"]
    search_fields = ["key", "name"]


@admin.register(models.Run)
class RunAdmin(admin.ModelAdmin):
    """Runs are written by launches and workers: view only."""

    list_display = [
        "id",
        "job",
        "schedule",
        "trigger",
        "status",
        "created_at",
        "duration",
        "llm_calls",
        "flower",
    ]
    readonly_fields = ["flower", "dashboard", "attempt_list"]
    # No date hierarchy (its year list reads every run): a date filter instead.
    list_filter = ["status", "trigger", "job", ("created_at", admin.DateFieldListFilter)]
    list_select_related = ["job"]
    search_fields = ["task_id", "error_summary"]
    # Sorting by another column would sort every run; these two walk an index.
    sortable_by = ["id", "created_at"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    def get_queryset(self, request: HttpRequest) -> QuerySet[models.Run]:
        # The schedule a run belongs to (through its ScheduledRun, a schedules model: looked up by name,
        # orchestrator does not import schedules); one probe of the run_id index per row shown.
        scheduled = apps.get_model("schedules", "ScheduledRun").objects.filter(run=OuterRef("pk"))
        return (
            super()
            .get_queryset(request)
            .annotate(
                schedule_id=Subquery(scheduled.values("schedule_id")[:1]),
                schedule_name=Subquery(scheduled.values("schedule__name")[:1]),
            )
        )

    @admin.display(description="schedule")
    def schedule(self, run: models.Run) -> str:
        if getattr(run, "schedule_id", None) is None:
            return "-"
        url = reverse("admin:schedules_schedule_change", args=[run.schedule_id])
        return format_html('<a href="{}">{}</a>', url, run.schedule_name)

    @admin.display(description="duration")
    def duration(self, run: models.Run) -> str:
        return format_duration(run.started_at, run.finished_at)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: models.Run | None = None) -> bool:
        return False

    @admin.display(description="Flower")
    def flower(self, run: models.Run) -> str:
        """The run's Celery task in Flower (FLOWER_URL), named there after its job and schedule."""
        if not run.task_id:
            return "-"
        return format_html('<a href="{}/task/{}">task</a>', settings.FLOWER_URL, run.task_id)

    @admin.display(description="attempts")
    def attempt_list(self, run: models.Run) -> str:
        """Each attempt: number, outcome, times and error (more than one when the run was retried)."""
        if run.pk is None:
            return "-"
        keys = ("attempt", "outcome", "started_at", "finished_at", "error_summary")
        rows = [
            [(a.get(k) if isinstance(a, dict) else getattr(a, k)) or "-" for k in keys]
            for a in run.attempt_history()
        ]
        return format_html_join(mark_safe("<br>"), "#{} {} {} to {} {}", rows) or "-"

    @admin.display(description="dashboard")
    def dashboard(self, run: models.Run) -> str:
        if run.pk is None:
            return "-"
        return format_html('<a href="{}">tasks and timings</a>', reverse("dashboard:run", args=[run.pk]))


def _register_view_only(model: type) -> None:
    """Models other parts of the system own (log triage's findings and cursors): visible, not editable."""

    class ViewOnlyAdmin(admin.ModelAdmin):
        def has_add_permission(self, request: HttpRequest) -> bool:
            return False

        def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
            return False

    admin.site.register(model, ViewOnlyAdmin)


for _name in ("Finding", "LogCursor"):
    if hasattr(models, _name):
        _register_view_only(getattr(models, _name))


class TaskStateFilter(admin.SimpleListFilter):
    """Celery's task states as the choices (the default filter reads every row for the distinct ones)."""

    title = "status"
    parameter_name = "status__exact"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(state, state) for state in sorted(celery_states.ALL_STATES)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(status=self.value()) if self.value() else queryset


class LargeTaskResultAdmin(TaskResultAdmin):
    """django-celery-results' admin for a TaskResult per run, millions of rows: no date hierarchy and no
    filters listing every distinct task name or worker (each reads the whole table), no count(*), and
    sorting only by the indexed columns."""

    date_hierarchy = None
    list_filter = (TaskStateFilter, ("date_done", admin.DateFieldListFilter))
    search_fields = ("=task_id",)
    sortable_by = ("task_id", "date_done")
    show_full_result_count = False
    paginator = EstimatedCountPaginator


if admin.site.is_registered(TaskResult):
    admin.site.unregister(TaskResult)
admin.site.register(TaskResult, LargeTaskResultAdmin)
