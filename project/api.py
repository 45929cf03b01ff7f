"""Pieces every API view shares: a size-bounded JSON parser, strict serializers, the health check."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views import defaults
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.plumbing import force_instance
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ParseError, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.utils import json
from rest_framework.views import APIView

from project import redisconn
from project.pagination import EstimatedCountPaginator

logger = logging.getLogger(__name__)


class OptionalSlashRouter(SimpleRouter):
    """Routes that answer with and without the trailing slash (docs/ARCHITECTURE.md, "API conventions"),
    without a redirect.

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


def _query_int(request: Request, name: str) -> int | None:
    """A positive integer query parameter, or None when absent; anything else is a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and int(raw) >= 1):
        raise ValidationError({name: [f"A positive integer is required, got {raw[:50]!r}."]})
    return int(raw)


class Pagination(PageNumberPagination):
    """?page=N, and ?page_size=M (at most 500) for clients that want fewer round trips.

    A `page` or `page_size` that is not a positive integer is a 400 naming it (DRF would silently use
    the default size, or answer 404); a page past the last one stays DRF's 404. `count` is exact up to
    10,000 results and PostgreSQL's estimate above (project.pagination): no list counts a big table.
    """

    django_paginator_class = EstimatedCountPaginator
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Request) -> int:
        value = _query_int(request, self.page_size_query_param)
        return self.page_size if value is None else min(value, self.max_page_size)

    def get_page_number(self, request: Request, paginator: Any) -> Any:
        if request.query_params.get(self.page_query_param) in self.last_page_strings:
            return paginator.num_pages
        return _query_int(request, self.page_query_param) or 1

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["description"] = f"Results per page; more than {self.max_page_size} counts as that."
        return parameters


class ErrorDetailSerializer(serializers.Serializer):
    """DRF's shape for errors that are not about one field: 401, 403, 404, 405, 409, 413, 415, 503."""

    detail = serializers.CharField()


# 400: {"field": ["message", ...]} (DRF's shape, docs/ARCHITECTURE.md, "API conventions"); nested for list
# and object fields, and
# {"detail": "..."} for a body that is not JSON.
VALIDATION_ERROR_SCHEMA = {
    "type": "object",
    "description": "Each key names the offending field (or `detail`, `non_field_errors`).",
    "additionalProperties": {},
}


# Swagger's summary of the standard operations of a resource, by tag (its path segment after /api/).
# Other operations name theirs with extend_schema(summary=...); tests/integration/test_api_docs.py checks
# that every operation has one.
RESOURCE_NOUNS = {
    "schedules": "schedule",
    "calendars": "calendar",
    "directives": "directive",
    "jobs": "job",
    "runs": "run",
}
CRUD_SUMMARIES = {
    "list": "List {noun}s",
    "create": "Create a {noun}",
    "retrieve": "Read a {noun}",
    "partial_update": "Change a {noun}",
    "update": "Replace a {noun}",
    "destroy": "Delete a {noun}",
}


class AutoSchema(SpectacularAutoSchema):
    """drf-spectacular's AutoSchema, plus the error responses each operation can actually give, one tag
    per resource and a summary for each standard operation.

    drf-spectacular documents only the success code. A client (and the schemathesis fuzz test) must
    know the rest: 400 where there is input to validate, 401/403 behind authentication, 404 where a
    path names a row or a page is past the end, 413/415 where there is a body, 503 when the
    database is down (project.api.exception_handler). Added to the operation drf-spectacular builds,
    through its public methods only.
    """

    def get_tags(self) -> list[str]:
        """The resource: the path's first segment after /api/ (schedules, runs, jobs, directives...)."""
        return [self.path.removeprefix("/api/").split("/")[0] or "api"]

    def get_summary(self) -> str | None:
        summary = super().get_summary()
        if summary:
            return summary
        noun = RESOURCE_NOUNS.get(self.get_tags()[0])
        action = getattr(self.view, "action", None)
        if noun and action in CRUD_SUMMARIES:
            return CRUD_SUMMARIES[action].format(noun=noun)
        return None

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        media_types = self.map_renderers("media_type")
        for code, (description, body) in self.error_responses(operation).items():
            if isinstance(body, type) and issubclass(body, serializers.Serializer):
                body = self.resolve_serializer(body, "response").ref
            operation["responses"].setdefault(
                code,
                {"content": {media: {"schema": body} for media in media_types}, "description": description},
            )
        return operation

    def resolve_serializer(self, serializer, direction, bypass_extensions=False):
        component = super().resolve_serializer(serializer, direction, bypass_extensions)
        # StrictFieldsMixin refuses keys it does not know (a 400 naming them): say so in the schema.
        if component and direction == "request" and isinstance(force_instance(serializer), StrictFieldsMixin):
            component.schema["additionalProperties"] = False
        return component

    def error_responses(self, operation: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        """The error codes `operation` can answer with: {code: (description, body schema or serializer)}."""
        errors: dict[str, tuple[str, Any]] = {}
        has_body = self.method in ("POST", "PUT", "PATCH")
        query = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "query"}
        if has_body or query:
            errors["400"] = ("Invalid input; each key names a field.", VALIDATION_ERROR_SCHEMA)
        if not all(isinstance(p, AllowAny) for p in self.view.get_permissions()):
            errors["401"] = ("No or invalid credentials.", ErrorDetailSerializer)
            errors["403"] = ("Authenticated, but not allowed.", ErrorDetailSerializer)
        if "{" in self.path or Pagination.page_query_param in query:
            errors["404"] = ("No such object, or a page past the last one.", ErrorDetailSerializer)
        if has_body and self.get_request_serializer() is not None:
            errors["413"] = ("Request body too large.", ErrorDetailSerializer)
            errors["415"] = ("The body is not `application/json`.", ErrorDetailSerializer)
        errors["503"] = (
            "The database is unavailable; retry after `Retry-After` seconds.",
            ErrorDetailSerializer,
        )
        return errors


class ApiViewMixin:
    """For every API view: JSON bodies only, bounded in size; page-number pagination; errors documented."""

    parser_classes = [BoundedJSONParser]
    pagination_class = Pagination
    schema = AutoSchema()


def not_found(request: HttpRequest, exception: Exception) -> Any:
    """handler404: under /api/, DRF's JSON shape rather than Django's HTML page (a path no route matches)."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def json_type_error(field: serializers.Field, value: Any) -> str | None:
    """The message for a value of the wrong JSON type for `field`, or None when the type is right.

    DRF coerces: 5 becomes "5" for a CharField, "5" becomes 5 for an IntegerField, 0 and "false" become
    False for a BooleanField. The schema says string, integer, boolean; a client sending another type
    has a bug to hear about (docs/ARCHITECTURE.md, "API conventions": a 400 naming the field), not a guess
    made for it.
    """
    if value is None:
        return None  # allow_null decides
    if isinstance(field, serializers.BooleanField) and not isinstance(value, bool):
        return "Must be a boolean (true or false)."
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if isinstance(field, serializers.IntegerField) and not is_int:
        return "Must be an integer."
    if isinstance(field, serializers.FloatField) and not (is_int or isinstance(value, float)):
        return "Must be a number."
    if isinstance(field, serializers.CharField) and not isinstance(value, str):
        return "Must be a string."
    if isinstance(field, serializers.ListField) and isinstance(value, list):
        for item in value:
            if (message := json_type_error(field.child, item)) is not None:
                return f"Every item: {message[0].lower()}{message[1:]}"
    return None


class StrictFieldsMixin:
    """Refuse input keys the serializer does not accept, naming them, instead of silently ignoring them.

    A typo such as `interval_minute` would otherwise be dropped and the request "succeed". Values of
    the wrong JSON type are refused too (json_type_error), rather than coerced.
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
                elif (message := json_type_error(field, data[key])) is not None:
                    errors[str(key)] = [message]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)  # type: ignore[misc]


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_redis() -> None:
    client = redisconn.client(socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


HEALTH_BODY = inline_serializer(
    "Health",
    {
        "status": serializers.CharField(),
        "database": serializers.CharField(),
        "redis": serializers.CharField(),
    },
)


class HealthView(APIView):
    """Database and Redis reachability, for load balancers and `docker compose` health checks."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    schema = AutoSchema()
    checks = {"database": _check_database, "redis": _check_redis}

    @extend_schema(
        summary="Check the database and Redis",
        responses={
            200: HEALTH_BODY,
            503: OpenApiResponse(
                HEALTH_BODY, description="One or more dependencies unreachable; each is named."
            ),
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
