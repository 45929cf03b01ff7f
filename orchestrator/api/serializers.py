"""Job, directive and run API shapes."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from orchestrator import retry_policy
from orchestrator.models import Directive, Job, Run, Task3Scope
from orchestrator.rates import RATE_LIMIT_HELP, parse_rate_limit
from project.api import StrictFieldsMixin

# Directive text is instructions, not a payload (the same bound as schedules.services.MAX_DIRECTIVE_TEXT).
MAX_DIRECTIVE_TEXT = 100_000
MAX_ALLOWLIST_ITEMS = 1000
MAX_ALLOWLIST_ITEM_LENGTH = 500


@extend_schema_field({"oneOf": [{"type": "integer"}, {"type": "string"}], "nullable": True})
class DirectiveRefField(serializers.RelatedField):
    """A directive by id (a JSON number) or by key (a JSON string); rendered as its id."""

    default_error_messages = {
        "does_not_exist": "No directive with {kind} {value!r}.",
        "incorrect_type": "Expected a directive id (number) or key (string), got {data_type}.",
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("queryset", Directive.objects.all())
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Directive:
        if isinstance(data, bool) or not isinstance(data, int | str):
            self.fail("incorrect_type", data_type=type(data).__name__)
        kind = "id" if isinstance(data, int) else "key"
        try:
            return self.get_queryset().get(**{"pk" if kind == "id" else "key": data})
        except (Directive.DoesNotExist, ValueError, OverflowError):
            self.fail("does_not_exist", kind=kind, value=data)

    def to_representation(self, value: Directive) -> int:
        return value.pk


@extend_schema_field({"type": "object", "additionalProperties": True})
class ParamsField(serializers.JSONField):
    """A run's inputs: a JSON object, checked against the job's `params_schema` by the services (a 400
    naming the failing path: `{"params": ["$.min_severity: 'x' is not one of [...]"]}`)."""


# The OpenAPI shape of a retry policy (orchestrator/retry_policy.py checks it, with the same bounds).
RETRY_POLICY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_attempts": {
            "type": "integer",
            "minimum": 1,
            "maximum": retry_policy.MAX_ATTEMPTS_LIMIT,
            "description": "Attempts in all; 1 = no retry.",
        },
        "initial_interval_seconds": {
            "type": "number",
            "minimum": 0,
            "maximum": retry_policy.MAX_INTERVAL_LIMIT,
            "description": "The wait after the first attempt.",
        },
        "backoff_coefficient": {
            "type": "number",
            "minimum": 1,
            "maximum": retry_policy.MAX_COEFFICIENT,
            "description": "Each wait is the previous one times this (1: a fixed wait).",
        },
        "max_interval_seconds": {
            "type": "number",
            "minimum": 0,
            "maximum": retry_policy.MAX_INTERVAL_LIMIT,
            "description": "No wait is longer.",
        },
        "retry_on": {
            "type": "array",
            "uniqueItems": True,
            "items": {"type": "string", "enum": list(retry_policy.RETRY_ON_CHOICES)},
            "description": "Which endings are retried: failed, timed_out (a time limit), worker_lost.",
        },
    },
}


@extend_schema_field(RETRY_POLICY_SCHEMA)
class RetryPolicyField(serializers.JSONField):
    """A retry policy: missing keys take the defaults; a 400 names each wrong key
    (`{"retry_policy": {"max_attempts": ["..."]}}`)."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        data = super().to_internal_value(data)
        if errors := retry_policy.policy_errors(data):
            raise serializers.ValidationError(errors)
        return retry_policy.policy_normalized(data)


class AttemptSerializer(serializers.Serializer):
    """One attempt of a run: its number, outcome, error and times."""

    attempt = serializers.IntegerField()
    outcome = serializers.CharField(
        help_text="succeeded | failed | timed_out | worker_lost | cancelled, or the run's status while"
        " this attempt has not ended (queued, running)."
    )
    error_summary = serializers.CharField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    worker = serializers.CharField()


def run_attempts(run: Run) -> list[dict[str, Any]]:
    """Every attempt of `run` so far (Run.attempt_history), shaped for the API."""
    return AttemptSerializer(run.attempt_history(), many=True).data


class JobKeyField(serializers.SlugRelatedField):
    """SlugRelatedField, except that only a non-empty string is a key.

    DRF's RelatedField would read "" as null, and look a number up as its string.
    """

    def run_validation(self, data: Any = serializers.empty) -> Any:
        if data == "" or (data is not serializers.empty and data is not None and not isinstance(data, str)):
            self.fail("invalid")
        return super().run_validation(data)


def job_key_field(**kwargs: Any) -> serializers.SlugRelatedField:
    """A job named by its key; an unknown key is a 400 on this field."""
    return JobKeyField(
        slug_field="key",
        queryset=Job.objects.all(),
        source="job",
        error_messages={"does_not_exist": "No job with key {value!r}.", "invalid": "Expected a job key."},
        **kwargs,
    )


class JobSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    """Jobs come from the code registry: key and queue are fixed, the settings are editable."""

    max_concurrency = serializers.IntegerField(
        min_value=1, max_value=2**31 - 1, allow_null=True, required=False
    )
    timeout_seconds = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)
    task3_allowlist = serializers.ListField(
        child=serializers.CharField(max_length=MAX_ALLOWLIST_ITEM_LENGTH),
        max_length=MAX_ALLOWLIST_ITEMS,
        required=False,
    )
    rate_limit = serializers.CharField(
        max_length=32, allow_null=True, allow_blank=True, required=False, help_text=RATE_LIMIT_HELP
    )
    retry_policy = RetryPolicyField(
        required=False, help_text="How a failed run of this job is retried (a schedule may override it)."
    )

    class Meta:
        model = Job
        fields = [
            "key",
            "name",
            "description",
            "enabled",
            "queue",
            "max_concurrency",
            "timeout_seconds",
            "task3_allowlist",
            "rate_limit",
            "retry_policy",
            "params_schema",
        ]
        # params_schema is the job's code's (orchestrator/jobs/registry.py), synced at migrate.
        read_only_fields = ["key", "queue", "params_schema"]

    def validate_rate_limit(self, value: str | None) -> str | None:
        """Stored in its canonical form (`10/m`); blank means no limit."""
        try:
            rate = parse_rate_limit(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        return None if rate is None else str(rate)


class DirectiveSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    job_key = job_key_field(required=False, allow_null=True)
    text = serializers.CharField(max_length=MAX_DIRECTIVE_TEXT, trim_whitespace=False)

    class Meta:
        model = Directive
        fields = ["id", "key", "name", "text", "job_key", "job"]
        read_only_fields = ["id", "job"]


class RunSerializer(serializers.ModelSerializer):
    job_key = serializers.CharField(source="job.key", read_only=True)
    # Not CharField(source="directive.key", default=None): DRF skips a field that falls back to its
    # default in a partial (PATCH) serializer, so the PATCH response would lack directive_key.
    directive_key = serializers.SlugRelatedField(
        source="directive", slug_field="key", read_only=True, allow_null=True
    )
    attempts = serializers.SerializerMethodField()

    class Meta:
        model = Run
        fields = [
            "id",
            "job_key",
            "job",
            "directive",
            "directive_key",
            "custom_directive_text",
            "trigger",
            "task3_scope",
            "status",
            "created_at",
            "started_at",
            "finished_at",
            "error_summary",
            "stats",
            "llm_calls",
            "llm_prompt_tokens",
            "llm_completion_tokens",
            "task_id",
            "worker",
            "heartbeat_at",
            "attempt",
            "published_at",
            "params",
            "scheduled_for",
            "previous_scheduled_for",
            "retry_at",
            "attempts",
            "cancel_requested_at",
            "cancel_deadline",
            "cancelled_by",
        ]
        read_only_fields = fields

    @extend_schema_field(AttemptSerializer(many=True))
    def get_attempts(self, run: Run) -> list[dict[str, Any]]:
        """Each attempt's number, outcome, error and times (more than one when the run was retried)."""
        return run_attempts(run)


class RunLaunchSerializer(StrictFieldsMixin, serializers.Serializer):
    """POST /api/runs/: which job, with which instructions, acting on what."""

    job_key = job_key_field()
    directive = DirectiveRefField(required=False, allow_null=True, default=None)
    custom_directive_text = serializers.CharField(
        required=False, allow_blank=True, default="", max_length=MAX_DIRECTIVE_TEXT, trim_whitespace=False
    )
    task3_scope = serializers.ChoiceField(choices=Task3Scope.choices, default=Task3Scope.ALLOWLIST)
    params = ParamsField(
        required=False,
        default=dict,
        help_text="The run's inputs, checked against the job's params_schema. Stored and shown: no secrets.",
    )
