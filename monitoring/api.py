"""GET /metrics (Prometheus text format, its own basic auth) and GET /api/alerts/."""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication, SessionAuthentication, TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed, ValidationError
from rest_framework.generics import ListAPIView
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from monitoring import metrics
from project.api import ApiViewMixin, StrictFieldsMixin
from schedules.models import Alert, AlertKind


class MetricsScraper:
    """The identity of a scrape that presented METRICS_BASIC_AUTH: no user row, read-only by nature."""

    is_authenticated = True
    is_anonymous = False
    is_superuser = False
    is_staff = False
    pk = None
    username = "metrics"


class MetricsBasicAuthentication(BaseAuthentication):
    """HTTP basic auth against METRICS_BASIC_AUTH ("user:password"), for Prometheus' `basic_auth`.

    Compared in constant time; a wrong pair is a 401, never a fall-through to another scheme.
    """

    def authenticate(self, request: Request):
        expected = settings.METRICS_BASIC_AUTH
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not expected or not header.lower().startswith("basic "):
            return None
        try:
            given = base64.b64decode(header.split(" ", 1)[1].strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise AuthenticationFailed("Invalid basic auth header.") from exc
        if not hmac.compare_digest(given, expected.encode()):
            raise AuthenticationFailed("Invalid metrics credentials.")
        return (MetricsScraper(), None)

    def authenticate_header(self, request: Request) -> str:
        return 'Basic realm="metrics"'


class MetricsAccess(BasePermission):
    """The scraper's basic auth or any API user (viewers included); open only when METRICS_BASIC_AUTH
    is unset and DEBUG is on (a laptop's `make run`)."""

    def has_permission(self, request: Request, view) -> bool:
        if not settings.METRICS_BASIC_AUTH and settings.DEBUG:
            return True
        return bool(request.user and request.user.is_authenticated)


class MetricsView(APIView):
    """Prometheus exposition: see monitoring/metrics.py for what is measured and how."""

    # Token first: its challenge is the one a 401 names, as on every other endpoint.
    authentication_classes = [TokenAuthentication, SessionAuthentication, MetricsBasicAuthentication]
    permission_classes = [MetricsAccess]

    @extend_schema(exclude=True)
    def get(self, request: Request) -> HttpResponse:
        body = metrics.exposition()  # gzip-compressed
        if "gzip" in request.META.get("HTTP_ACCEPT_ENCODING", ""):
            response = HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
            response["Content-Encoding"] = "gzip"
        else:  # Prometheus always accepts gzip; curl without --compressed does not
            response = HttpResponse(gzip.decompress(body), content_type=CONTENT_TYPE_LATEST)
        response["Vary"] = "Accept-Encoding"
        return response


class AlertSerializer(StrictFieldsMixin, serializers.ModelSerializer):
    schedule_name = serializers.CharField(source="schedule.name", read_only=True)
    open = serializers.SerializerMethodField()

    class Meta:
        model = Alert
        fields = [
            "id",
            "schedule",
            "schedule_name",
            "kind",
            "open",
            "opened_at",
            "resolved_at",
            "details",
            "notified_open_at",
            "notified_resolved_at",
        ]
        read_only_fields = fields

    def get_open(self, alert: Alert) -> bool:
        return alert.resolved_at is None


def _bool_param(request: Request, name: str) -> bool | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise ValidationError({name: [f"Must be true or false, got {raw[:50]!r}."]})


class AlertListView(ApiViewMixin, ListAPIView):
    """Alerts, newest first: `?open=true|false`, `?schedule=<id>`, `?kind=missed|failing|overdue`."""

    serializer_class = AlertSerializer

    @extend_schema(
        summary="List alerts",
        parameters=[
            OpenApiParameter("open", bool, description="Only open (true) or only resolved (false) alerts."),
            OpenApiParameter("schedule", int, description="Only this schedule's alerts (its id)."),
            OpenApiParameter("kind", str, enum=[k.value for k in AlertKind], description="Only this kind."),
        ],
    )
    def get(self, request: Request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        alerts = Alert.objects.select_related("schedule").order_by("-opened_at", "-id")
        request = self.request
        is_open = _bool_param(request, "open")
        if is_open is not None:
            alerts = alerts.filter(resolved_at__isnull=is_open)
        schedule = request.query_params.get("schedule")
        if schedule is not None:
            if not (schedule.isascii() and schedule.isdigit() and len(schedule) < 19):
                raise ValidationError({"schedule": [f"A schedule id is required, got {schedule[:50]!r}."]})
            alerts = alerts.filter(schedule_id=int(schedule))
        kind = request.query_params.get("kind")
        if kind is not None:
            if kind not in AlertKind.values:
                raise ValidationError({"kind": [f"One of {', '.join(AlertKind.values)}, got {kind[:50]!r}."]})
            alerts = alerts.filter(kind=kind)
        return alerts
