"""GET /api/runs/{id}/findings: a run's findings, most severe first (the order triage stored them)."""

from __future__ import annotations

from django.db.models import QuerySet
from django.http import Http404
from django.urls import re_path
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import generics, serializers

from orchestrator.models import Finding, Run, Severity


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
    parameters=[
        OpenApiParameter(
            "severity", str, enum=Severity.values, description="Only findings of this severity."
        ),
        OpenApiParameter("rule", str, description="Only findings of this rule, e.g. `ssh_brute_force`."),
    ]
)
class RunFindingsView(generics.ListAPIView):
    """Paginated (the API's page size); 404 for an unknown run. Filter by `?severity=` or `?rule=`."""

    serializer_class = FindingSerializer

    def get_queryset(self) -> QuerySet[Finding]:
        if getattr(self, "swagger_fake_view", False):  # schema generation: no run in the URL
            return Finding.objects.none()
        run_id = self.kwargs["run_id"]
        if not Run.objects.filter(pk=run_id).exists():
            raise Http404("No such run.")
        queryset = Finding.objects.filter(run_id=run_id).order_by("id")
        for name in ("severity", "rule"):
            value = self.request.query_params.get(name)
            if value:
                queryset = queryset.filter(**{name: value})
        return queryset


# Included from project/urls.py; with or without the trailing slash, as every API path.
urlpatterns = [
    re_path(r"^api/runs/(?P<run_id>[0-9]{1,18})/findings/?$", RunFindingsView.as_view(), name="run-findings"),
]
