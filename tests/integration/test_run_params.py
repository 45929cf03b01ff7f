"""Issue 32.6, run inputs: `params` on schedules, run-now and POST /api/runs/, checked against the job's
`params_schema` (log_triage's here) with a 400 naming the failing path; the admin, sync_schedules and
the change history; the previous slot a run is handed. What a real worker's tasks see:
tests/acceptance/test_run_inputs.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator.models import Job, Run
from orchestrator.params import MAX_PARAMS_BYTES
from orchestrator.services import OrchestratorService, ParamsInvalid
from schedules import services
from schedules.models import Schedule, ScheduleChange, ScheduledRun
from tests.scheduler_support import db_now
from tests.support import admin_schedule_form

pytestmark = pytest.mark.django_db

SEVERITY_ENUM = "['info', 'low', 'medium', 'high', 'critical']"
BAD_SEVERITY = f"$.min_severity: 'urgent' is not one of {SEVERITY_ENUM}"


def _create(api, **fields):
    body = {
        "name": "triage",
        "job_key": "log_triage",
        "schedule_type": "interval",
        "interval_minutes": 10,
        **fields,
    }
    return api.post("/api/schedules/", body, format="json")


def test_log_triage_declares_its_schema__shown_read_only_on_the_job(api):
    job = api.get("/api/jobs/log_triage/").json()
    assert set(job["params_schema"]["properties"]) == {"files", "min_severity"}
    assert job["params_schema"]["additionalProperties"] is False
    refused = api.patch("/api/jobs/log_triage/", {"params_schema": {}}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"params_schema": ["This field is read-only."]}


@pytest.mark.parametrize(
    ("params", "messages"),
    [
        ({"min_severity": "urgent"}, [BAD_SEVERITY]),
        ({"files": ["auth.log", 7]}, ["$.files[1]: 7 is not of type 'string'"]),
        (
            {"min_severty": "high"},
            ["$: Additional properties are not allowed ('min_severty' was unexpected)"],
        ),
        (
            {"files": "auth.log", "min_severity": "urgent"},
            ["$.files: 'auth.log' is not of type 'array'", BAD_SEVERITY],
        ),
        (["high"], ["$: must be a JSON object, not an array."]),
        ("high", ["$: must be a JSON object, not a string."]),
    ],
)
def test_create__params_outside_the_schema__400_naming_each_path_and_nothing_saved(api, params, messages):
    response = _create(api, params=params)
    assert response.status_code == 400, response.content
    assert response.json() == {"params": messages}
    assert not Schedule.objects.exists()


def test_create__params_null_or_too_big__400_naming_params(api):
    assert _create(api, params=None).json() == {"params": ["This field may not be null."]}
    big = {"files": ["x" * 100] * 40, "pad": "y" * MAX_PARAMS_BYTES}
    response = _create(api, params=big)
    assert response.status_code == 400
    assert response.json()["params"][0].startswith("$: ")
    assert f"at most {MAX_PARAMS_BYTES}" in response.json()["params"][0]


def test_create_and_patch__params_saved_shown_and_recorded_in_the_change_history(api):
    created = _create(api, params={"files": ["auth.log*"], "min_severity": "medium"})
    assert created.status_code == 201, created.content
    sid = created.json()["id"]
    assert created.json()["params"] == {"files": ["auth.log*"], "min_severity": "medium"}
    assert _create(api, name="no-params").json()["params"] == {}

    refused = api.patch(f"/api/schedules/{sid}", {"params": {"min_severity": "urgent"}}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"params": [BAD_SEVERITY]}
    assert Schedule.objects.get(pk=sid).params == {"files": ["auth.log*"], "min_severity": "medium"}

    patched = api.patch(f"/api/schedules/{sid}", {"params": {"min_severity": "high"}}, format="json")
    assert patched.status_code == 200, patched.content
    assert patched.json()["params"] == {"min_severity": "high"}
    change = ScheduleChange.objects.filter(schedule_id=sid, action="update").get()
    assert change.changes == {
        "params": {"old": {"files": ["auth.log*"], "min_severity": "medium"}, "new": {"min_severity": "high"}}
    }
    created_record = ScheduleChange.objects.get(schedule_id=sid, action="create")
    assert created_record.changes["params"]["new"] == {"files": ["auth.log*"], "min_severity": "medium"}
    shown = api.get(f"/api/schedules/{sid}/changes").json()["results"][0]
    assert shown["changes"]["params"]["new"] == {"min_severity": "high"}


def test_run_now__override_merged_over_the_schedules_params_checked_and_kept_on_the_run(api, redis_client):
    sid = _create(api, params={"files": ["auth.log"], "min_severity": "medium"}).json()["id"]

    refused = api.post(f"/api/schedules/{sid}/run-now", {"params": {"min_severity": "urgent"}}, format="json")
    assert refused.status_code == 400
    assert refused.json() == {"params": [BAD_SEVERITY]}
    not_object = api.post(f"/api/schedules/{sid}/run-now", {"params": [1]}, format="json")
    assert not_object.json() == {"params": ["$: must be a JSON object, not an array."]}
    assert not Run.objects.exists()

    plain = api.post(f"/api/schedules/{sid}/run-now")
    assert plain.status_code == 202, plain.content
    assert plain.json()["params"] == {"files": ["auth.log"], "min_severity": "medium"}
    override = api.post(f"/api/schedules/{sid}/run-now", {"params": {"min_severity": "high"}}, format="json")
    assert override.status_code == 202, override.content
    assert override.json()["params"] == {"files": ["auth.log"], "min_severity": "high"}
    run = Run.objects.get(pk=override.json()["run"])
    assert run.params == {"files": ["auth.log"], "min_severity": "high"}
    assert run.scheduled_for == ScheduledRun.objects.get(run=run).scheduled_for
    history = api.get(f"/api/schedules/{sid}/history").json()["results"]
    assert [row["params"]["min_severity"] for row in history] == ["high", "medium"]
    assert Schedule.objects.get(pk=sid).params["min_severity"] == "medium"


def test_run_now__schedule_params_that_no_longer_fit_a_changed_schema__400(api):
    sid = _create(api, params={"min_severity": "low"}).json()["id"]
    Job.objects.filter(key="log_triage").update(
        params_schema={"type": "object", "properties": {"min_severity": {"enum": ["high"]}}}
    )
    response = api.post(f"/api/schedules/{sid}/run-now")
    assert response.status_code == 400
    assert response.json() == {"params": ["$.min_severity: 'low' is not one of ['high']"]}
    # Other edits and a disable still work: the params are checked when they or the job change.
    assert api.post(f"/api/schedules/{sid}/disable").status_code == 200
    assert api.patch(f"/api/schedules/{sid}", {"jitter_seconds": 5}, format="json").status_code == 200


def test_post_runs__params_checked_stored_and_shown(api, redis_client):
    refused = api.post(
        "/api/runs/", {"job_key": "log_triage", "params": {"min_severity": "urgent"}}, format="json"
    )
    assert refused.status_code == 400
    assert refused.json() == {"params": [BAD_SEVERITY]}
    assert not Run.objects.exists()

    launched = api.post(
        "/api/runs/", {"job_key": "log_triage", "params": {"files": ["app.log"]}}, format="json"
    )
    assert launched.status_code == 202, launched.content
    run = api.get(f"/api/runs/{launched.json()['id']}/").json()
    assert run["params"] == {"files": ["app.log"]}
    assert (run["scheduled_for"], run["previous_scheduled_for"]) == (None, None)
    assert api.post("/api/runs/", {"job_key": "log_triage"}, format="json").json()["params"] == {}


def test_execute__params_that_no_longer_fit__fail_before_any_task_naming_the_path():
    job = Job.objects.get(key="log_triage")
    run = OrchestratorService.launch(job=job, params={"min_severity": "low"})
    job.params_schema = {"type": "object", "properties": {"min_severity": {"enum": ["high"]}}}
    job.save()
    with pytest.raises(ParamsInvalid) as caught:
        OrchestratorService.execute(Run.objects.select_related("job").get(pk=run.pk))
    assert str(caught.value) == (
        "params do not fit the job's params_schema: $.min_severity: 'low' is not one of ['high']"
    )


def test_backfill__each_run_gets_its_slot_and_the_previous_launched_slot(api, redis_client):
    sid = _create(api, params={"min_severity": "high"}, interval_minutes=1).json()["id"]
    schedule = Schedule.objects.get(pk=sid)
    anchor = schedule.next_run_at
    # In the window already: a slot that ran and a skipped one; the backfill fills the others.
    existing = anchor - timedelta(minutes=4)
    OrchestratorService.launch(job=schedule.job)  # a run of another kind does not count
    ScheduledRun.objects.create(
        schedule=schedule,
        run=OrchestratorService.launch(job=schedule.job),
        trigger="schedule",
        scheduled_for=existing,
    )
    ScheduledRun.objects.create(
        schedule=schedule, trigger="schedule", scheduled_for=anchor - timedelta(minutes=3), status="skipped"
    )
    body = {
        "start": (anchor - timedelta(minutes=5)).isoformat(),
        "end": (anchor - timedelta(minutes=1)).isoformat(),
    }
    assert api.post(f"/api/schedules/{sid}/backfill", body, format="json").json()["created"] == 2

    runs = {
        sr.scheduled_for: sr.run
        for sr in ScheduledRun.objects.filter(schedule=schedule, trigger="backfill").select_related("run")
    }
    minutes = {m: anchor - timedelta(minutes=m) for m in (5, 2)}
    assert runs.keys() == set(minutes.values())
    assert runs[minutes[5]].previous_scheduled_for is None
    # Before the slot 2 minutes back: a skipped slot (no run, not counted), then the one that ran.
    assert runs[minutes[2]].previous_scheduled_for == existing
    assert all(run.params == {"min_severity": "high"} for run in runs.values())
    assert all(run.scheduled_for == slot for slot, run in runs.items())


def test_sync__params_declared_in_a_file_are_checked_saved_and_recorded(tmp_path):
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    def sync(text: str) -> str:
        path = tmp_path / "schedules.toml"
        path.write_text(text)
        out = StringIO()
        call_command("sync_schedules", str(path), stdout=out)
        return out.getvalue()

    base = (
        '[[schedules]]\nname = "auth-only"\njob_key = "log_triage"\nschedule_type = "interval"\n'
        "interval_minutes = 10\n"
    )
    assert "create auth-only" in sync(
        base + '[schedules.params]\nfiles = ["auth.log*"]\nmin_severity = "low"\n'
    )
    schedule = Schedule.objects.get(name="auth-only")
    assert schedule.params == {"files": ["auth.log*"], "min_severity": "low"}
    out = sync(base + '[schedules.params]\nfiles = ["auth.log*"]\nmin_severity = "high"\n')
    assert "update auth-only: params:" in out
    change = ScheduleChange.objects.get(schedule_id=schedule.pk, source="sync", action="update")
    assert change.changes["params"]["new"] == {"files": ["auth.log*"], "min_severity": "high"}
    assert "nothing to change" in sync(
        base + '[schedules.params]\nfiles = ["auth.log*"]\nmin_severity = "high"\n'
    )

    for text, words in [
        (base + '[schedules.params]\nmin_severity = "urgent"\n', BAD_SEVERITY),
        (base + 'params = "high"\n', "params must be a table"),
        (
            base + "[schedules.params]\nfiles = 2026-01-01T00:00:00Z\n",
            "params: $: must hold JSON values only",
        ),
    ]:
        with pytest.raises(CommandError, match="nothing changed") as caught:
            sync(text)
        assert words in str(caught.value)
    assert Schedule.objects.get(name="auth-only").params["min_severity"] == "high"


def test_admin__params_checked_against_the_schema_saved_and_shown_on_the_run(staff, redis_client):
    response = staff.post(
        "/admin/schedules/schedule/add/", admin_schedule_form(params='{"min_severity": "urgent"}')
    )
    assert response.status_code == 200
    assert "$.min_severity: &#x27;urgent&#x27; is not one of" in response.content.decode()
    assert not Schedule.objects.exists()

    response = staff.post(
        "/admin/schedules/schedule/add/", admin_schedule_form(params='{"min_severity": "high"}')
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule = Schedule.objects.get(name="admin-made")
    assert schedule.params == {"min_severity": "high"}
    assert (
        staff.post("/admin/schedules/schedule/add/", admin_schedule_form(name="blank", params="")).status_code
        == 302
    )
    assert Schedule.objects.get(name="blank").params == {}

    scheduled = services.run_now(schedule)
    page = staff.get(f"/admin/orchestrator/run/{scheduled.run_id}/change/").content.decode()
    assert "min_severity" in page
    dashboard = staff.get(f"/dashboard/runs/{scheduled.run_id}/").content.decode()
    assert "&quot;min_severity&quot;: &quot;high&quot;" in dashboard
    assert db_now() - scheduled.scheduled_for < timedelta(minutes=1)


def _viewer_client(django_user_model):
    from django.contrib.auth.models import Group
    from django.test import Client

    from monitoring.permissions import VIEWERS_GROUP

    user = django_user_model.objects.create_user("vera", password="pw-vera-12345", is_staff=True)
    user.groups.add(Group.objects.get(name=VIEWERS_GROUP))
    client = Client()
    client.force_login(user)
    return client


def test_admin_run_now_with_params__prefilled_override_kept_on_the_run_violation_refused(staff, redis_client):
    schedule = services.create_schedule(
        name="triage", job=Job.objects.get(key="log_triage"), schedule_type="interval", interval_minutes=10,
        params={"files": ["auth.log"], "min_severity": "medium"},
    )  # fmt: skip
    url = f"/admin/schedules/schedule/{schedule.pk}/run-now-with-params/"
    assert f'href="{url}"' in staff.get(f"/admin/schedules/schedule/{schedule.pk}/change/").content.decode()
    page = staff.get(url).content.decode()
    assert "&quot;min_severity&quot;: &quot;medium&quot;" in page  # the schedule's params, to edit
    assert "&quot;additionalProperties&quot;: false" in page  # the job's params_schema, for reference

    for text, message in [
        ('{"min_severity": "urgent"}', "$.min_severity: &#x27;urgent&#x27; is not one of"),
        ('{"min_severity": ', "$: not valid JSON: Expecting value (line 1, column 18)."),
        ('["high"]', "$: must be a JSON object, not an array."),
    ]:
        refused = staff.post(url, {"params": text})
        assert refused.status_code == 200
        assert message in refused.content.decode()
    assert not Run.objects.exists()

    response = staff.post(url, {"params": '{"min_severity": "high"}'})
    assert response.status_code == 302
    assert response["Location"] == f"/admin/schedules/schedule/{schedule.pk}/change/"
    scheduled = ScheduledRun.objects.select_related("run").get(schedule=schedule)
    assert scheduled.trigger == "manual"
    assert scheduled.run.params == {"files": ["auth.log"], "min_severity": "high"}
    assert staff.post(url, {"params": ""}).status_code == 302  # blank: the schedule's own
    assert Run.objects.latest("pk").params == {"files": ["auth.log"], "min_severity": "medium"}
    assert Schedule.objects.get(pk=schedule.pk).params["min_severity"] == "medium"


def test_admin_run_now_with_params__needs_change_permission(django_user_model):
    from django.contrib.auth.models import Permission
    from django.test import Client

    schedule = services.create_schedule(
        name="triage", job=Job.objects.get(key="log_triage"), schedule_type="interval", interval_minutes=10
    )
    looker = django_user_model.objects.create_user("looker", password="pw-looker-123", is_staff=True)
    looker.user_permissions.add(Permission.objects.get(codename="view_schedule"))
    client = Client()
    client.force_login(looker)
    url = f"/admin/schedules/schedule/{schedule.pk}/run-now-with-params/"
    assert (
        "run-now-with-params"
        not in client.get(f"/admin/schedules/schedule/{schedule.pk}/change/").content.decode()
    )
    assert client.get(url).status_code == 403
    assert client.post(url, {"params": '{"min_severity": "high"}'}).status_code == 403
    assert not Run.objects.exists()


def test_dashboard_run_now__params_override_checked_and_kept_on_the_run(
    staff, django_user_model, redis_client
):
    schedule = services.create_schedule(
        name="triage", job=Job.objects.get(key="log_triage"), schedule_type="interval", interval_minutes=10,
        params={"files": ["auth.log"], "min_severity": "medium"},
    )  # fmt: skip
    page = staff.get(f"/dashboard/schedules/{schedule.pk}/").content.decode()
    assert 'data-kind="run-now-params"' in page
    assert 'data-params="{&quot;files&quot;: [&quot;auth.log&quot;], &quot;min_severity&quot;: ' in page
    url = f"/dashboard/schedules/{schedule.pk}/run-now"

    refused = staff.post(url, {"params": '{"min_severity": "urgent"}'})
    assert refused.status_code == 400
    assert refused.json() == {"params": [BAD_SEVERITY]}
    not_json = staff.post(url, {"params": "{min_severity: high}"})
    assert not_json.status_code == 400
    assert not_json.json()["params"][0].startswith("$: not valid JSON: ")
    assert (
        _viewer_client(django_user_model).post(url, {"params": '{"min_severity": "high"}'}).status_code == 403
    )
    assert not Run.objects.exists()

    response = staff.post(url, {"params": '{"min_severity": "high"}'})
    assert response.status_code == 202, response.content
    run = Run.objects.get(pk=response.json()["scheduled_run"]["run_id"])
    assert run.params == {"files": ["auth.log"], "min_severity": "high"}
    plain = staff.post(url)
    assert plain.status_code == 202
    assert Run.objects.get(pk=plain.json()["scheduled_run"]["run_id"]).params["min_severity"] == "medium"


def test_plain_run_now_buttons__schedule_params_that_no_longer_fit__refused_nothing_run(staff):
    """The admin's and the dashboard's plain Run now check the schedule's params as the API's run-now does,
    rather than queueing a run that would fail at its start."""
    schedule = services.create_schedule(
        name="triage", job=Job.objects.get(key="log_triage"), schedule_type="interval", interval_minutes=10,
        params={"min_severity": "low"},
    )  # fmt: skip
    Job.objects.filter(key="log_triage").update(
        params_schema={"type": "object", "properties": {"min_severity": {"enum": ["high"]}}}
    )
    dashboard = staff.post(f"/dashboard/schedules/{schedule.pk}/run-now")
    assert dashboard.status_code == 400
    assert dashboard.json() == {"params": ["$.min_severity: 'low' is not one of ['high']"]}
    admin = staff.post(f"/admin/schedules/schedule/{schedule.pk}/run-now/", follow=True)
    assert "Nothing was run: params: $.min_severity: &#x27;low&#x27; is not one of" in admin.content.decode()
    assert not Run.objects.exists()
