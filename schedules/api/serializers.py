"""Schedule API shapes. Types and field shapes are checked here; the rules live in schedules.services."""

from __future__ import annotations

from django.db.models import Q
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orchestrator.api.serializers import (
    AttemptSerializer,
    DirectiveRefField,
    ParamsField,
    RetryPolicyField,
    job_key_field,
    run_attempts,
)
from project.api import StrictFieldsMixin
from schedules import calendars, cancelling, services, timing
from schedules.bulk import MAX_BULK, BulkAction
from schedules.labels import label_errors
from schedules.models import (
    RUN_AFTER_STATUSES,
    Calendar,
    CalendarPolicy,
    OverlapPolicy,
    Schedule,
    ScheduleChange,
    ScheduledRun,
)
from schedules.services import MAX_DIRECTIVE_TEXT, MAX_PREVIEW_COUNT, PAUSE_NOTE_MAX, PREVIEW_COUNT

UPCOMING_COUNT = 5


@extend_schema_field(
    {
        "type": "object",
        "additionalProperties": {"type": "string", "maxLength": 63},
        "example": {"team": "payments", "tier": "batch"},
    }
)
class LabelsField(serializers.JSONField):
    """key=value labels with Kubernetes' syntax (schedules/labels.py); a bad one is a 400 naming its key."""

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if problems := label_errors(value):
            raise serializers.ValidationError(problems)
        return value


# Upstreams one schedule may name (a fan-in wider than this is a mistake, and bounds one request's work).
MAX_UPSTREAMS = 100
_MAX_ID = 2**63 - 1


@extend_schema_field(
    {
        "type": "array",
        "items": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        "maxItems": MAX_UPSTREAMS,
        "example": ["nightly-extract"],
        "description": "Upstream schedules, by id or name; responses give names.",
    }
)
class RunAfterField(serializers.Field):
    """run_after: upstream schedules by id (an integer) or name (a string); shown as names, sorted."""

    def to_internal_value(self, data):
        if not isinstance(data, list):
            raise serializers.ValidationError("Must be a list of schedule ids or names.")
        if len(data) > MAX_UPSTREAMS:
            raise serializers.ValidationError(f"At most {MAX_UPSTREAMS} upstream schedules.")
        ids, names = set(), set()
        for item in data:
            if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= _MAX_ID:
                ids.add(item)
            elif isinstance(item, str) and 0 < len(item) <= 200:
                names.add(item)
            else:
                raise serializers.ValidationError(f"{item!r} is not a schedule id or name.")
        found = list(Schedule.objects.filter(Q(pk__in=ids) | Q(name__in=names)).order_by("pk"))
        missing = [f"id {i}" for i in sorted(ids - {s.pk for s in found})]
        missing += [repr(n) for n in sorted(names - {s.name for s in found})]
        if missing:
            raise serializers.ValidationError(f"No such schedule: {', '.join(missing)}.")
        return found

    def to_representation(self, value):
        return sorted(schedule.name for schedule in value.all())


@extend_schema_field(
    {
        "type": "array",
        "items": {"type": "string", "enum": list(RUN_AFTER_STATUSES)},
        "example": ["succeeded"],
    }
)
class RunAfterStatusesField(serializers.JSONField):
    """run_after_statuses: JSON as sent; the rules (a non-empty list of run ends) are the service's."""


class ScheduledRunSerializer(serializers.ModelSerializer):
    run_status = serializers.CharField(source="run.status", read_only=True, default=None, allow_null=True)
    # The params the run was launched with (a run-now's override included); null for a skipped slot.
    params = ParamsField(source="run.params", read_only=True, default=None, allow_null=True)
    attempt = serializers.IntegerField(source="run.attempt", read_only=True, default=None, allow_null=True)
    retry_at = serializers.DateTimeField(source="run.retry_at", read_only=True, default=None, allow_null=True)
    attempts = serializers.SerializerMethodField()

    class Meta:
        model = ScheduledRun
        fields = [
            "id",
            "schedule",
            "run",
            "run_status",
            "trigger",
            "scheduled_for",
            "status",
            "task_id",
            "worker",
            "heartbeat_at",
            "created_at",
            "published_at",
            "started_at",
            "finished_at",
            "error_summary",
            "upstream_run",
            "dependency_date",
            "params",
            "attempt",
            "retry_at",
            "attempts",
        ]
        read_only_fields = fields

    @extend_schema_field(AttemptSerializer(many=True))
    def get_attempts(self, scheduled_run: ScheduledRun) -> list[dict]:
        """The run's attempts: number, outcome, error, times (empty for a skipped slot)."""
        return [] if scheduled_run.run is None else run_attempts(scheduled_run.run)


class ScheduleSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """Input and output of /api/schedules/. `job_key` names the job; `directive` takes an id or a key."""

    job_key = job_key_field()
    directive = DirectiveRefField(required=False, allow_null=True)
    # Not CharField(source="directive.key", default=None): DRF skips a field that falls back to its
    # default in a partial (PATCH) serializer, so the PATCH response would lack directive_key.
    directive_key = serializers.SlugRelatedField(
        source="directive", slug_field="key", read_only=True, allow_null=True
    )
    custom_directive_text = serializers.CharField(
        required=False, allow_blank=True, max_length=MAX_DIRECTIVE_TEXT, trim_whitespace=False
    )
    params = ParamsField(
        required=False,
        help_text="Inputs for each run, checked against the job's params_schema (a 400 names the failing"
        " path). Stored and shown in history: never put secrets here.",
    )
    labels = LabelsField(
        required=False,
        help_text='key=value pairs as in Kubernetes, e.g. {"team": "payments"}: what ?label= and a bulk'
        " selector match.",
    )
    retry_policy = RetryPolicyField(
        required=False,
        allow_null=True,
        help_text="Overrides the job's retry policy (null: the job's). Missing keys take the defaults.",
    )
    run_after = RunAfterField(
        required=False,
        help_text="Upstream schedules (ids or names): when a run of one ends in one of run_after_statuses,"
        " this schedule gets a run with trigger `dependency`. Responses give names.",
    )
    run_after_statuses = RunAfterStatusesField(
        required=False,
        help_text="The upstream run ends that start a run of this schedule: any of succeeded, failed,"
        ' cancelled (default ["succeeded"]).',
    )
    run_before = RunAfterField(
        read_only=True, help_text="The schedules that run after this one (their run_after names it)."
    )
    upcoming = serializers.SerializerMethodField()
    runs_remaining = serializers.SerializerMethodField()
    next_run_note = serializers.SerializerMethodField()
    alert_webhook_set = serializers.SerializerMethodField()

    class Meta:
        model = Schedule
        fields = [
            "id",
            "name",
            "job_key",
            "job",
            "directive",
            "directive_key",
            "custom_directive_text",
            "enabled",
            "schedule_type",
            "interval_minutes",
            "cron_expr",
            "timezone",
            "task3_scope",
            "max_global",
            "max_per_job",
            "misfire_policy",
            "overlap_policy",
            "jitter_seconds",
            "start_at",
            "end_at",
            "max_runs",
            "runs_remaining",
            "scheduled_run_count",
            "catchup_window_seconds",
            "history_keep",
            "alert_after_failures",
            "alert_after_seconds",
            "alert_webhook_url",
            "alert_webhook_set",
            "pause_after_failures",
            "params",
            "labels",
            "exclude_calendars",
            "only_calendars",
            "calendar_policy",
            "retry_policy",
            "run_after",
            "run_after_statuses",
            "run_after_mode",
            "run_before",
            "paused_note",
            "paused_at",
            "paused_by",
            "managed",
            "last_run_at",
            "next_run_at",
            "next_run_note",
            "upcoming",
            "claimed_by",
            "claimed_until",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "job",
            "scheduled_run_count",
            "paused_note",
            "paused_at",
            "paused_by",
            "managed",
            "last_run_at",
            "next_run_at",
            "claimed_by",
            "claimed_until",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {
            "exclude_calendars": {
                "help_text": "Calendar ids: a slot on one of their days or in one of their windows (read in"
                " the calendar's zone) is ruled out.",
            },
            "only_calendars": {
                "help_text": "Calendar ids: only the slots on one of their days (or in a window) are kept.",
            },
            "calendar_policy": {
                "help_text": "What a ruled-out slot becomes: skip (recorded skipped, naming the calendar) or"
                " next_allowed (run at the same local time on the next allowed day).",
            },
            "pause_after_failures": {
                "min_value": 1,
                "help_text": "Disable the schedule after this many consecutive failed slots, with the note"
                " 'paused after N consecutive failures' (null: never). Enable clears it and counts afresh.",
            },
            "run_after_mode": {
                "help_text": "any: a run for each qualifying upstream run; all: one run per date (this"
                " schedule's timezone) once every upstream has a qualifying run scheduled that date.",
            },
            "schedule_type": {
                "help_text": "interval | cron | none (no timing of its own: runs only after run_after).",
            },
            # Uniqueness is a service rule (shared with the admin, and raced-for in the database).
            "name": {"validators": []},
            # A webhook URL carries its token: written, never read back (alert_webhook_set says if any).
            "alert_webhook_url": {
                "write_only": True,
                "help_text": "http(s) URL that must resolve to public addresses only, unless its host is in"
                " ALERT_WEBHOOK_ALLOWED_HOSTS (checked on save and on each send). Empty: ALERT_WEBHOOK_URLS.",
            },
        }

    @extend_schema_field(serializers.ListField(child=serializers.DateTimeField()))
    def get_upcoming(self, schedule: Schedule) -> list[str]:
        """The next run times, as the admin, the dashboard and a preview show them
        (timing.upcoming_runs): next_run_at and the runs after it, jitter applied, within the bounds and
        the runs max_runs leaves; none while disabled."""
        field = serializers.DateTimeField()
        return [field.to_representation(t) for t in services.upcoming_runs(schedule, UPCOMING_COUNT)]

    def get_alert_webhook_set(self, schedule: Schedule) -> bool:
        """Whether the schedule has a webhook of its own (instead of ALERT_WEBHOOK_URLS)."""
        return bool(schedule.alert_webhook_url)

    def get_runs_remaining(self, schedule: Schedule) -> int | None:
        """max_runs minus the scheduled and backfilled runs so far (manual runs do not count)."""
        if schedule.max_runs is None:
            return None
        return max(0, schedule.max_runs - schedule.scheduled_run_count)

    def get_next_run_note(self, schedule: Schedule) -> str | None:
        """Why there is no next run, when there is none: past end_at, max_runs completed, disabled."""
        if schedule.pk is None:
            return None
        if schedule.max_runs is not None and schedule.scheduled_run_count >= schedule.max_runs:
            return f"completed: {schedule.scheduled_run_count} of max_runs {schedule.max_runs} runs"
        if _ended(schedule):
            return f"ended: no slot left before end_at ({schedule.end_at.isoformat()})"
        if not schedule.enabled:
            return "disabled" + (f": {schedule.paused_note}" if schedule.paused_note else "")
        if schedule.next_run_at is None and _calendared(schedule):
            return (
                f"no run allowed by its calendars within {timing.MAX_CALENDAR_DAYS} days"
                f" ({timing.MAX_CALENDAR_SLOTS} slots)"
            )
        if schedule.schedule_type == "none":
            upstreams = sorted(u.name for u in schedule.run_after.all())
            return f"runs only after {', '.join(upstreams)}" if upstreams else "runs only after its upstreams"
        if schedule.next_run_at is None:
            return "ended: no slot left before the end of year 9999"
        if _calendared(schedule) and not services.upcoming_runs(schedule, 1):
            return (
                f"every slot in the next {timing.MAX_CALENDAR_DAYS} days is ruled out by its calendars"
                " (each is recorded skipped)"
            )
        return None


def _calendared(schedule: Schedule) -> bool:
    return bool(schedule.exclude_calendars.all() or schedule.only_calendars.all())


def _ended(schedule: Schedule) -> bool:
    """Past end_at: no slot is left (the scheduler or a save set next_run_at to null)."""
    return schedule.end_at is not None and schedule.next_run_at is None


class RunCancelSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/runs/{id}/cancel: an optional grace for a running run's tasks."""

    cancel_grace_seconds = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=cancelling.MAX_GRACE_SECONDS,
        help_text="Seconds between SIGTERM and SIGKILL to the run's task processes (0: SIGKILL at once);"
        " default CANCEL_GRACE_SECONDS (10).",
    )


class RunNowSerializer(serializers.Serializer):
    """POST /api/schedules/{id}/run-now: optional params; their keys replace the schedule's for this run.

    Not strict about other keys, as DisableSerializer: run-now took no body before params existed, and
    clients that send one (a schedule's own fields, say) must keep working. `params` itself is checked.
    """

    params = ParamsField(
        required=False,
        help_text="Keys replacing the schedule's params for this run only; the result is checked against"
        " the job's params_schema.",
    )


class DisableSerializer(serializers.Serializer):
    """POST /api/schedules/{id}/disable: an optional note on why, shown until enable clears it.

    Not strict about other keys: disable took no body before notes existed, and clients that send one
    (a schedule's own fields, say) must keep working.
    """

    note = serializers.CharField(required=False, allow_blank=True, max_length=PAUSE_NOTE_MAX, default="")


class PreviewSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/schedules/preview: a schedule's timing fields (the rules are create's)."""

    name = serializers.CharField(required=False, allow_blank=True, max_length=200)
    schedule_type = serializers.CharField()
    interval_minutes = serializers.IntegerField(required=False, allow_null=True)
    cron_expr = serializers.CharField(required=False, allow_blank=True, max_length=200)
    timezone = serializers.CharField(required=False, max_length=64)
    jitter_seconds = serializers.IntegerField(required=False, min_value=0)
    start_at = serializers.DateTimeField(required=False, allow_null=True)
    end_at = serializers.DateTimeField(required=False, allow_null=True)
    max_runs = serializers.IntegerField(required=False, allow_null=True)
    exclude_calendars = serializers.PrimaryKeyRelatedField(
        many=True, required=False, queryset=Calendar.objects.all(), help_text="Calendar ids."
    )
    only_calendars = serializers.PrimaryKeyRelatedField(
        many=True, required=False, queryset=Calendar.objects.all(), help_text="Calendar ids."
    )
    calendar_policy = serializers.ChoiceField(choices=CalendarPolicy.choices, required=False)
    after = serializers.DateTimeField(
        required=False, help_text="Preview as if the schedule were saved at this instant (default: now)."
    )
    count = serializers.IntegerField(
        required=False, default=PREVIEW_COUNT, min_value=1, max_value=MAX_PREVIEW_COUNT
    )


class ExcludedSlotSerializer(serializers.Serializer):
    time = serializers.DateTimeField(help_text="The schedule's own slot.")
    reason = serializers.CharField(help_text="Which calendar rules it out.")


class PreviewResultSerializer(serializers.Serializer):
    times = serializers.ListField(child=serializers.DateTimeField())
    description = serializers.CharField()
    excluded = serializers.SerializerMethodField()

    @extend_schema_field(ExcludedSlotSerializer(many=True))
    def get_excluded(self, preview: services.Preview) -> list[dict]:
        """The schedule's own slots up to the last time shown that its calendars rule out (with
        next_allowed, the slots whose runs moved), and which calendar did."""
        return ExcludedSlotSerializer([{"time": t, "reason": r} for t, r in preview.excluded], many=True).data


class BackfillSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/schedules/{id}/backfill: the slots in [start, end)."""

    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    overlap_policy = serializers.ChoiceField(
        choices=OverlapPolicy.choices,
        default=OverlapPolicy.ALLOW,
        help_text="For the backfilled slots (not the schedule's): allow (default) runs each one.",
    )


class BackfillResultSerializer(serializers.Serializer):
    created = serializers.IntegerField(help_text="Runs created (trigger backfill).")
    skipped = serializers.IntegerField(help_text="Slots that already had a run: left alone.")
    overlap_skipped = serializers.IntegerField(help_text="Slots recorded skipped by the overlap policy.")
    slots = serializers.IntegerField(help_text="Slots in [start, end).")


class ScheduleChangeSerializer(serializers.ModelSerializer):
    class Meta:
        model = ScheduleChange
        fields = ["id", "schedule_id", "schedule_name", "action", "source", "actor", "at", "changes"]
        read_only_fields = fields


class SelectorSerializer(StrictFieldsMixin, serializers.Serializer):
    """Which schedules a bulk operation acts on: every given part must match (AND)."""

    labels = LabelsField(required=False, help_text="Schedules carrying all of these labels.")
    job_key = serializers.CharField(required=False, max_length=100, help_text="Schedules of this job.")
    name_prefix = serializers.CharField(
        required=False, max_length=200, help_text="Schedules whose name starts with this."
    )


class BulkSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/schedules/bulk: one action on the schedules named by `ids` or matched by `selector`."""

    action = serializers.ChoiceField(choices=BulkAction.choices)
    ids = serializers.ListField(
        child=serializers.IntegerField(min_value=1),
        required=False,
        allow_empty=False,
        max_length=MAX_BULK,
        help_text=f"Schedule ids (at most {MAX_BULK}); give this or selector.",
    )
    selector = SelectorSerializer(
        required=False, help_text=f"Give this or ids; it may match at most {MAX_BULK} schedules."
    )
    note = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=PAUSE_NOTE_MAX,
        default="",
        help_text="For disable: why (shown as each schedule's paused_note until enable clears it).",
    )
    dry_run = serializers.BooleanField(
        required=False, default=False, help_text="Judge and answer as a real call would; write nothing."
    )


class BulkItemSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    scheduled_run = serializers.IntegerField(
        required=False, allow_null=True, help_text="run-now: the new scheduled run (null in a dry run)."
    )


class BulkRefusedItemSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField(allow_null=True, help_text="Null for an id that names no schedule.")
    reasons = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        help_text='Why, by field: {"managed": ["..."]}.',
    )


class BulkResultSerializer(serializers.Serializer):
    action = serializers.CharField()
    dry_run = serializers.BooleanField()
    changed = BulkItemSerializer(many=True, help_text="Changed (would be, in a dry run or a 409).")
    unchanged = BulkItemSerializer(many=True, help_text="Already as asked: nothing to do.")
    refused = BulkRefusedItemSerializer(many=True, help_text="Refused, and why; empty unless 409.")


class BulkRefusedSerializer(BulkResultSerializer):
    detail = serializers.CharField()


# --- Calendars ------------------------------------------------------------------------------------------


class CalendarSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """Input and output of /api/calendars/: the rules are checked by schedules.calendar_service (a 400
    names the rule and key, e.g. `rules[2].nth_weekday.n`)."""

    rules = serializers.JSONField(
        required=False,
        help_text='A list of rules: {"date": "2026-12-25"}, {"start": "2026-12-24", "end": "2027-01-02"}'
        ' (end exclusive), {"yearly": "12-25"}, {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}}'
        ' (n = -1: the last), {"weekdays": ["sat", "sun"]}, {"cron": "* 0-6 * * *"} (a window).',
    )
    holidays = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text='Days of the holidays package: {"country": "US", "subdiv": "NY", "years": [2027]} or'
        ' {"market": "NYSE", "years": [2027]}; null for none.',
    )
    schedules = serializers.SerializerMethodField()

    class Meta:
        model = Calendar
        fields = ["id", "name", "timezone", "rules", "holidays", "schedules", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        # Uniqueness is a service rule (shared with the admin, and raced-for in the database).
        extra_kwargs = {"name": {"validators": []}}

    def get_schedules(self, calendar: Calendar) -> list[int]:
        """Ids of the schedules that use it (exclude or only)."""
        ids = {s.pk for s in calendar.excluding_schedules.all()} | {
            s.pk for s in calendar.only_schedules.all()
        }
        return sorted(ids)


class CalendarDaysSerializer(serializers.Serializer):
    calendar = serializers.IntegerField()
    start = serializers.DateField()
    end = serializers.DateField()
    days = serializers.ListField(
        child=serializers.DateField(), help_text="The days it names, in [start, end)."
    )


class CalendarImportSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/calendars/{id}/import: an iCalendar file, as text in `ics` (or as a multipart `file`)."""

    ics = serializers.CharField(
        max_length=2_000_000, trim_whitespace=False, help_text="The .ics file's text (BEGIN:VCALENDAR ...)."
    )


class CalendarUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="An .ics file.")


class CalendarImportResultSerializer(serializers.Serializer):
    added = serializers.IntegerField(help_text="Rules the file added (those already present are kept once).")
    calendar = CalendarSerializer()


MAX_DAYS_RANGE = calendars.MAX_DAYS_RANGE
