"""Pieces every API view shares: a size-bounded JSON parser, strict serializers, the health check."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ParseError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.utils import json
from rest_framework.views import APIView

logger = logging.getLogger(__name__)


class OptionalSlashRouter(SimpleRouter):
    """Routes that answer with and without the trailing slash (DESIGN 5), without a redirect.

    SimpleRouter(trailing_slash=...) only knows "/" or "", and APPEND_SLASH's 301 would turn a POST
    into a GET in most clients.
    """

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body too large."
    default_code = "request_too_large"


class BoundedJSONParser(JSONParser):
    """JSONParser that refuses bodies over DATA_UPLOAD_MAX_MEMORY_SIZE.

    DRF parses from the request stream, which Django does not bound (only `request.body` and form
    parsing are), so without this a 1 GB body would be read into memory. Also turns the RecursionError
    of a deeply nested document into a 400 rather than a 500.
    """

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if stream is None:
            return {}
        raw = stream.read(limit + 1) if limit is not None else stream.read()
        if limit is not None and len(raw) > limit:
            raise RequestTooLarge(f"Request body exceeds {limit} bytes.")
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = codecs.decode(raw, encoding)
            parse_constant = json.strict_constant if self.strict else None
            return json.loads(text, parse_constant=parse_constant)
        except ValueError as exc:
            raise ParseError(f"JSON parse error - {exc}") from exc
        except RecursionError as exc:
            raise ParseError("JSON parse error - nested too deeply.") from exc


class Pagination(PageNumberPagination):
    """?page=N, and ?page_size=M (at most 500) for clients that want fewer round trips."""

    page_size_query_param = "page_size"
    max_page_size = 500


class ApiViewMixin:
    """For every API view: JSON bodies only, bounded in size; page-number pagination."""

    parser_classes = [BoundedJSONParser]
    pagination_class = Pagination


class StrictFieldsMixin:
    """Refuse input keys the serializer does not accept, naming them, instead of silently ignoring them.

    A typo such as `interval_minute` would otherwise be dropped and the request "succeed".
    """

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            errors: dict[str, list[str]] = {}
            for key in data:
                field = self.fields.get(key)
                if field is None:
                    errors[str(key)] = ["Unknown field."]
                elif field.read_only:
                    errors[str(key)] = ["This field is read-only."]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)  # type: ignore[misc]


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_redis() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


class HealthView(APIView):
    """Database and Redis reachability, for load balancers and `docker compose` health checks."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    checks = {"database": _check_database, "redis": _check_redis}

    @extend_schema(
        responses={
            200: inline_serializer(
                "Health",
                {
                    "status": serializers.CharField(),
                    "database": serializers.CharField(),
                    "redis": serializers.CharField(),
                },
            ),
            503: OpenApiResponse(description="One or more dependencies unreachable; each is named."),
        },
        auth=[],
    )
    def get(self, request: Request) -> Response:
        body: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                check()
                body[name] = "ok"
            except Exception as exc:
                # The exception's class only: messages can carry URLs with credentials.
                body[name] = f"unreachable ({type(exc).__name__})"
                logger.warning("health check failed", extra={"dependency": name, "error": type(exc).__name__})
        healthy = all(value == "ok" for value in body.values())
        body = {"status": "ok" if healthy else "unavailable", **body}
        return Response(body, status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE)


def exception_handler(exc: Exception, context: Mapping[str, Any]) -> Response | None:
    """DRF's handler, plus one case: an unreachable database is a 503 to retry, not a 500.

    PostgreSQL restarting (or failing over) is an outage the client can wait out; a 500 would read as
    a bug in the request.
    """
    from django.db import InterfaceError, OperationalError
    from rest_framework.views import exception_handler as drf_exception_handler

    if isinstance(exc, OperationalError | InterfaceError):
        view = context.get("view")
        logger.warning(
            "database unavailable",
            extra={"view": type(view).__name__ if view else "", "error": type(exc).__name__},
        )
        return Response(
            {"detail": "The database is unavailable; try again shortly."},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "5"},
        )
    return drf_exception_handler(exc, context)
