"""GET /api/runs/{id}/findings: a run's findings, most severe first (the order triage stored them)."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404
from django.urls import re_path
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers
from rest_framework.exceptions import ValidationError

from orchestrator.models import Finding, Run, Severity
from project.api import ApiViewMixin


class FindingSerializer(serializers.ModelSerializer):
    class Meta:
        model = Finding
        fields = [
            "id",
            "run",
            "rule",
            "severity",
            "subject",
            "count",
            "first_seen",
            "last_seen",
            "source_file",
            "risk_score",
        ]
        read_only_fields = fields


@extend_schema(
    summary="A run's findings",
    parameters=[
        OpenApiParameter(
            "severity", str, enum=Severity.values, description="Only findings of this severity."
        ),
        OpenApiParameter("rule", str, description="Only findings of this rule, e.g. `ssh_brute_force`."),
    ],
)
class RunFindingsView(ApiViewMixin, generics.ListAPIView):
    """Paginated (the API's page size); 404 for an unknown run. Filter by `?severity=` or `?rule=`."""

    serializer_class = FindingSerializer

    def get_queryset(self) -> QuerySet[Finding]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no run in the URL
            return Finding.objects.none()
        run_id = self.kwargs["run_id"]
        if not Run.objects.filter(pk=run_id).exists():
            raise Http404("No such run.")
        queryset = Finding.objects.filter(run_id=run_id).order_by("id")
        params = self.request.query_params
        # An unknown severity is a 400 naming it (as ?status= on /api/runs/), not an empty page.
        if (severity := params.get("severity")) is not None:
            if severity not in Severity.values:
                known = ", ".join(Severity.values)
                raise ValidationError({"severity": [f"Unknown severity {severity[:50]!r}; one of {known}."]})
            queryset = queryset.filter(severity=severity)
        if rule := params.get("rule"):
            queryset = queryset.filter(rule=rule)
        return queryset


# Included from project/urls.py; with or without the trailing slash, as every API path.
urlpatterns = [
    re_path(r"^api/runs/(?P<run_id>[0-9]{1,18})/findings/?$", RunFindingsView.as_view(), name="run-findings"),
]
