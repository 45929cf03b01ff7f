"""Job, directive and run endpoints. Launching a run (POST /api/runs/) is schedules.api's RunLaunchViewSet."""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.db.models import ProtectedError, QuerySet
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from orchestrator.api.serializers import DirectiveSerializer, JobSerializer, RunSerializer
from orchestrator.models import Directive, Job, Run, RunStatus, Trigger
from project.api import ApiViewMixin, ErrorDetailSerializer

# Unique constraints a concurrent request can still hit after validation passed.
_DIRECTIVE_UNIQUE = {"orchestrator_directive_key_key": "key"}


@extend_schema_view(
    partial_update=extend_schema(
        examples=[
            OpenApiExample(
                "caps",
                value={"max_concurrency": 2, "timeout_seconds": 600},
                summary="At most 2 at once, 10 minutes each",
                request_only=True,
            )
        ]
    )
)
class JobViewSet(
    ApiViewMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Jobs come from the code registry; their caps, timeout and allowlist are editable."""

    queryset = Job.objects.all()
    serializer_class = JobSerializer
    lookup_field = "key"
    lookup_value_regex = "[-a-zA-Z0-9_]+"
    http_method_names = ["get", "patch", "head", "options"]


@extend_schema_view(
    create=extend_schema(
        examples=[
            OpenApiExample(
                "triage",
                value={
                    "key": "triage-auth",
                    "name": "Triage authentication failures",
                    "text": "Focus on SSH and sudo failures; group them by source address.",
                    "job_key": "log_triage",
                },
                summary="Instructions for log_triage",
                request_only=True,
            )
        ]
    )
)
class DirectiveViewSet(ApiViewMixin, viewsets.ModelViewSet):
    """Named instructions a job's runs follow; a schedule or a launch names one by id or key."""

    queryset = Directive.objects.select_related("job")
    serializer_class = DirectiveSerializer
    lookup_value_regex = "[0-9]+"
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]

    def _save(self, serializer: DirectiveSerializer) -> None:
        try:
            with transaction.atomic():
                serializer.save()
        except IntegrityError as exc:
            constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
            if constraint not in _DIRECTIVE_UNIQUE:
                raise
            raise ValidationError(
                {_DIRECTIVE_UNIQUE[constraint]: ["A directive with this key already exists."]}
            ) from exc

    perform_create = _save
    perform_update = _save

    @extend_schema(
        responses={
            204: None,
            409: OpenApiResponse(ErrorDetailSerializer, description="Schedules still use the directive."),
        }
    )
    def destroy(self, request, *args, **kwargs) -> Response:
        directive = self.get_object()
        try:
            directive.delete()
        except ProtectedError as exc:
            names = sorted(str(obj) for obj in exc.protected_objects)[:10]
            return Response(
                {"detail": f"Directive is used by schedules: {', '.join(names)}. Change them first."},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(status=status.HTTP_204_NO_CONTENT)


def _choice(params, name: str, values: list[str]) -> str | None:
    value = params.get(name)
    if value is not None and value not in values:
        raise ValidationError({name: [f"Unknown {name} {value!r}; one of {', '.join(values)}."]})
    return value


@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("status", enum=RunStatus.values, required=False),
            OpenApiParameter("trigger", enum=Trigger.values, required=False),
            OpenApiParameter("job_key", str, required=False),
        ]
    )
)
class RunViewSet(ApiViewMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Runs, newest first; filter with ?status=, ?trigger=, ?job_key=."""

    queryset = Run.objects.select_related("job", "directive").prefetch_related("attempts")
    serializer_class = RunSerializer
    lookup_value_regex = "[0-9]+"

    def get_queryset(self) -> QuerySet[Run]:
        runs = super().get_queryset()
        if self.action != "list":
            return runs
        params = self.request.query_params
        if (wanted := _choice(params, "status", RunStatus.values)) is not None:
            runs = runs.filter(status=wanted)
        if (wanted := _choice(params, "trigger", Trigger.values)) is not None:
            runs = runs.filter(trigger=wanted)
        if (job_key := params.get("job_key")) is not None:
            runs = runs.filter(job__key=job_key)
        return runs
