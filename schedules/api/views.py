"""Schedule endpoints, and the launching half of /api/runs/. Thin: parse, call one service, shape output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from orchestrator.api.serializers import RunLaunchSerializer, RunSerializer
from orchestrator.api.views import RunViewSet
from orchestrator.models import RunStatus
from project.api import ApiViewMixin, BoundedJSONParser, ErrorDetailSerializer
from schedules import bulk, calendar_service, cancelling, services
from schedules import changes as change_log
from schedules.api.serializers import (
    BackfillResultSerializer,
    BackfillSerializer,
    BulkRefusedSerializer,
    BulkResultSerializer,
    BulkSerializer,
    CalendarDaysSerializer,
    CalendarImportResultSerializer,
    CalendarImportSerializer,
    CalendarSerializer,
    CalendarUploadSerializer,
    DisableSerializer,
    PreviewResultSerializer,
    PreviewSerializer,
    RunCancelSerializer,
    RunNowSerializer,
    ScheduleChangeSerializer,
    ScheduledRunSerializer,
    ScheduleSerializer,
)
from schedules.calendar_service import CalendarInUse, CalendarInvalid
from schedules.labels import parse_selector
from schedules.models import Calendar, ChangeSource, Schedule, ScheduledRunStatus

T = TypeVar("T")

# Service errors name model fields; the API's name for the job is job_key.
_API_FIELD_NAMES = {"job": "job_key"}


class Conflict(APIException):
    """409: the request is well formed but the schedule's state refuses it (a managed field)."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def call_service(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a service function, turning its ScheduleInvalid into DRF's 400 shape (409 for an edit of a
    field a schedules file declares, or a delete of a schedule others run after)."""
    try:
        return func(*args, **kwargs)
    except (services.ScheduleManaged, services.ScheduleInUse) as exc:
        raise Conflict({_API_FIELD_NAMES.get(k, k): v for k, v in exc.errors.items()}) from exc
    except services.ScheduleInvalid as exc:
        raise ValidationError({_API_FIELD_NAMES.get(k, k): v for k, v in exc.errors.items()}) from exc
    except CalendarInUse as exc:
        raise Conflict(exc.errors) from exc
    except CalendarInvalid as exc:
        raise ValidationError(exc.errors) from exc


def _actor(request: Request) -> str:
    return getattr(request.user, "username", "") or ""


# Request examples Swagger's "Try it out" starts from; each is accepted as it stands
# (tests/integration/test_api_docs.py sends every one of them to the API).
def _example(name: str, value: dict[str, Any], summary: str = "") -> OpenApiExample:
    return OpenApiExample(name, value=value, summary=summary or name, request_only=True)


SCHEDULE_EXAMPLES = [
    _example(
        "interval",
        {
            "name": "triage-every-10",
            "job_key": "log_triage",
            "enabled": True,
            "schedule_type": "interval",
            "interval_minutes": 10,
            "timezone": "UTC",
        },
        "Every 10 minutes",
    ),
    _example(
        "cron",
        {
            "name": "nightly-triage",
            "job_key": "log_triage",
            "schedule_type": "cron",
            "cron_expr": "0 2 * * *",
            "timezone": "America/New_York",
            "jitter_seconds": 60,
        },
        "02:00 New York time, DST-exact, up to a minute of jitter",
    ),
]


LABEL_PARAMETER = OpenApiParameter(
    "label",
    str,
    many=True,
    required=False,
    description="Label selector terms, combined with AND (repeat the parameter, or separate terms with"
    " commas): key=value, key!=value (also schedules without the key), key (has it), !key (has it not)."
    " E.g. ?label=team=payments&label=tier!=batch.",
)


@extend_schema_view(
    list=extend_schema(parameters=[LABEL_PARAMETER]),
    create=extend_schema(examples=SCHEDULE_EXAMPLES),
    partial_update=extend_schema(
        examples=[_example("caps", {"max_per_job": 2, "jitter_seconds": 30}, "Cap and spread its runs")]
    ),
    run_now=extend_schema(summary="Run a schedule now"),
    enable=extend_schema(summary="Enable a schedule"),
    disable=extend_schema(
        summary="Disable a schedule",
        examples=[_example("note", {"note": "waiting for the log rotation fix"}, "With a note on why")],
    ),
    preview=extend_schema(
        summary="Preview run times",
        examples=[
            _example(
                "cron",
                {
                    "schedule_type": "cron",
                    "cron_expr": "0 2 * * *",
                    "timezone": "America/New_York",
                    "count": 5,
                },
                "The next 5 times of a nightly cron schedule",
            )
        ],
    ),
    backfill=extend_schema(
        summary="Backfill missed slots",
        examples=[
            _example(
                "six-hours",
                {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T06:00:00Z"},
                "A run for each slot of six hours",
            )
        ],
    ),
    destroy=extend_schema(
        responses={
            204: None,
            409: OpenApiResponse(
                description="Not deleted: the schedule is managed by sync_schedules (`managed`), or other"
                " schedules run after it (`run_before` names them: remove it from their run_after first, or"
                " delete them together through POST /api/schedules/bulk)."
            ),
        }
    ),
    changes=extend_schema(summary="A schedule's change history"),
    history=extend_schema(summary="A schedule's runs"),
    bulk=extend_schema(
        summary="Enable, disable, run or delete many schedules",
        examples=[
            _example(
                "disable-by-label",
                {"action": "disable", "selector": {"labels": {"team": "payments"}}, "note": "freeze"},
                "Disable every schedule labelled team=payments",
            ),
            _example(
                "dry-run",
                {
                    "action": "run-now",
                    "selector": {"job_key": "log_triage", "name_prefix": "triage-"},
                    "dry_run": True,
                },
                "What a run-now of the log_triage schedules named triage-* would do, writing nothing",
            ),
        ],
    ),
)
class ScheduleViewSet(ApiViewMixin, viewsets.ModelViewSet):
    """Interval and cron schedules of jobs: each write is validated like the admin's and recorded in the
    schedule's change history."""

    queryset = Schedule.objects.select_related("job", "directive").prefetch_related(
        "exclude_calendars", "only_calendars", "run_after", "run_before"
    )
    serializer_class = ScheduleSerializer
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_value_regex = "[0-9]+"

    def filter_queryset(self, queryset):
        queryset = super().filter_queryset(queryset)
        if self.action == "list" and (terms := self.request.query_params.getlist("label")):
            try:
                queryset = queryset.filter(parse_selector(terms))
            except ValueError as exc:
                raise ValidationError({"label": [str(exc)]}) from exc
        return queryset

    def perform_create(self, serializer: ScheduleSerializer) -> None:
        serializer.instance = call_service(
            services.create_schedule,
            source=ChangeSource.API,
            actor=_actor(self.request),
            **serializer.validated_data,
        )

    def perform_update(self, serializer: ScheduleSerializer) -> None:
        serializer.instance = call_service(
            services.update_schedule,
            serializer.instance,
            serializer.validated_data,
            source=ChangeSource.API,
            actor=_actor(self.request),
        )

    def perform_destroy(self, instance: Schedule) -> None:
        if instance.managed:
            raise Conflict(
                {"managed": [f"Schedule {instance.name!r} is managed by sync_schedules: remove it from its"
                             " file and run sync_schedules --prune."]}
            )  # fmt: skip
        # A refused delete (others run after it) rolls its record back with it.
        with transaction.atomic():
            change_log.record_delete(instance, source=ChangeSource.API, actor=_actor(self.request))
            call_service(services.delete_schedule, instance)

    @extend_schema(request=RunNowSerializer, responses={202: ScheduledRunSerializer})
    @action(detail=True, methods=["post"], url_path="run-now")
    def run_now(self, request: Request, pk: str | None = None) -> Response:
        """Launch the schedule's job now (trigger `manual`); works on a disabled schedule too. An
        optional `params` object overrides keys of the schedule's params for this run."""
        body = RunNowSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        scheduled_run = call_service(
            services.run_now, self.get_object(), params=body.validated_data.get("params")
        )
        # The message went out on commit and stamped published_at in the database; show that.
        scheduled_run.refresh_from_db()
        return Response(ScheduledRunSerializer(scheduled_run).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={200: ScheduleSerializer})
    @action(detail=True, methods=["post"])
    def enable(self, request: Request, pk: str | None = None) -> Response:
        """Enable; next_run_at is computed from now, so slots missed while disabled are not run."""
        schedule = call_service(
            services.enable_schedule, self.get_object(), source=ChangeSource.API, actor=_actor(request)
        )
        return Response(self.get_serializer(schedule).data)

    @extend_schema(request=DisableSerializer, responses={200: ScheduleSerializer})
    @action(detail=True, methods=["post"])
    def disable(self, request: Request, pk: str | None = None) -> Response:
        """Disable, with an optional `note` (why); `paused_note`, `paused_at`, `paused_by` are shown until
        enable clears them."""
        body = DisableSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        schedule = call_service(
            services.disable_schedule,
            self.get_object(),
            note=body.validated_data["note"],
            source=ChangeSource.API,
            actor=_actor(request),
        )
        return Response(self.get_serializer(schedule).data)

    @extend_schema(request=BulkSerializer, responses={200: BulkResultSerializer, 409: BulkRefusedSerializer})
    @action(detail=False, methods=["post"])
    def bulk(self, request: Request) -> Response:
        """One action on many schedules, all or none: 200 with what changed; 409 with what would change
        and what was refused, and why (nothing changed); 400 for a malformed request. `dry_run` answers
        the same and writes nothing."""
        body = BulkSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            result = call_service(
                bulk.bulk_apply,
                data["action"],
                ids=data.get("ids"),
                selector=data.get("selector"),
                note=data["note"],
                dry_run=data["dry_run"],
                source=ChangeSource.API,
                actor=_actor(request),
            )
        except bulk.BulkRefused as exc:
            payload = BulkResultSerializer(exc.result).data
            return Response({"detail": str(exc), **payload}, status=status.HTTP_409_CONFLICT)
        return Response(BulkResultSerializer(result).data)

    @extend_schema(request=PreviewSerializer, responses={200: PreviewResultSerializer})
    @action(detail=False, methods=["post"])
    def preview(self, request: Request) -> Response:
        """The next `count` (default 10, at most 100) run times of the timing fields given, and a
        description; the same 400s as create. Nothing is written."""
        body = PreviewSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = call_service(services.preview_schedule, **body.validated_data)
        return Response(PreviewResultSerializer(result).data)

    @extend_schema(request=BackfillSerializer, responses={200: BackfillResultSerializer})
    @action(detail=True, methods=["post"])
    def backfill(self, request: Request, pk: str | None = None) -> Response:
        """A run (trigger `backfill`) for each slot in [start, end) that has none yet (at most 1,000);
        a second identical call creates none."""
        body = BackfillSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        result = call_service(services.backfill_schedule, self.get_object(), **body.validated_data)
        return Response(BackfillResultSerializer(result).data)

    @extend_schema(request=None, responses={200: ScheduleChangeSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def changes(self, request: Request, pk: str | None = None) -> Response:
        """Every write to the schedule (who, when, how, each field's old and new value), newest first.
        Still answers after the schedule is deleted: the last record is the delete, with every field's
        last value."""
        records = change_log.history(int(pk))
        if not records.exists():
            self.get_object()  # 404 for an id that never had a schedule
        page = self.paginate_queryset(records)
        return self.get_paginated_response(ScheduleChangeSerializer(page, many=True).data)

    @extend_schema(
        request=None,
        responses={200: ScheduledRunSerializer(many=True)},
        parameters=[OpenApiParameter("status", enum=ScheduledRunStatus.values, required=False)],
    )
    @action(detail=True, methods=["get"])
    def history(self, request: Request, pk: str | None = None) -> Response:
        """The schedule's ScheduledRuns, newest first, paginated, optionally filtered by `status`."""
        schedule = self.get_object()
        runs = (
            schedule.scheduled_runs.select_related("run")
            .prefetch_related("run__attempts")
            .order_by("-scheduled_for", "-id")
        )
        wanted = request.query_params.get("status")
        if wanted is not None:
            if wanted not in ScheduledRunStatus.values:
                raise ValidationError(
                    {"status": [f"Unknown status {wanted!r}; one of {', '.join(ScheduledRunStatus.values)}."]}
                )
            runs = runs.filter(status=wanted)
        page = self.paginate_queryset(runs)
        return self.get_paginated_response(ScheduledRunSerializer(page, many=True).data)


CALENDAR_EXAMPLES = [
    _example(
        "holidays",
        {
            "name": "us-market-holidays",
            "timezone": "America/New_York",
            "holidays": {"market": "NYSE", "years": [2027]},
            "rules": [{"date": "2027-12-24"}],
        },
        "NYSE holidays of 2027 and one more day",
    ),
    _example(
        "weekends-and-night",
        {
            "name": "weekends-and-nights",
            "timezone": "Europe/Berlin",
            "rules": [
                {"weekdays": ["sat", "sun"]},
                {"yearly": "12-25"},
                {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}},
                {"cron": "* 0-5 * * *"},
            ],
        },
        "Weekends, Christmas, Thanksgiving, and every night 00:00-05:59",
    ),
]


@extend_schema_view(
    create=extend_schema(examples=CALENDAR_EXAMPLES),
    days=extend_schema(
        summary="The days a calendar names",
        parameters=[
            OpenApiParameter(
                "start",
                OpenApiTypes.DATE,
                required=True,
                description="First day (YYYY-MM-DD, 1970-01-01 to 9000-01-01).",
            ),
            OpenApiParameter(
                "end",
                OpenApiTypes.DATE,
                required=True,
                description="Day after the last (at most 3,660 days on).",
            ),
        ],
    ),
    import_ics=extend_schema(summary="Import an iCalendar file"),
)
class CalendarViewSet(ApiViewMixin, viewsets.ModelViewSet):
    """Calendars: named sets of days (and windows) that schedules exclude or keep to. An edit recomputes
    the next run of every schedule using the calendar and records it in their change history."""

    queryset = Calendar.objects.prefetch_related("excluding_schedules", "only_schedules").order_by("id")
    serializer_class = CalendarSerializer
    http_method_names = ["get", "post", "patch", "delete", "head", "options"]
    lookup_value_regex = "[0-9]+"

    def perform_create(self, serializer: CalendarSerializer) -> None:
        serializer.instance = call_service(calendar_service.create_calendar, **serializer.validated_data)

    def perform_update(self, serializer: CalendarSerializer) -> None:
        serializer.instance = call_service(
            calendar_service.update_calendar,
            serializer.instance,
            serializer.validated_data,
            source=ChangeSource.API,
            actor=_actor(self.request),
        )

    def perform_destroy(self, instance: Calendar) -> None:
        call_service(calendar_service.delete_calendar, instance)

    @extend_schema(request=None, responses={200: CalendarDaysSerializer})
    @action(detail=True, methods=["get"])
    def days(self, request: Request, pk: str | None = None) -> Response:
        """The days in [start, end) the calendar names (its windows are minutes, not days)."""
        calendar = self.get_object()
        start, end = request.query_params.get("start"), request.query_params.get("end")
        start, end, days = call_service(calendar_service.excluded_days, calendar, start=start, end=end)
        return Response(
            CalendarDaysSerializer({"calendar": calendar.pk, "start": start, "end": end, "days": days}).data
        )

    @extend_schema(
        request={
            "application/json": CalendarImportSerializer,
            "multipart/form-data": CalendarUploadSerializer,
        },
        responses={200: CalendarImportResultSerializer},
    )
    @action(
        detail=True,
        methods=["post"],
        url_path="import",
        parser_classes=[BoundedJSONParser, MultiPartParser],
    )
    def import_ics(self, request: Request, pk: str | None = None) -> Response:
        """Add the events of an iCalendar file to the calendar's rules: all-day events as dates or
        ranges, timed events as the days they touch, a plain yearly recurrence as a yearly rule."""
        calendar = self.get_object()
        if request.content_type.startswith("multipart/"):
            body = CalendarUploadSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            upload = body.validated_data["file"]
            if upload.size > calendar_service.MAX_ICS_BYTES:
                raise ValidationError({"file": [f"At most {calendar_service.MAX_ICS_BYTES} bytes."]})
            data = upload.read()
        else:
            body = CalendarImportSerializer(data=request.data)
            body.is_valid(raise_exception=True)
            data = body.validated_data["ics"]
        calendar, added = call_service(
            calendar_service.import_ics, calendar, data, source=ChangeSource.API, actor=_actor(request)
        )
        calendar = self.get_queryset().get(pk=calendar.pk)
        return Response(CalendarImportResultSerializer({"added": added, "calendar": calendar}).data)


# Lives here, not in orchestrator.api, because launching publishes the run message through schedules
# (dependency direction: orchestrator <- schedules).
@extend_schema_view(
    create=extend_schema(
        summary="Launch a run",
        examples=[_example("triage", {"job_key": "log_triage"}, "Triage the logs now")],
    ),
)
class RunLaunchViewSet(RunViewSet):
    """Runs, newest first; filter with ?status=, ?trigger=, ?job_key=. POST launches one now (trigger
    `manual`), through the same path a scheduled run takes."""

    http_method_names = ["get", "post", "head", "options"]

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return RunLaunchSerializer if self.action == "create" else RunSerializer

    @extend_schema(request=RunLaunchSerializer, responses={202: RunSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        launch = RunLaunchSerializer(data=request.data)
        launch.is_valid(raise_exception=True)
        run = call_service(services.launch_run_manually, **launch.validated_data)
        headers = {"Location": f"{request.path.rstrip('/')}/{run.pk}/"}
        return Response(RunSerializer(run).data, status=status.HTTP_202_ACCEPTED, headers=headers)

    @extend_schema(
        summary="Cancel a run",
        request=RunCancelSerializer,
        responses={
            200: RunSerializer,
            202: RunSerializer,
            409: OpenApiResponse(ErrorDetailSerializer, description="The run already ended."),
        },
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """A waiting run (queued, throttled) ends `cancelled` at once (200). A running one gets SIGTERM to
        its task processes, SIGKILL after `cancel_grace_seconds`, and ends `cancelled` (202: stopping).
        409 for a run that already ended."""
        body = RunCancelSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        run = self.get_object()
        try:
            run = cancelling.cancel_run(
                run.pk, by=_actor(request), grace=body.validated_data.get("cancel_grace_seconds")
            )
        except cancelling.RunNotFound as exc:
            raise NotFound(str(exc)) from exc
        except cancelling.RunFinished as exc:
            raise Conflict(str(exc)) from exc
        code = status.HTTP_202_ACCEPTED if run.status == RunStatus.RUNNING else status.HTTP_200_OK
        return Response(RunSerializer(run).data, status=code)
