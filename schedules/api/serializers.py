"""Schedule API shapes. Types and field shapes are checked here; the rules live in schedules.services."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orchestrator.api.serializers import DirectiveRefField, job_key_field
from project.api import StrictFieldsMixin
from schedules import timing
from schedules.models import Schedule, ScheduledRun
from schedules.services import MAX_DIRECTIVE_TEXT

UPCOMING_COUNT = 5


class ScheduledRunSerializer(serializers.ModelSerializer):
    run_status = serializers.CharField(source="run.status", read_only=True, default=None, allow_null=True)

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
        ]
        read_only_fields = fields


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
    upcoming = serializers.SerializerMethodField()

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
            "last_run_at",
            "next_run_at",
            "upcoming",
            "claimed_by",
            "claimed_until",
            "created_at",
            "updated_at",
        ]
        read_only_fields = [
            "id",
            "job",
            "last_run_at",
            "next_run_at",
            "claimed_by",
            "claimed_until",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {
            # Uniqueness is a service rule (shared with the admin, and raced-for in the database).
            "name": {"validators": []},
        }

    @extend_schema_field(serializers.ListField(child=serializers.DateTimeField()))
    def get_upcoming(self, schedule: Schedule) -> list[str]:
        """The next run times: next_run_at and the slots after it."""
        spec = timing.spec_of(schedule)
        try:
            if schedule.next_run_at is not None:
                times = [
                    schedule.next_run_at,
                    *timing.upcoming(spec, after=schedule.next_run_at, n=UPCOMING_COUNT - 1),
                ]
            else:
                times = timing.upcoming(spec, after=timezone.now(), n=UPCOMING_COUNT)
        except Exception:
            # A row written around the API (a shell, an old release) must not make the listing fail.
            return []
        field = serializers.DateTimeField()
        return [field.to_representation(t) for t in times]
