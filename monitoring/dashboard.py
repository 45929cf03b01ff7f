"""/dashboard/: every schedule at a glance, a schedule's history and timeline, a run's tasks.

Server-rendered (Django templates) with a little vanilla JS that polls `state.json` and redraws the
parts that change (state, run strips, history rows), so a run-now is seen to succeed without a reload.
Staff log in with the admin's session; users in `viewers` may look but not press. The buttons call
the same services as the API (schedules.services: run_now merges and checks a params override).
"""

from __future__ import annotations

import json
from datetime import timedelta
from functools import wraps

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

from monitoring import calendar_view
from monitoring.permissions import is_viewer
from orchestrator.models import Run
from orchestrator.params import params_from_json
from orchestrator.retry_policy import effective_policy
from project.pagination import EstimatedCountPaginator as Paginator
from schedules import bulk, cancelling, services, timing
from schedules.labels import parse_selector
from schedules.models import (
    Alert,
    ChangeSource,
    Schedule,
    ScheduleChange,
    ScheduledRun,
    ScheduledRunStatus,
)

STRIP_LENGTH = 20
PAGE_SIZE = 50


def _may_look(user) -> bool:
    return user.is_active and (user.is_staff or user.is_superuser or is_viewer(user))


def _may_press(user) -> bool:
    return user.is_active and (user.is_staff or user.is_superuser) and not is_viewer(user)


def dashboard_view(view):
    """Session login (the admin's page), then staff or viewer; anyone else is a 403."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), settings.LOGIN_URL)
        if not _may_look(request.user):
            raise PermissionDenied("The dashboard is for staff and viewers.")
        return view(request, *args, **kwargs)

    return wrapper


def action_view(view):
    """A button: POST only (CSRF checked by the middleware), staff only (viewers get a 403)."""

    @wraps(view)
    @require_POST
    def wrapper(request: HttpRequest, *args, **kwargs):
        if not _may_press(request.user):
            return JsonResponse({"detail": "Read-only access: you cannot change anything."}, status=403)
        return view(request, *args, **kwargs)

    return dashboard_view(wrapper)


# --- reading --------------------------------------------------------------------------------------------


def _strips(schedule_ids: list[int]) -> dict[int, list[dict]]:
    """The last STRIP_LENGTH runs of each schedule, oldest first (one indexed query per schedule)."""
    strips: dict[int, list[dict]] = {}
    for sid in schedule_ids:
        rows = ScheduledRun.objects.filter(schedule_id=sid).order_by("-scheduled_for", "-id")[:STRIP_LENGTH]
        strips[sid] = [_run_cell(row) for row in reversed(list(rows))]
    return strips


def _run_cell(row: ScheduledRun) -> dict:
    return {
        "id": row.pk,
        "run_id": row.run_id,
        "status": row.status,
        "trigger": row.trigger,
        "scheduled_for": row.scheduled_for.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }


def _open_alerts(schedule_ids: list[int]) -> dict[int, list[str]]:
    alerts: dict[int, list[str]] = {}
    for sid, kind in Alert.objects.filter(schedule_id__in=schedule_ids, resolved_at__isnull=True).values_list(
        "schedule_id", "kind"
    ):
        alerts.setdefault(sid, []).append(kind)
    return alerts


def _schedule_state(schedule: Schedule, alerts: list[str]) -> dict:
    if alerts:
        state = "alerting"
    elif schedule.enabled:
        state = "enabled"
    else:
        state = "paused"
    return {
        "id": schedule.pk,
        "name": schedule.name,
        "state": state,
        "enabled": schedule.enabled,
        "paused_note": schedule.paused_note,
        "paused_by": schedule.paused_by,
        "alerts": sorted(alerts),
        "next_run_at": schedule.next_run_at.isoformat()
        if schedule.next_run_at and schedule.enabled
        else None,
    }


def _upcoming(schedule: Schedule, n: int = 3) -> list:
    # The API's, the admin's and a preview's answer (next_run_at itself first, jitter and max_runs applied).
    return services.upcoming_runs(schedule, n)


def _page(request: HttpRequest):
    schedules = (
        Schedule.objects.select_related("job")
        .prefetch_related("exclude_calendars", "only_calendars")
        .order_by("name")
    )
    query = request.GET.get("q", "").strip()
    if query:
        schedules = schedules.filter(Q(name__icontains=query) | Q(job__key__icontains=query))
    label = request.GET.get("label", "").strip()
    if label:
        try:
            schedules = schedules.filter(parse_selector([label]))
        except ValueError as exc:
            messages.error(request, f"Label selector: {exc}")
    return Paginator(schedules, PAGE_SIZE).get_page(request.GET.get("page"))


@require_GET
@dashboard_view
def index(request: HttpRequest) -> HttpResponse:
    page = _page(request)
    schedules = list(page.object_list)
    ids = [s.pk for s in schedules]
    strips, alerts = _strips(ids), _open_alerts(ids)
    rows = [
        {
            "schedule": s,
            "state": _schedule_state(s, alerts.get(s.pk, [])),
            "timing": timing.describe(timing.spec_of(s)),
            "upcoming": _upcoming(s),
            "strip": strips.get(s.pk, []),
        }
        for s in schedules
    ]
    counts = Alert.objects.filter(resolved_at__isnull=True).aggregate(n=Count("id"))
    return render(
        request,
        "monitoring/index.html",
        {
            "rows": rows,
            "page": page,
            "query": request.GET.get("q", ""),
            "label": request.GET.get("label", ""),
            "bulk_actions": bulk.BulkAction.choices,
            "open_alerts": counts["n"],
            "may_press": _may_press(request.user),
            "flower_url": settings.FLOWER_URL,
        },
    )


@require_GET
@dashboard_view
def state(request: HttpRequest) -> JsonResponse:
    """What the page's poll redraws: `?ids=1,2,3` (the schedules on screen)."""
    raw = request.GET.get("ids", "")
    try:
        ids = [int(part) for part in raw.split(",") if part][:PAGE_SIZE]
    except ValueError:
        return JsonResponse({"ids": ["Comma-separated schedule ids."]}, status=400)
    schedules = Schedule.objects.filter(pk__in=ids)
    strips, alerts = _strips(ids), _open_alerts(ids)
    return JsonResponse(
        {
            "now": timezone.now().isoformat(),
            "schedules": [
                {**_schedule_state(s, alerts.get(s.pk, [])), "strip": strips.get(s.pk, [])} for s in schedules
            ],
        }
    )


def _timeline(schedule: Schedule, now) -> list[dict]:
    """The last 24 hours of runs as bars: left and width in percent of the day."""
    start = now - timedelta(hours=24)
    day = 24 * 3600.0
    bars = []
    rows = ScheduledRun.objects.filter(schedule=schedule, scheduled_for__gte=start).order_by("scheduled_for")[
        :500
    ]
    for row in rows:
        begin = row.started_at or row.scheduled_for
        end = row.finished_at or (now if row.status == ScheduledRunStatus.RUNNING else begin)
        left = max(0.0, (begin - start).total_seconds() / day * 100)
        width = max(0.3, (end - begin).total_seconds() / day * 100)
        bars.append({"left": round(left, 3), "width": round(min(width, 100 - left), 3), "row": row})
    return bars


def retry_description(schedule: Schedule) -> str:
    """The retry policy in force, as a person reads it: "up to 3 attempts, 10 s then x2 (at most
    600 s), on failed, timed_out", whose it is; "no retry" for one attempt."""
    policy = effective_policy(schedule.job.retry_policy, schedule.retry_policy)
    whose = "the job's" if schedule.retry_policy is None else "this schedule's"
    if policy["max_attempts"] <= 1 or not policy["retry_on"]:
        return f"no retry ({whose} policy)"
    return (
        f"up to {policy['max_attempts']} attempts, {policy['initial_interval_seconds']:g} s then"
        f" x{policy['backoff_coefficient']:g} (at most {policy['max_interval_seconds']:g} s), on"
        f" {', '.join(policy['retry_on'])} ({whose} policy)"
    )


@require_GET
@dashboard_view
def schedule_page(request: HttpRequest, pk: int) -> HttpResponse:
    schedule = get_object_or_404(Schedule.objects.select_related("job"), pk=pk)
    status = request.GET.get("status", "")
    # The upstream run of a dependency run (its schedule's name, for the link in history).
    history = (
        ScheduledRun.objects.filter(schedule=schedule)
        .select_related("run", "upstream_run__schedule")
        .prefetch_related("run__attempts")
        .order_by("-scheduled_for", "-id")
    )
    if status:
        if status not in ScheduledRunStatus.values:
            raise Http404("unknown status")
        history = history.filter(status=status)
    page = Paginator(history, PAGE_SIZE).get_page(request.GET.get("page"))
    now = timezone.now()
    alerts = list(Alert.objects.filter(schedule=schedule, resolved_at__isnull=True))
    return render(
        request,
        "monitoring/schedule.html",
        {
            "schedule": schedule,
            "state": _schedule_state(schedule, [a.kind for a in alerts]),
            "timing": timing.describe(timing.spec_of(schedule)),
            "retry": retry_description(schedule),
            "upcoming": _upcoming(schedule, 5),
            "page": page,
            "status": status,
            "statuses": ScheduledRunStatus.values,
            "timeline": _timeline(schedule, now),
            "alerts": alerts,
            "changes": ScheduleChange.objects.filter(schedule_id=schedule.pk)[:50],
            "may_press": _may_press(request.user),
            "flower_url": settings.FLOWER_URL,
            "strip": _strips([schedule.pk])[schedule.pk],
            "upstreams": schedule.run_after.order_by("name").only("pk", "name"),
            "downstreams": schedule.run_before.order_by("name").only("pk", "name"),
            # "Run now…" (a params override) where the job declares what its params are.
            "params_json": json.dumps(schedule.params, sort_keys=True) if schedule.job.params_schema else "",
        },
    )


@require_GET
@dashboard_view
def calendar_page(request: HttpRequest) -> HttpResponse:
    """A week (per hour) or a month (per day) of runs: `?view=week|month&start=YYYY-MM-DD&tz=ZONE&label=
    team=payments&job=log_triage`. A bad parameter is a 400 page naming it."""
    base = {"may_press": _may_press(request.user), "flower_url": settings.FLOWER_URL, "params": request.GET}
    try:
        query = calendar_view.parse(request.GET)
    except calendar_view.BadParameter as exc:
        return render(request, "monitoring/calendar.html", {**base, "error": str(exc)}, status=400)
    context = calendar_view.build(query, now=timezone.now())
    return render(request, "monitoring/calendar.html", {**base, **context})


def _task_order(job_key: str) -> list[str]:
    """The job's tasks in the order they run (stats come back from jsonb with its own key order)."""
    from orchestrator.jobs.registry import UnknownJob, get_job_spec

    try:
        return [task.name for task in get_job_spec(job_key).tasks]
    except UnknownJob:
        return []


def _task_rows(stats: dict, order: list[str]) -> list[dict]:
    rows = []
    for name, task in (stats.get("tasks") or {}).items():
        if not isinstance(task, dict):
            continue
        counters = {k: v for k, v in task.items() if k not in ("outcome", "seconds", "pid", "error")}
        rows.append(
            {
                "name": name,
                "outcome": task.get("outcome", ""),
                "seconds": task.get("seconds"),
                "counters": counters,
            }
        )
    rank = {name: i for i, name in enumerate(order)}
    return sorted(rows, key=lambda row: rank.get(row["name"], len(rank)))


@require_GET
@dashboard_view
def run_page(request: HttpRequest, pk: int) -> HttpResponse:
    run = get_object_or_404(Run.objects.select_related("job"), pk=pk)
    scheduled = ScheduledRun.objects.select_related("schedule").filter(run=run).order_by("-id").first()
    stats = run.stats if isinstance(run.stats, dict) else {}
    return render(
        request,
        "monitoring/run.html",
        {
            "run": run,
            "scheduled": scheduled,
            "tasks": _task_rows(stats, _task_order(run.job.key)),
            "attempts": run.attempt_history(),
            "llm": stats.get("llm") if isinstance(stats.get("llm"), dict) else {},
            # The run's params as stored (a run-now's override included); escaped by the template.
            "params_json": json.dumps(run.params, sort_keys=True),
            "flower_url": settings.FLOWER_URL,
            "may_press": _may_press(request.user),
        },
    )


# --- the buttons ----------------------------------------------------------------------------------------


def _schedule_or_404(pk: int) -> Schedule:
    return get_object_or_404(Schedule, pk=pk)


@action_view
def run_now(request: HttpRequest, pk: int) -> JsonResponse:
    """Run now; an optional `params` (JSON text) overrides keys of the schedule's params, as the API's
    run-now: a 400 naming the failing path, nothing run."""
    schedule = _schedule_or_404(pk)
    try:
        params = params_from_json(request.POST.get("params", ""))
    except ValueError as exc:
        return JsonResponse({"params": [str(exc)]}, status=400)
    try:
        scheduled = services.run_now(schedule, params=params)
    except services.ScheduleInvalid as exc:
        return JsonResponse(exc.errors, status=400)
    return JsonResponse({"scheduled_run": _run_cell(scheduled)}, status=202)


@action_view
def enable(request: HttpRequest, pk: int) -> JsonResponse:
    try:
        schedule = services.enable_schedule(
            _schedule_or_404(pk), source=ChangeSource.ADMIN, actor=request.user.get_username()
        )
    except services.ScheduleInvalid as exc:
        return JsonResponse(exc.errors, status=400)
    return JsonResponse(_schedule_state(schedule, []))


@action_view
def disable(request: HttpRequest, pk: int) -> JsonResponse:
    """Disable with an optional note (`paused_note`), recorded with who paused it, as the API does."""
    try:
        schedule = services.disable_schedule(
            _schedule_or_404(pk),
            note=request.POST.get("note", "").strip(),
            source=ChangeSource.ADMIN,
            actor=request.user.get_username(),
        )
    except services.ScheduleInvalid as exc:
        return JsonResponse(exc.errors, status=400)
    return JsonResponse(_schedule_state(schedule, []))


@action_view
def bulk_action(request: HttpRequest) -> HttpResponse:
    """The list's multi-select form: one action on the ticked schedules, all or none (schedules.bulk, as
    POST /api/schedules/bulk); the outcome shows as a message on the page it came from."""
    raw = request.POST.getlist("ids")
    action = request.POST.get("action", "")
    note = request.POST.get("note", "").strip() if action == bulk.BulkAction.DISABLE else ""
    if not raw:
        messages.error(request, "Tick at least one schedule.")
    elif not all(part.isascii() and part.isdigit() for part in raw):
        messages.error(request, "Schedule ids are numbers.")
    else:
        try:
            result = bulk.bulk_apply(
                action,
                ids=[int(part) for part in raw],
                note=note,
                source=ChangeSource.ADMIN,
                actor=request.user.get_username(),
            )
        except bulk.BulkRefused as exc:
            messages.error(request, bulk.describe_refusals(exc.result))
        except services.ScheduleInvalid as exc:
            messages.error(request, f"Nothing was changed: {exc}")
        else:
            messages.success(request, bulk.describe(result))
    back = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
        back = reverse("dashboard:index")
    return HttpResponseRedirect(back)


@action_view
def cancel_run(request: HttpRequest, pk: int) -> JsonResponse:
    """The run page's "Cancel" button, as POST /api/runs/{id}/cancel (with the default grace)."""
    try:
        run = cancelling.cancel_run(pk, by=request.user.get_username())
    except cancelling.RunNotFound as exc:
        raise Http404(str(exc)) from exc
    except cancelling.RunFinished as exc:
        return JsonResponse({"detail": str(exc)}, status=409)
    return JsonResponse({"status": run.status, "cancel_requested_at": run.cancel_requested_at})
