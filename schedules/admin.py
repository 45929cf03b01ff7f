"""Admin for schedules and their history. Saves and actions go through schedules.services, like the API."""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db import connection, transaction
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from orchestrator.admin import RunAdmin, format_duration
from orchestrator.models import Run, RunStatus
from orchestrator.params import params_from_json
from project.pagination import EstimatedCountPaginator, bounded_count
from schedules import bulk, calendar_service, cancelling, services, timing
from schedules import changes as change_log
from schedules.labels import format_labels, parse_selector
from schedules.models import (
    RUN_AFTER_STATUSES,
    Calendar,
    CalendarPolicy,
    ChangeSource,
    OverlapPolicy,
    RunAfterMode,
    Schedule,
    ScheduleChange,
    ScheduledRun,
    default_run_after_statuses,
)

RECENT_RUNS_SHOWN = 10
RECENT_CHANGES_SHOWN = 20


class PauseNoteForm(forms.Form):
    note = forms.CharField(
        max_length=services.PAUSE_NOTE_MAX, required=False, help_text="Why, for the others."
    )


class RunNowParamsForm(forms.Form):
    params = forms.CharField(
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 12, "cols": 80, "spellcheck": "false"}),
        help_text="A JSON object; its keys replace the schedule's params for this run only (blank: the"
        " schedule's own). The result is checked against the job's params_schema.",
    )

    def clean_params(self) -> Any:
        try:
            return params_from_json(self.cleaned_data["params"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


class BackfillForm(forms.Form):
    start = forms.DateTimeField(help_text="UTC, e.g. 2026-11-30 00:00:00; the window is [start, end).")
    end = forms.DateTimeField(help_text="UTC; not in the future. At most 1,000 slots per schedule.")
    overlap_policy = forms.ChoiceField(
        choices=OverlapPolicy.choices,
        initial=OverlapPolicy.ALLOW,
        required=False,
        help_text="For the backfilled slots (not the schedule's); allow (the default) runs each one.",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        for field in ("start", "end"):
            if cleaned.get(field) is not None and (problem := services.date_error(cleaned[field])):
                self.add_error(field, problem)
        return cleaned


class WriteOnlyURLField(forms.URLField):
    """A URL typed in but never shown: blank leaves the stored one as it is."""

    def has_changed(self, initial: Any, data: Any) -> bool:
        return not self.disabled and bool(data)


class ScheduleAdminForm(forms.ModelForm):
    # Optional in the form (blank means none), as in the API.
    jitter_seconds = forms.IntegerField(
        required=False,
        min_value=0,
        initial=0,
        help_text="Delay each run by up to this many seconds (0: none).",
    )

    # Optional too (blank: the default); retention keeps at least this many of the newest runs.
    history_keep = forms.IntegerField(
        required=False,
        min_value=0,
        initial=Schedule._meta.get_field("history_keep").default,
        help_text="Keep at least this many of its newest runs, whatever HISTORY_KEEP_DAYS says.",
    )

    # Optional (blank: the default, 1); 0 turns the failing alert off.
    alert_after_failures = forms.IntegerField(
        required=False,
        min_value=0,
        initial=Schedule._meta.get_field("alert_after_failures").default,
        help_text="Alert after this many consecutive failures (0: never).",
    )

    # Write-only, as in the API: the stored URL (its path is its token) never reaches the browser.
    alert_webhook_url = WriteOnlyURLField(
        required=False,
        assume_scheme="https",
        max_length=500,
        widget=forms.PasswordInput(attrs={"autocomplete": "off", "placeholder": "https://..."}),
        help_text="Alerts of this schedule go here instead of ALERT_WEBHOOK_URLS. Hidden once saved; "
        "leave blank to keep the current one.",
    )
    alert_webhook_clear = forms.BooleanField(
        required=False,
        label="Remove the webhook",
        help_text="Alerts of this schedule go to ALERT_WEBHOOK_URLS again.",
    )

    # Optional (blank: skip), as in the API.
    calendar_policy = forms.ChoiceField(
        choices=CalendarPolicy.choices,
        required=False,
        initial=CalendarPolicy.SKIP,
        help_text="What a slot its calendars rule out becomes: skipped, or run on the next allowed day.",
    )
    # run_after by name, comma-separated: a select of every schedule would not scale to thousands.
    run_after_names = forms.CharField(
        required=False,
        label="Run after",
        help_text="Names of upstream schedules, comma-separated: a run of this schedule starts when a run"
        " of one ends in one of the run-after statuses (trigger dependency).",
    )

    run_after_statuses = forms.MultipleChoiceField(
        required=False,
        choices=[(status, status) for status in RUN_AFTER_STATUSES],
        widget=forms.CheckboxSelectMultiple,
        label="Run after statuses",
        help_text="The upstream run ends that start a run (none ticked: succeeded).",
    )

    class Meta:
        model = Schedule
        fields = [*services.SCHEDULE_FIELDS, *services.CALENDAR_FIELDS]
        help_texts = {
            "pause_after_failures": "Disable the schedule after this many consecutive failed runs (blank: "
            "never); enabling it clears the note and counts afresh.",
            "retry_policy": 'Overrides the job\'s retry policy, e.g. {"max_attempts": 3, '
            '"initial_interval_seconds": 10, "backoff_coefficient": 2, "max_interval_seconds": 600, '
            '"retry_on": ["failed", "timed_out", "worker_lost"]} (missing keys take these defaults). '
            "Blank: the job's policy.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "run_after_mode" in self.fields:
            self.fields["run_after_mode"].required = False
        if self.instance.alert_webhook_url and "alert_webhook_url" in self.fields:
            self.fields["alert_webhook_url"].widget.attrs["placeholder"] = "•••••••• (set)"
        if self.instance.managed:
            # Its schedules file declares the webhook (shown masked here, not read-only: that shows it).
            for name in ("alert_webhook_url", "alert_webhook_clear", "run_after_names"):
                self.fields[name].disabled = True
        if self.instance.pk:
            self.fields["run_after_names"].initial = ", ".join(services.run_after_names(self.instance))

    def clean_run_after_names(self) -> list[Schedule]:
        names = [n.strip() for n in (self.cleaned_data.get("run_after_names") or "").split(",") if n.strip()]
        found = list(Schedule.objects.filter(name__in=names).order_by("pk"))
        missing = sorted(set(names) - {s.name for s in found})
        if missing:
            raise forms.ValidationError(f"No such schedule: {', '.join(map(repr, missing))}.")
        return found

    @property
    def changed_data(self) -> list[str]:
        # "Remove the webhook" changes alert_webhook_url (the field save_model hands to the service).
        changed = list(super().changed_data)
        if "alert_webhook_clear" in changed:
            changed.remove("alert_webhook_clear")
            changed.append("alert_webhook_url")
        return list(dict.fromkeys(changed))

    def clean_alert_webhook_url(self) -> str:
        # Blank keeps the stored URL; "Remove the webhook" clears it (clean() below).
        return self.cleaned_data.get("alert_webhook_url") or self.instance.alert_webhook_url

    def clean_calendar_policy(self) -> str:
        return self.cleaned_data.get("calendar_policy") or CalendarPolicy.SKIP

    def clean_jitter_seconds(self) -> int:
        return self.cleaned_data.get("jitter_seconds") or 0

    def clean_alert_after_failures(self) -> int:
        value = self.cleaned_data.get("alert_after_failures")
        return Schedule._meta.get_field("alert_after_failures").default if value is None else value

    def clean_params(self) -> Any:
        # Blank: no params (the service refuses anything but an object, naming the path).
        value = self.cleaned_data.get("params")
        return {} if value is None else value

    def clean_labels(self) -> Any:
        # Blank: no labels (the service checks the syntax, naming the key).
        value = self.cleaned_data.get("labels")
        return {} if value is None else value

    def clean_run_after_statuses(self) -> Any:
        # Blank: the default (succeeded); the service checks the list.
        value = self.cleaned_data.get("run_after_statuses")
        return list(value) if value else default_run_after_statuses()

    def clean_run_after_mode(self) -> str:
        return self.cleaned_data.get("run_after_mode") or RunAfterMode.ANY

    def clean_history_keep(self) -> int:
        value = self.cleaned_data.get("history_keep")
        return Schedule._meta.get_field("history_keep").default if value is None else value

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if cleaned.get("alert_webhook_clear") and "alert_webhook_url" in self.fields:
            cleaned["alert_webhook_url"] = ""
        if self.errors:
            # Field-level problems first: the cross-field rules would only repeat them.
            return cleaned
        # Fields shown read-only (a managed schedule's declared ones) are not in the form: keep the row's.
        values = {
            field: cleaned[field] if field in self.fields else getattr(self.instance, field)
            for field in services.SCHEDULE_FIELDS
        }
        changed = self.changed_data if self.instance.pk else services.SCHEDULE_FIELDS
        if "run_after_names" in self.changed_data or values["schedule_type"] == "none":
            values["run_after"] = cleaned.get("run_after_names", [])
        errors = services.schedule_errors(
            values, changed=changed, pk=self.instance.pk, run_count=self.instance.scheduled_run_count or 0
        )
        errors.update(
            services.calendar_errors(
                policy=cleaned.get("calendar_policy", self.instance.calendar_policy),
                exclude=list(cleaned.get("exclude_calendars") or []),
                only=list(cleaned.get("only_calendars") or []),
                jitter_seconds=values.get("jitter_seconds"),
            )
        )
        if "run_after" in errors:
            errors["run_after_names"] = errors.pop("run_after")
        for field, messages_ in errors.items():
            self.add_error(field if field in self.fields else None, messages_)
        return cleaned


def change_value(value: Any) -> str:
    """A changed field's value as a person reads it: `none`, `yes`/`no`, numbers and text as they are."""
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(change_value(item) for item in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={change_value(v)}" for k, v in value.items()) or "none"
    return str(value)


# The label filter's choices: the most used key=value pairs among (at most) 5,000 labelled schedules, so
# the list page's cost stays bounded at any number of schedules; any other pair works typed in the URL.
LABEL_CHOICES_SQL = """
SELECT l.key, l.value, count(*)
  FROM (SELECT labels FROM schedules_schedule WHERE labels <> '{}'::jsonb LIMIT 5000) AS s,
       jsonb_each_text(s.labels) AS l
 GROUP BY l.key, l.value ORDER BY count(*) DESC, l.key, l.value LIMIT 30
"""


class LabelFilter(admin.SimpleListFilter):
    """By label: the most used pairs to click, and any selector typed in the URL (?label=tier!=batch)."""

    title = "label"
    parameter_name = "label"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        with connection.cursor() as cursor:
            cursor.execute(LABEL_CHOICES_SQL)
            return [(f"{key}={value}", f"{key}={value} ({count})") for key, value, count in cursor.fetchall()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> QuerySet[Schedule]:
        if not self.value():
            return queryset
        try:
            return queryset.filter(parse_selector([self.value()]))
        except ValueError as exc:
            raise IncorrectLookupParameters(str(exc)) from exc


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    form = ScheduleAdminForm
    # `enabled` second, so it stays on screen at 1,400 px whatever the timing's description takes.
    list_display = [
        "name",
        "enabled",
        "last_status",
        "timing",
        "timezone",
        "next_run_at",
        "job",
        "labels_shown",
        "managed",
    ]
    list_filter = ["enabled", "managed", "schedule_type", "job", LabelFilter]
    list_select_related = ["job"]
    # Every column but the last status (a subquery per row) sorts; no count(*) of every schedule.
    sortable_by = ["name", "enabled", "timezone", "next_run_at", "job", "managed"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    search_fields = ["name"]
    actions = ["run_now", "enable", "disable", "disable_with_note", "backfill"]
    readonly_fields = [
        "downstreams",
        "timing",
        "next_run_at",
        "upcoming",
        "runs_remaining",
        "scheduled_run_count",
        "paused_note",
        "paused_at",
        "paused_by",
        "managed",
        "last_run_at",
        "claimed_by",
        "claimed_until",
        "created_at",
        "updated_at",
        "recent_runs",
        "change_history",
    ]
    fieldsets = [
        (None, {"fields": ["name", "job", "enabled", "managed", "labels"]}),
        ("Instructions", {"fields": ["directive", "custom_directive_text", "task3_scope", "params"]}),
        (
            "Run after other schedules",
            {"fields": ["run_after_names", "run_after_statuses", "run_after_mode", "downstreams"]},
        ),
        (
            "Timing",
            {
                "fields": [
                    "schedule_type",
                    "interval_minutes",
                    "cron_expr",
                    "timezone",
                    "jitter_seconds",
                    "start_at",
                    "end_at",
                    "timing",
                    "next_run_at",
                    "upcoming",
                ]
            },
        ),
        (
            "Policies, caps and limits",
            {
                "fields": [
                    "misfire_policy",
                    "catchup_window_seconds",
                    "overlap_policy",
                    "retry_policy",
                    "max_global",
                    "max_per_job",
                    "max_runs",
                    "runs_remaining",
                    "scheduled_run_count",
                    "history_keep",
                ]
            },
        ),
        (
            "Alerts",
            {
                "fields": [
                    "alert_after_failures",
                    "pause_after_failures",
                    "alert_after_seconds",
                    "alert_webhook_url",
                    "alert_webhook_clear",
                ]
            },
        ),
        ("Calendars", {"fields": ["exclude_calendars", "only_calendars", "calendar_policy"]}),
        ("Pause", {"fields": ["paused_note", "paused_at", "paused_by"]}),
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
        ("Change history", {"fields": ["change_history"]}),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Schedule]:
        # The status of each schedule's newest run: one probe of scheduledrun_history_idx per row shown.
        newest = ScheduledRun.objects.filter(schedule=OuterRef("pk")).order_by("-scheduled_for", "-id")
        return super().get_queryset(request).annotate(last_status=Subquery(newest.values("status")[:1]))

    @admin.display(description="labels")
    def labels_shown(self, schedule: Schedule) -> str:
        return format_labels(schedule.labels) or "-"

    @admin.display(description="last status")
    def last_status(self, schedule: Schedule) -> str:
        return getattr(schedule, "last_status", None) or "-"

    def get_urls(self):
        # Before the admin's own: its "<object_id>/" pattern would take "<id>/run-now/" too.
        run_now = path(
            "<path:object_id>/run-now/",
            self.admin_site.admin_view(self.run_now_view),
            name="schedules_schedule_run_now",
        )
        run_now_params = path(
            "<path:object_id>/run-now-with-params/",
            self.admin_site.admin_view(self.run_now_params_view),
            name="schedules_schedule_run_now_params",
        )
        return [run_now, run_now_params, *super().get_urls()]

    def _schedule_to_run(self, request: HttpRequest, object_id: str) -> Schedule:
        if not object_id.isdigit():
            raise Http404("No such schedule.")
        schedule = get_object_or_404(Schedule.objects.select_related("job", "directive"), pk=int(object_id))
        if not self.has_change_permission(request, schedule):
            raise PermissionDenied
        return schedule

    def _run_now(self, request: HttpRequest, schedule: Schedule, params: Any = None) -> HttpResponse:
        """services.run_now, as POST /api/schedules/{id}/run-now: the override merged and checked there."""
        scheduled_run = services.run_now(schedule, params=params)
        self.message_user(
            request, f"Queued a manual run of {schedule.name} (run {scheduled_run.run_id}).", messages.SUCCESS
        )
        return HttpResponseRedirect(reverse("admin:schedules_schedule_change", args=[schedule.pk]))

    def run_now_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The change page's "Run now" button: a manual run (trigger `manual`), as POST /run-now does."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        schedule = self._schedule_to_run(request, object_id)
        try:
            return self._run_now(request, schedule)
        except services.ScheduleInvalid as exc:
            self.message_user(request, f"Nothing was run: {exc}", messages.ERROR)
            return HttpResponseRedirect(reverse("admin:schedules_schedule_change", args=[schedule.pk]))

    def run_now_params_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The change page's "Run now with params": the schedule's params as JSON to edit, the job's
        params_schema beside them; a refusal names the failing path and runs nothing."""
        schedule = self._schedule_to_run(request, object_id)
        if request.method == "POST":
            form = RunNowParamsForm(request.POST)
            if form.is_valid():
                try:
                    return self._run_now(request, schedule, form.cleaned_data["params"])
                except services.ScheduleInvalid as exc:
                    for field, problems in exc.errors.items():
                        for problem in problems:
                            # A disabled job is no fault of the params typed: the form's own error.
                            form.add_error("params" if field == "params" else None, problem)
        else:
            form = RunNowParamsForm(initial={"params": json.dumps(schedule.params, indent=2, sort_keys=True)})
        return TemplateResponse(
            request,
            "admin/schedules/schedule/run_now_params.html",
            {
                **self.admin_site.each_context(request),
                "original": schedule,
                "title": f"Run {schedule.name} now with params",
                "form": form,
                "schema": json.dumps(schedule.job.params_schema, indent=2, sort_keys=True)
                if schedule.job.params_schema
                else "",
            },
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Schedule | None = None) -> list[str]:
        # A managed schedule's declared fields belong to its schedules file (sync_schedules).
        fields = list(super().get_readonly_fields(request, obj))
        if obj is not None and obj.managed:
            fields += [
                field
                for field in services.MANAGED_FIELDS
                if field not in fields and field != "alert_webhook_url"  # disabled by the form
            ]
        return fields

    def has_delete_permission(self, request: HttpRequest, obj: Schedule | None = None) -> bool:
        if obj is not None and obj.managed:
            return False  # remove it from its file and run sync_schedules --prune
        return super().has_delete_permission(request, obj)

    @admin.display(description="runs after this one")
    def downstreams(self, schedule: Schedule) -> str:
        names = sorted(schedule.run_before.values_list("name", flat=True)) if schedule.pk else []
        return ", ".join(names) or "-"

    @admin.display(description="runs remaining")
    def runs_remaining(self, schedule: Schedule) -> str:
        if schedule.max_runs is None:
            return "-"
        return str(max(0, schedule.max_runs - schedule.scheduled_run_count))

    @admin.display(description="changes (newest first)")
    def change_history(self, schedule: Schedule) -> str:
        if schedule.pk is None:
            return "-"
        rows = list(change_log.history(schedule.pk)[:RECENT_CHANGES_SHOWN])
        if not rows:
            return "-"
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    change.at.strftime("%Y-%m-%d %H:%M:%S"),
                    change.action,
                    change.source,
                    change.actor or "-",
                    "; ".join(
                        f"{f}: {change_value(c.get('old'))} → {change_value(c.get('new'))}"
                        for f, c in change.changes.items()
                    ),
                )
                for change in rows
            ),
        )
        return format_html(
            "<table><tr><th>at (UTC)</th><th>action</th><th>source</th><th>by</th><th>fields</th></tr>"
            "{}</table>",
            body,
        )

    @admin.display(description="timing")
    def timing(self, schedule: Schedule) -> str:
        if not schedule.schedule_type:
            return "-"
        return timing.describe(timing.spec_of(schedule))

    @admin.display(description="next 5 runs (UTC, jitter applied)")
    def upcoming(self, schedule: Schedule) -> str:
        # The API's, the dashboard's and a preview's answer (services.upcoming_runs).
        times = services.upcoming_runs(schedule, 5)
        if schedule.next_run_at is None and schedule.end_at is not None:
            return "- (ended: no slot left before end_at)"
        return ", ".join(t.strftime("%Y-%m-%d %H:%M:%S") for t in times) or "-"

    @admin.display(description="recent runs")
    def recent_runs(self, schedule: Schedule) -> str:
        if schedule.pk is None:
            return "-"
        runs = list(schedule.scheduled_runs.order_by("-scheduled_for", "-id")[:RECENT_RUNS_SHOWN])
        history_url = (
            reverse("admin:schedules_scheduledrun_changelist") + f"?schedule__id__exact={schedule.pk}"
        )
        count = bounded_count(schedule.scheduled_runs.all())
        link = format_html('<a href="{}">All history ({})</a>', history_url, f"{count:,}")
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
            for field in (*services.SCHEDULE_FIELDS, *services.CALENDAR_FIELDS)
            if field in form.cleaned_data
        }
        if "run_after_names" in form.changed_data or not change:
            fields["run_after"] = form.cleaned_data.get("run_after_names") or []
        actor = request.user.get_username()
        if change:
            saved = services.update_schedule(
                obj.pk,
                {f: fields[f] for f in [*form.changed_data, "run_after"] if f in fields},
                source=ChangeSource.ADMIN,
                actor=actor,
            )
        else:
            saved = services.create_schedule(source=ChangeSource.ADMIN, actor=actor, **fields)
        for field in Schedule._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))
        obj._state.adding = False

    def get_deleted_objects(self, objs, request: HttpRequest):
        # Schedules that run after one being deleted, outside the selection, protect it: the delete page
        # and "Delete selected" show "Cannot delete" listing them, and delete nothing. The service
        # refuses the same under its lock (a downstream added meanwhile).
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        names = {schedule.pk: schedule.name for schedule in objs}
        for upstream_id, downstreams in services.downstreams_outside(list(names)).items():
            protected.append(services.in_use_message(names[upstream_id], downstreams))
        return deleted, counts, perms_needed, protected

    def delete_model(self, request: HttpRequest, obj: Schedule) -> None:
        with transaction.atomic():
            change_log.record_delete(obj, source=ChangeSource.ADMIN, actor=request.user.get_username())
            try:
                services.delete_schedule(obj)
            except services.ScheduleInUse as exc:
                raise PermissionDenied(" ".join(m for ms in exc.errors.values() for m in ms)) from exc

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        # "Delete selected schedules": all or none, as POST /api/schedules/bulk (a managed one refuses).
        self._bulk(request, queryset, bulk.BulkAction.DELETE)

    def _bulk(self, request: HttpRequest, queryset: QuerySet[Schedule], action: str, note: str = "") -> None:
        """The selected schedules through bulk.bulk_apply: all change, or none and the refusals show."""
        try:
            result = bulk.bulk_apply(
                action,
                ids=list(queryset.values_list("pk", flat=True)),
                note=note,
                source=ChangeSource.ADMIN,
                actor=request.user.get_username(),
            )
        except bulk.BulkRefused as exc:
            self.message_user(request, bulk.describe_refusals(exc.result), messages.ERROR)
            return
        except services.ScheduleInvalid as exc:
            self.message_user(request, f"Nothing was changed: {exc}", messages.ERROR)
            return
        self.message_user(request, bulk.describe(result), messages.SUCCESS)

    @admin.action(description="Run selected schedules now")
    def run_now(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._bulk(request, queryset, bulk.BulkAction.RUN_NOW)

    @admin.action(description="Enable selected schedules (next run computed from now)")
    def enable(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._bulk(request, queryset, bulk.BulkAction.ENABLE)

    @admin.action(description="Disable selected schedules with a note...")
    def disable_with_note(self, request: HttpRequest, queryset: QuerySet[Schedule]):
        form = PauseNoteForm(request.POST if "apply" in request.POST else None)
        if not (form.is_bound and form.is_valid()):
            return _action_form(
                request, queryset, form, action="disable_with_note", submit="Disable",
                intro="Disable these schedules; the note shows until they are enabled again.",
            )  # fmt: skip
        self._bulk(request, queryset, bulk.BulkAction.DISABLE, note=form.cleaned_data["note"])
        return None

    @admin.action(description="Backfill selected schedules...")
    def backfill(self, request: HttpRequest, queryset: QuerySet[Schedule]):
        form = BackfillForm(request.POST if "apply" in request.POST else None)
        if not (form.is_bound and form.is_valid()):
            return _action_form(
                request, queryset, form, action="backfill", submit="Backfill",
                intro="Create a run (trigger backfill) for each slot in the window that has none yet.",
            )  # fmt: skip
        for schedule in queryset:
            try:
                result = services.backfill_schedule(
                    schedule,
                    start=form.cleaned_data["start"],
                    end=form.cleaned_data["end"],
                    overlap_policy=form.cleaned_data["overlap_policy"] or OverlapPolicy.ALLOW,
                )
            except services.ScheduleInvalid as exc:
                self.message_user(request, f"{schedule.name}: {exc}", messages.ERROR)
                continue
            self.message_user(
                request,
                f"{schedule.name}: {result.created} run(s) created, {result.skipped} slot(s) already had one,"
                f" {result.overlap_skipped} skipped by the overlap policy.",
                messages.SUCCESS,
            )
        return None

    @admin.action(description="Disable selected schedules")
    def disable(self, request: HttpRequest, queryset: QuerySet[Schedule]) -> None:
        self._bulk(request, queryset, bulk.BulkAction.DISABLE)


def _action_form(request: HttpRequest, queryset: QuerySet[Schedule], form: forms.Form, **context: str):
    """The intermediate page of an action that needs input (action_form.html posts back to the action)."""
    return TemplateResponse(
        request,
        "admin/schedules/schedule/action_form.html",
        {"queryset": queryset, "form": form, "title": context["submit"], **context},
    )


# --- cancelling runs (schedules/cancelling.py): an action on runs and on history, a button on a run ----


def _may_cancel(request: HttpRequest) -> bool:
    # Whoever may change schedules may stop their runs (viewers may not).
    return request.user.has_perm("schedules.change_schedule")


def _cancel(modeladmin: admin.ModelAdmin, request: HttpRequest, run_ids: list[int]) -> None:
    cancelled, stopping = cancelling.cancel_runs(run_ids, by=request.user.get_username())
    modeladmin.message_user(
        request,
        f"{len(cancelled)} waiting run(s) cancelled, {len(stopping)} running run(s) stopping"
        f" (SIGTERM, SIGKILL after {cancelling.default_grace():g}s); runs already ended are left alone.",
        messages.SUCCESS,
    )


@admin.register(ScheduledRun)
class ScheduledRunAdmin(admin.ModelAdmin):
    """History is written by the scheduler and workers: view only (but its runs may be cancelled)."""

    actions = ["cancel_runs"]

    list_display = [
        "id",
        "schedule",
        "trigger",
        "scheduled_for",
        "status",
        "duration",
        "run_link",
        "worker",
        "error_summary",
    ]
    # No filter by schedule (100,000 choices in the sidebar): the schedule page's "All history" link
    # filters by its id. No date hierarchy (its year list reads every row): a date filter instead.
    list_filter = ["status", "trigger", ("scheduled_for", admin.DateFieldListFilter)]
    list_select_related = ["schedule"]
    search_fields = ["schedule__name", "task_id"]
    # Sorting by another column would sort the whole history; these two walk an index.
    sortable_by = ["id", "scheduled_for"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator

    @admin.display(description="duration")
    def duration(self, scheduled_run: ScheduledRun) -> str:
        return format_duration(scheduled_run.started_at, scheduled_run.finished_at)

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

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return _may_cancel(request)

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[ScheduledRun]) -> None:
        _cancel(self, request, [pk for pk in queryset.values_list("run_id", flat=True) if pk is not None])


@admin.register(ScheduleChange)
class ScheduleChangeAdmin(admin.ModelAdmin):
    """Every write to every schedule, read-only; a deleted schedule's records stay here (filter by its id:
    /admin/schedules/schedulechange/?schedule_id=N), the last one holding every field's last value."""

    list_display = ["at", "schedule_name", "schedule_id", "action", "source", "actor"]
    list_filter = ["action", "source"]
    search_fields = ["schedule_name", "actor"]
    ordering = ["-at", "-id"]
    fields = [
        "schedule_id",
        "schedule_name",
        "schedule_link",
        "action",
        "source",
        "actor",
        "at",
        "field_changes",
    ]
    readonly_fields = fields
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ScheduleChange | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ScheduleChange | None = None) -> bool:
        return False

    @admin.display(description="schedule")
    def schedule_link(self, change: ScheduleChange) -> str:
        if not Schedule.objects.filter(pk=change.schedule_id).exists():
            return "deleted"
        url = reverse("admin:schedules_schedule_change", args=[change.schedule_id])
        return format_html('<a href="{}">{}</a>', url, change.schedule_name)

    @admin.display(description="fields (old -> new)")
    def field_changes(self, change: ScheduleChange) -> str:
        rows = change_log.readable(change.changes)
        if not rows:
            return "-"
        return format_html(
            "<table><tr><th>field</th><th>old</th><th>new</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )


class CalendarAdminForm(forms.ModelForm):
    class Meta:
        model = Calendar
        fields = list(calendar_service.CALENDAR_FIELDS)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.errors:
            return cleaned
        values = {field: cleaned.get(field) for field in calendar_service.CALENDAR_FIELDS}
        values["rules"] = values["rules"] if values["rules"] is not None else []
        for key, messages_ in calendar_service.calendar_errors(values, pk=self.instance.pk).items():
            field = key.split("[")[0].split(".")[0]
            self.add_error(field if field in self.fields else None, [f"{key}: {m}" for m in messages_])
        return cleaned


@admin.register(Calendar)
class CalendarAdmin(admin.ModelAdmin):
    """Calendars: saves go through schedules.calendar_service, so an edit recomputes the next runs of
    the schedules using the calendar, as through the API."""

    form = CalendarAdminForm
    list_display = ["name", "timezone", "updated_at"]
    search_fields = ["name"]
    readonly_fields = ["days_this_year", "created_at", "updated_at"]

    @admin.display(description="days it names this year and next")
    def days_this_year(self, calendar: Calendar) -> str:
        if calendar.pk is None:
            return "-"
        from django.utils import timezone as django_timezone

        year = django_timezone.now().year
        _, _, days = calendar_service.excluded_days(calendar, start=f"{year}-01-01", end=f"{year + 2}-01-01")
        return ", ".join(day.isoformat() for day in days[:400]) or "(none)"

    def save_model(self, request: HttpRequest, obj: Calendar, form: CalendarAdminForm, change: bool) -> None:
        fields = {field: form.cleaned_data.get(field) for field in calendar_service.CALENDAR_FIELDS}
        fields["rules"] = fields["rules"] if fields["rules"] is not None else []
        actor = request.user.get_username()
        if change:
            saved = calendar_service.update_calendar(obj.pk, fields, source=ChangeSource.ADMIN, actor=actor)
        else:
            saved = calendar_service.create_calendar(**fields)
        for field in Calendar._meta.concrete_fields:
            setattr(obj, field.attname, getattr(saved, field.attname))

    def delete_model(self, request: HttpRequest, obj: Calendar) -> None:
        try:
            calendar_service.delete_calendar(obj)
        except calendar_service.CalendarInUse as exc:
            raise PermissionDenied(" ".join(m for ms in exc.errors.values() for m in ms)) from exc

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Calendar]) -> None:
        with transaction.atomic():
            for calendar in queryset:
                self.delete_model(request, calendar)


# The run admin is orchestrator's (which cannot import schedules): this one adds the cancel action and
# button to it.
admin.site.unregister(Run)


@admin.register(Run)
class CancellableRunAdmin(RunAdmin):
    actions = ["cancel_runs"]
    readonly_fields = [*RunAdmin.readonly_fields, "cancel_button"]

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return _may_cancel(request)

    @admin.action(description="Cancel selected runs", permissions=["cancel"])
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[Run]) -> None:
        _cancel(self, request, list(queryset.values_list("pk", flat=True)))

    @admin.display(description="cancel")
    def cancel_button(self, run: Run) -> str:
        if run.pk is None or run.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            return "-"
        # Inside the change page's form, which carries the CSRF token.
        url = reverse("admin:orchestrator_run_cancel", args=[run.pk])
        return format_html('<button type="submit" formaction="{}" formmethod="post">Cancel run</button>', url)

    def get_urls(self):
        cancel = path(
            "<path:object_id>/cancel/",
            self.admin_site.admin_view(self.cancel_view),
            name="orchestrator_run_cancel",
        )
        return [cancel, *super().get_urls()]

    def cancel_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The run page's "Cancel run" button, as POST /api/runs/{id}/cancel."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not object_id.isdigit():
            raise Http404("No such run.")
        if not _may_cancel(request):
            raise PermissionDenied
        try:
            run = cancelling.cancel_run(int(object_id), by=request.user.get_username())
        except cancelling.RunNotFound as exc:
            raise Http404(str(exc)) from exc
        except cancelling.RunFinished as exc:
            self.message_user(request, str(exc), messages.WARNING)
        else:
            done = "cancelled" if run.status == RunStatus.CANCELLED else "stopping (SIGTERM, then SIGKILL)"
            self.message_user(request, f"Run {run.pk} {done}.", messages.SUCCESS)
        return HttpResponseRedirect(reverse("admin:orchestrator_run_change", args=[object_id]))
