"""Admin for schedules and their history. Saves and actions go through schedules.services, like the API."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from schedules import dispatch, services, timing
from schedules.models import Schedule, ScheduledRun

RECENT_RUNS_SHOWN = 10


class ScheduleAdminForm(forms.ModelForm):
    class Meta:
        model = Schedule
        fields = list(services.SCHEDULE_FIELDS)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            # Field-level problems first: the cross-field rules would only repeat them.
            return cleaned
        values = {field: cleaned.get(field) for field in services.SCHEDULE_FIELDS}
        changed = self.changed_data if self.instance.pk else services.SCHEDULE_FIELDS
        errors = services.schedule_errors(values, changed=changed, pk=self.instance.pk)
        for field, messages_ in errors.items():
            self.add_error(field if field in self.fields else None, messages_)
        return cleaned


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    form = ScheduleAdminForm
    list_display = ["name", "job", "schedule_type", "timing", "next_run_at", "last_run_at", "enabled"]
    list_filter = ["enabled", "schedule_type", "job"]
    list_select_related = ["job"]
    search_fields = ["name"]
    actions = ["run_now", "enable", "disable"]
    readonly_fields = [
        "timing",
        "next_run_at",
        "upcoming",
        "last_run_at",
        "claimed_by",
        "claimed_until",
        "created_at",
        "updated_at",
        "recent_runs",
    ]
    fieldsets = [
        (None, {"fields": ["name", "job", "enabled"]}),
        ("Instructions", {"fields": ["directive", "custom_directive_text", "task3_scope"]}),
        (
            "Timing",
            {
                "fields": [
                    "schedule_type",
                    "interval_minutes",
                    "cron_expr",
                    "timezone",
                    "timing",
                    "next_run_at",
                    "upcoming",
                ]
            },
        ),
        ("Policies and caps", {"fields": ["misfire_policy", "overlap_policy", "max_global", "max_per_job"]}),
        (
            "Scheduler state",
            {
                "fields": [
                    "last_run_at",
                    "claimed_by",
                    "claimed_until",
                    "created_at",
                    "updated_at",
                    "recent_runs",
                ]
            },
        ),
    ]

    @admin.display(description="timing")
    def timing(self, schedule: Schedule) -> str:
        if not schedule.schedule_type:
            return "-"
        return timing.describe(timing.spec_of(schedule))

    @admin.display(description="next 5 runs (UTC)")
    def upcoming(self, schedule: Schedule) -> str:
        if schedule.next_run_at is None:
            return "-"
        try:
            times = [
                schedule.next_run_at,
                *timing.upcoming(timing.spec_of(schedule), after=schedule.next_run_at, n=4),
            ]
        except Exception:
            return "-"
        return ", ".join(t.strftime("%Y-%m-%d %H:%M") for t in times)

    @admin.display(description="recent runs")
    def recent_runs(self, schedule: Schedule) -> str:
        if schedule.pk is None:
            return "-"
        runs = list(schedule.scheduled_runs.order_by("-scheduled_for", "-id")[:RECENT_RUNS_SHOWN])
        history_url = (
            reverse("admin:schedules_scheduledrun_changelist") + f"?schedule__id__exact={schedule.pk}"
        )
        link = format_html('<a href="{}">All history ({})</a>', history_url, schedule.scheduled_runs.count())
        if not runs:
            return link
        rows = format_html_join(
            "",
            '<tr><td><a href="{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    reverse("admin:schedules_scheduledrun_change", args=[run.pk]),
                    run.scheduled_for.strftime("%Y-%m-%d %H:%M:%S"),
                    run.trigger,
                    run.status,
                    run.error_summary,
                )
                for run in runs
            ),
        )
        return format_html(
            "<table><tr><th>scheduled for (UTC)</th><th>trigger</th><th>status</th><th>note</th></tr>"
            "{}</table>{}",
            rows,
            link,
        )

    def save_model(self, request: HttpRequest, obj: Schedule, form: ScheduleAdminForm, change: bool) -> None:
        # The service computes next_run_at and re-validates under the row lock; copy its row back so the
        # admin's messages and redirect see what was saved.
        fields = {
            field: form.cleaned_data[field]
            for field in services.SCHEDULE_FIELDS
            if field in form.cleaned_data
        }
        if change:
            saved = services.update_schedule(obj.pk, {f: fields[f] for f in form.changed_data if f in fields})
        else:
            saved = services.create_schedule(**fields)
        for field in Schedule._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: Schedule) -> None:
        services.delete_schedule(obj)

    @admin.action(description="Run selected schedules now")
    def run_now(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset.select_related("job", "directive"):
            dispatch.run_now(schedule)
        self.message_user(request, f"Queued {queryset.count()} run(s).", messages.SUCCESS)

    @admin.action(description="Enable selected schedules (next run computed from now)")
    def enable(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset:
            services.enable_schedule(schedule)
        self.message_user(request, f"Enabled {queryset.count()} schedule(s).", messages.SUCCESS)

    @admin.action(description="Disable selected schedules")
    def disable(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        for schedule in queryset:
            services.disable_schedule(schedule)
        self.message_user(request, f"Disabled {queryset.count()} schedule(s).", messages.SUCCESS)


@admin.register(ScheduledRun)
class ScheduledRunAdmin(admin.ModelAdmin):
    """History is written by the scheduler and workers: view only."""

    list_display = [
        "id",
        "schedule",
        "trigger",
        "scheduled_for",
        "status",
        "run_link",
        "worker",
        "started_at",
        "finished_at",
        "error_summary",
    ]
    list_filter = ["status", "trigger", "schedule"]
    list_select_related = ["schedule", "run"]
    search_fields = ["schedule__name", "task_id"]
    date_hierarchy = "scheduled_for"

    @admin.display(description="run")
    def run_link(self, scheduled_run: ScheduledRun) -> str:
        if scheduled_run.run_id is None:
            return "-"
        url = reverse("admin:orchestrator_run_change", args=[scheduled_run.run_id])
        return format_html('<a href="{}">{}</a>', url, scheduled_run.run_id)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ScheduledRun | None = None) -> bool:
        return False
