"""URL map: the REST API under /api/ (each path with or without its trailing slash), the admin, /metrics
and the dashboard."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from monitoring.api import AlertListView, MetricsView
from project.api import HealthView

handler404 = "project.api.not_found"

_public = {"authentication_classes": [], "permission_classes": [AllowAny]}

urlpatterns = [
    path("admin/", admin.site.urls),
    re_path(r"^api/health/?$", HealthView.as_view(), name="health"),
    re_path(r"^api/schema/?$", SpectacularAPIView.as_view(**_public), name="schema"),
    re_path(r"^api/docs/?$", SpectacularSwaggerView.as_view(url_name="schema", **_public), name="docs"),
    path("api/", include("schedules.api.urls")),
    path("api/", include("orchestrator.api.urls")),
    # Observability (monitoring/): alerts, Prometheus metrics, the dashboard.
    re_path(r"^api/alerts/?$", AlertListView.as_view(), name="alert-list"),
    re_path(r"^metrics/?$", MetricsView.as_view(), name="metrics"),
    path("dashboard/", include("monitoring.urls")),
]
urlpatterns += [path("", include("orchestrator.api.findings"))]  # GET /api/runs/{id}/findings
