"""Admin for jobs (settings only: rows come from the code registry), directives and runs (view only)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from orchestrator import models
from orchestrator.api.serializers import JobSerializer

JOB_SETTINGS = ["name", "description", "enabled", "max_concurrency", "timeout_seconds", "task3_allowlist"]


class JobAdminForm(forms.ModelForm):
    class Meta:
        model = models.Job
        fields = JOB_SETTINGS

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        # The API's rules for job settings, so a cap of 0 is refused here too (not an IntegrityError).
        data = {field: cleaned.get(field) for field in JOB_SETTINGS}
        serializer = JobSerializer(instance=self.instance, data=data, partial=True)
        if not serializer.is_valid():
            for field, problems in serializer.errors.items():
                self.add_error(field if field in self.fields else None, [str(p) for p in problems])
        return cleaned


@admin.register(models.Job)
class JobAdmin(admin.ModelAdmin):
    form = JobAdminForm
    list_display = ["key", "name", "enabled", "queue", "max_concurrency", "timeout_seconds"]
    list_filter = ["enabled"]
    search_fields = ["key", "name"]
    readonly_fields = ["key", "queue"]
    fields = ["key", "queue", *JOB_SETTINGS]

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
        "trigger",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "llm_calls",
        "flower",
    ]
    readonly_fields = ["flower", "dashboard"]
    list_filter = ["status", "trigger", "job"]
    list_select_related = ["job"]
    search_fields = ["task_id", "error_summary"]
    date_hierarchy = "created_at"

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
