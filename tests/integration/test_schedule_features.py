"""Issue 16 through the API and the dispatch, against PostgreSQL: jitter, bounds, max_runs, pause notes,
the catch-up window, backfill, richer cron, preview, managed schedules and the change history.

Times that decide what is due come from the database (`db_now`); rows are aged with SQL.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils.dateparse import parse_datetime

from orchestrator.models import Run
from schedules import timing
from schedules.dispatch import dispatch_claimed
from schedules.models import Schedule, ScheduleChange, ScheduledRun
from schedules.slots import MISSED_REASON, OVERLAP_SKIP_REASON
from tests.scheduler_support import db_now, make_schedule, sql

pytestmark = pytest.mark.django_db

GRACE = timedelta(seconds=60)
ME = "me:1"
TTL = 60.0  # the claims these tests take (the real path renews them past a third of it)

BODY = {
    "name": "features",
    "job_key": "log_triage",
    "schedule_type": "interval",
    "interval_minutes": 10,
    "timezone": "UTC",
}


def claim(schedule) -> None:
    sql(
        "UPDATE schedules_schedule SET claimed_by = %s, claimed_until = now() + interval '60 seconds'"
        " WHERE id = %s",
        [ME, schedule.pk],
    )


def create(api, **fields):
    response = api.post("/api/schedules/", {**BODY, **fields}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def times(values) -> list:
    return [parse_datetime(v) for v in values]


# --- create, upcoming, preview ---------------------------------------------------------------------


def test_create__jitter_bounds_and_max_runs_show_in_the_response_and_upcoming(api):
    start = (db_now() + timedelta(hours=1)).replace(microsecond=0)
    end = start + timedelta(minutes=25)
    body = create(api, jitter_seconds=120, start_at=start.isoformat(), end_at=end.isoformat(), max_runs=2)

    assert (body["jitter_seconds"], body["max_runs"], body["runs_remaining"]) == (120, 2, 2)
    assert body["catchup_window_seconds"] is None
    upcoming = times(body["upcoming"])
    # Slots start_at, +10, +20 lie within the bounds; max_runs leaves two; each is jittered in [0, 120).
    assert len(upcoming) == 2
    for slot, at in zip([start, start + timedelta(minutes=10)], upcoming, strict=True):
        assert slot <= at < slot + timedelta(seconds=120)
    assert parse_datetime(body["next_run_at"]) == upcoming[0]


def test_preview__shows_the_times_the_saved_schedule_keeps_and_writes_nothing(api):
    fields = {
        "schedule_type": "cron",
        "cron_expr": "*/5 * * * *",
        "timezone": "Europe/Berlin",
        "jitter_seconds": 90,
    }
    before = (Schedule.objects.count(), ScheduleChange.objects.count())
    preview = api.post("/api/schedules/preview", {"name": "previewed", **fields, "count": 4}, format="json")
    assert preview.status_code == 200, preview.content
    assert (Schedule.objects.count(), ScheduleChange.objects.count()) == before
    assert preview.json()["description"].startswith("Every 5 minutes")

    created = create(api, name="previewed", interval_minutes=None, **fields)
    assert times(created["upcoming"])[:4] == times(preview.json()["times"])


def test_preview__count_default_and_limit(api):
    body = {"schedule_type": "interval", "interval_minutes": 1}
    assert len(api.post("/api/schedules/preview/", body, format="json").json()["times"]) == 10
    assert (
        len(api.post("/api/schedules/preview/", {**body, "count": 100}, format="json").json()["times"]) == 100
    )
    assert api.post("/api/schedules/preview/", {**body, "count": 101}, format="json").status_code == 400


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        (
            {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "61 * * * *"},
            "cron_expr",
            "minute",
        ),
        (
            {"schedule_type": "cron", "interval_minutes": None, "cron_expr": "0 0 * * 1#6"},
            "cron_expr",
            "day-of-week",
        ),
        ({"schedule_type": "cron", "interval_minutes": None, "cron_expr": "@often"}, "cron_expr", "alias"),
        ({"jitter_seconds": 601}, "jitter_seconds", "shortest gap"),
        ({"jitter_seconds": 86401, "interval_minutes": 2880}, "jitter_seconds", "24 hours"),
        ({"start_at": "2030-01-02T00:00:00Z", "end_at": "2030-01-01T00:00:00Z"}, "end_at", "after start_at"),
        ({"timezone": "Mars/Olympus"}, "timezone", "Unknown timezone"),
    ],
)
def test_create_and_preview__give_the_same_400_naming_the_field(api, fields, field, words):
    created = api.post("/api/schedules/", {**BODY, **fields}, format="json")
    timing_fields = {k: v for k, v in {**BODY, **fields}.items() if k not in ("job_key",)}
    preview = api.post("/api/schedules/preview/", timing_fields, format="json")
    assert created.status_code == preview.status_code == 400, (created.content, preview.content)
    assert words in " ".join(created.json()[field])
    assert created.json()[field] == preview.json()[field]
    assert not Schedule.objects.exists()


@pytest.mark.parametrize(("field", "value"), [("max_runs", 0), ("catchup_window_seconds", -1)])
def test_create__refuses_non_positive_limits(api, field, value):
    response = api.post("/api/schedules/", {**BODY, field: value}, format="json")
    assert response.status_code == 400
    assert field in response.json()


@pytest.mark.parametrize(
    "expr", ["@daily", "@hourly", "@weekly", "@monthly", "@yearly", "0 0 L * *", "0 9 * * 1#2", "H H * * *"]
)
def test_create__accepts_richer_cron(api, expr):
    body = create(api, schedule_type="cron", interval_minutes=None, cron_expr=expr)
    assert len(body["upcoming"]) == 5


def test_end_at_in_the_past__no_next_run_and_the_api_says_why(api):
    body = create(api, end_at=(db_now() - timedelta(minutes=1)).isoformat())
    assert body["next_run_at"] is None
    assert body["upcoming"] == []
    assert body["next_run_note"].startswith("ended")


# --- pause notes and the change history --------------------------------------------------------------


def test_disable_with_a_note__shown_until_enable_clears_it_and_every_step_is_in_the_history(api, user):
    created = create(api)
    url = f"/api/schedules/{created['id']}"
    paused = api.post(f"{url}/disable", {"note": "waiting for the log rotation fix"}, format="json").json()
    assert (paused["enabled"], paused["paused_note"], paused["paused_by"]) == (
        False,
        "waiting for the log rotation fix",
        user.username,
    )
    assert paused["paused_at"] is not None
    assert paused["next_run_note"] == "disabled: waiting for the log rotation fix"
    api.patch(url, {"interval_minutes": 15}, format="json")
    enabled = api.post(f"{url}/enable").json()
    assert (enabled["enabled"], enabled["paused_note"], enabled["paused_at"], enabled["paused_by"]) == (
        True,
        "",
        None,
        "",
    )

    changes = api.get(f"{url}/changes").json()["results"]
    assert [c["action"] for c in changes] == ["enable", "update", "disable", "create"]
    assert {(c["source"], c["actor"]) for c in changes} == {("api", user.username)}
    assert changes[1]["changes"]["interval_minutes"] == {"old": 10, "new": 15}
    assert changes[2]["changes"]["paused_note"] == {"old": "", "new": "waiting for the log rotation fix"}
    assert changes[3]["changes"]["name"] == {"old": None, "new": "features"}


def test_delete__is_recorded_and_outlives_the_schedule(api):
    created = create(api)
    assert api.delete(f"/api/schedules/{created['id']}").status_code == 204
    (change,) = ScheduleChange.objects.filter(schedule_id=created["id"], action="delete")
    assert change.changes["name"] == {"old": "features", "new": None}


def test_disable__note_too_long_is_a_400(api):
    created = create(api)
    response = api.post(f"/api/schedules/{created['id']}/disable", {"note": "x" * 501}, format="json")
    assert response.status_code == 400
    assert "note" in response.json()
    assert Schedule.objects.get(pk=created["id"]).enabled


# --- managed schedules -------------------------------------------------------------------------------


def test_managed__declared_fields_refused_with_409_run_now_enable_disable_allowed(api):
    created = create(api)
    Schedule.objects.filter(pk=created["id"]).update(managed=True)
    url = f"/api/schedules/{created['id']}"

    response = api.patch(url, {"interval_minutes": 5}, format="json")
    assert response.status_code == 409
    assert "sync_schedules" in response.json()["interval_minutes"][0]
    assert api.patch(url, {"interval_minutes": 10}, format="json").status_code == 200  # no change
    assert api.post(f"{url}/disable", {"note": "maintenance"}, format="json").status_code == 200
    assert api.post(f"{url}/enable").status_code == 200
    assert api.post(f"{url}/run-now").status_code == 202
    assert api.delete(url).status_code == 409
    assert Schedule.objects.get(pk=created["id"]).interval_minutes == 10


# --- dispatch: jitter, bounds, max_runs, catch-up window ------------------------------------------------


def test_dispatch__a_jittered_slot_is_keyed_on_the_slot_and_next_run_at_is_the_next_dispatch_time():
    now = db_now()
    s = make_schedule("jittered", jitter_seconds=300, interval_minutes=10)
    spec = timing.spec_of(s)
    slot = timing.first_slot(spec, now=now - timedelta(minutes=30))
    s.next_run_at = timing.dispatch_at(spec, slot)
    s.save(update_fields=["next_run_at"])
    claim(s)

    # run_once: the latest due
    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 1

    (run,) = ScheduledRun.objects.filter(schedule=s)
    s.refresh_from_db()
    assert run.scheduled_for == s.last_run_at  # the slot itself, never the jittered time
    assert (run.scheduled_for - slot) % timedelta(minutes=10) == timedelta(0)
    assert s.next_run_at == timing.dispatch_at(spec, run.scheduled_for + timedelta(minutes=10))
    assert s.next_run_at > now


def test_dispatch__max_runs_disables_the_schedule_with_a_note_and_scheduled_runs_only_count(api):
    now = db_now()
    s = make_schedule(
        "limited", next_run_at=now - timedelta(minutes=35), misfire_policy="run_all", max_runs=3
    )
    api.post(f"/api/schedules/{s.pk}/run-now")  # manual runs do not count
    claim(s)

    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 3  # 4 due, max_runs 3

    s.refresh_from_db()
    assert (s.enabled, s.scheduled_run_count, s.paused_note) == (False, 3, "completed 3 runs")
    body = api.get(f"/api/schedules/{s.pk}").json()
    assert body["runs_remaining"] == 0
    assert body["next_run_note"].startswith("completed")
    refused = api.post(f"/api/schedules/{s.pk}/enable")
    assert refused.status_code == 400
    assert "max_runs" in refused.json()
    assert (
        api.patch(f"/api/schedules/{s.pk}", {"max_runs": 5, "enabled": True}, format="json").status_code
        == 200
    )


def test_dispatch__past_end_at_nothing_runs_and_next_run_at_becomes_null():
    now = db_now()
    first = now - timedelta(minutes=35)
    s = make_schedule(
        "bounded", next_run_at=first, misfire_policy="run_all", end_at=first + timedelta(minutes=15)
    )
    claim(s)

    dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)

    assert sorted(ScheduledRun.objects.filter(schedule=s).values_list("scheduled_for", flat=True)) == [
        first,
        first + timedelta(minutes=10),
    ]
    s.refresh_from_db()
    assert s.next_run_at is None
    assert not sql("SELECT 1 FROM schedules_schedule WHERE id = %s AND claimed_by <> ''", [s.pk])


@pytest.mark.parametrize(
    ("window", "status", "reason"), [(None, "skipped", MISSED_REASON), (3600, "queued", "")]
)
def test_dispatch__the_catchup_window_decides_how_late_a_slot_may_still_run(window, status, reason):
    s = make_schedule(
        f"window-{window}",
        next_run_at=db_now() - timedelta(minutes=5),
        misfire_policy="skip",
        catchup_window_seconds=window,
    )
    claim(s)
    dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL)
    (run,) = ScheduledRun.objects.filter(schedule=s)
    assert (run.status, run.error_summary) == (status, reason)


# --- backfill -------------------------------------------------------------------------------------------


def test_backfill__creates_each_missing_slot_once_and_a_second_call_none(api):
    s = make_schedule("backfilled", next_run_at=db_now() + timedelta(minutes=5))
    anchor = s.next_run_at
    start, end = anchor - timedelta(minutes=100), anchor - timedelta(minutes=50)
    # One of those slots already ran as a scheduled run: it is skipped, not duplicated.
    ScheduledRun.objects.create(schedule=s, scheduled_for=anchor - timedelta(minutes=70), status="succeeded")
    body = {"start": start.isoformat(), "end": end.isoformat()}

    first = api.post(f"/api/schedules/{s.pk}/backfill", body, format="json")
    assert first.status_code == 200, first.content
    assert first.json() == {"created": 4, "skipped": 1, "overlap_skipped": 0, "slots": 5}
    again = api.post(f"/api/schedules/{s.pk}/backfill", body, format="json").json()
    assert again == {"created": 0, "skipped": 5, "overlap_skipped": 0, "slots": 5}

    backfilled = ScheduledRun.objects.filter(schedule=s, trigger="backfill")
    assert sorted(backfilled.values_list("scheduled_for", flat=True)) == [
        anchor - timedelta(minutes=m) for m in (100, 90, 80, 60)
    ]
    assert all(r.run.trigger == "backfill" and r.status == "queued" for r in backfilled)
    s.refresh_from_db()
    assert s.scheduled_run_count == 4


def test_backfill__the_overlap_policy_applies(api):
    s = make_schedule("backfill-skip", next_run_at=db_now())
    body = {
        "start": (s.next_run_at - timedelta(minutes=30)).isoformat(),
        "end": s.next_run_at.isoformat(),
        "overlap_policy": "skip",  # the backfill's own (issue 31; the default is allow)
    }
    result = api.post(f"/api/schedules/{s.pk}/backfill", body, format="json").json()
    assert result == {"created": 1, "skipped": 0, "overlap_skipped": 2, "slots": 3}
    reasons = ScheduledRun.objects.filter(schedule=s, status="skipped").values_list(
        "error_summary", flat=True
    )
    assert set(reasons) == {OVERLAP_SKIP_REASON}


@pytest.mark.parametrize(
    ("delta_start", "delta_end", "field"),
    [
        (timedelta(minutes=-10_010), timedelta(0), "end"),  # 1,001 one-minute slots
        (timedelta(minutes=-10), timedelta(minutes=10), "end"),  # the future
        (timedelta(minutes=-10), timedelta(minutes=-20), "end"),  # end before start
    ],
)
def test_backfill__bad_ranges_are_400s_and_write_nothing(api, delta_start, delta_end, field):
    s = make_schedule("backfill-bad", interval_minutes=10)
    now = db_now()
    body = {"start": (now + delta_start).isoformat(), "end": (now + delta_end).isoformat()}
    runs = Run.objects.count()
    response = api.post(f"/api/schedules/{s.pk}/backfill", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert Run.objects.count() == runs
    assert not ScheduledRun.objects.filter(schedule=s).exists()


def test_backfill__a_slot_backfilled_first_is_not_dispatched_again_by_the_scheduler(api):
    now = db_now()
    s = make_schedule("race", next_run_at=now - timedelta(seconds=30))
    body = {"start": (s.next_run_at - timedelta(seconds=1)).isoformat(), "end": now.isoformat()}
    assert api.post(f"/api/schedules/{s.pk}/backfill", body, format="json").json()["created"] == 1
    claim(s)
    assert dispatch_claimed([s.pk], claimant=ME, grace=GRACE, ttl=TTL).dispatched == 0
    assert ScheduledRun.objects.filter(schedule=s).count() == 1


# --- schedules as code: manage.py sync_schedules ------------------------------------------------------

SCHEDULES_TOML = """
[[schedules]]
name = "nightly-triage"
job_key = "log_triage"
schedule_type = "cron"
cron_expr = "@daily"
timezone = "Europe/London"
jitter_seconds = 600
end_at = 2030-01-01T00:00:00Z

[[schedules]]
name = "every-ten"
job_key = "log_triage"
schedule_type = "interval"
interval_minutes = 10
max_runs = 50
"""


def sync_file(tmp_path, text: str, *args: str, name: str = "schedules.toml") -> str:
    from io import StringIO

    from django.core.management import call_command

    path = tmp_path / name
    path.write_text(text)
    out = StringIO()
    call_command("sync_schedules", str(path), *args, stdout=out)
    return out.getvalue()


def test_sync__creates_managed_schedules_and_a_second_run_changes_nothing(tmp_path, api):
    out = sync_file(tmp_path, SCHEDULES_TOML)
    assert "create nightly-triage" in out
    assert "create every-ten" in out
    nightly = Schedule.objects.get(name="nightly-triage")
    assert (nightly.managed, nightly.cron_expr, nightly.jitter_seconds, nightly.enabled) == (
        True,
        "@daily",
        600,
        True,
    )
    assert set(ScheduleChange.objects.values_list("source", "action")) == {("sync", "create")}

    changes = ScheduleChange.objects.count()
    assert "nothing to change (2 schedule(s) already as declared)" in sync_file(tmp_path, SCHEDULES_TOML)
    assert ScheduleChange.objects.count() == changes

    response = api.patch(f"/api/schedules/{nightly.pk}", {"jitter_seconds": 5}, format="json")
    assert response.status_code == 409
    assert "jitter_seconds" in response.json()


def test_sync__dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = sync_file(tmp_path, SCHEDULES_TOML, "--dry-run")
    assert "would create nightly-triage" in out
    assert "dry run: nothing written" in out
    assert not Schedule.objects.exists()
    assert not ScheduleChange.objects.exists()


def test_sync__updates_disables_and_prunes_only_managed_schedules(tmp_path):
    sync_file(tmp_path, SCHEDULES_TOML)
    make_schedule("hand-made")  # not managed: --prune leaves it alone
    edited = SCHEDULES_TOML.replace('name = "nightly-triage"', 'name = "nightly-triage"\nenabled = false')
    edited = edited[: edited.index('\n[[schedules]]\nname = "every-ten"')]

    out = sync_file(tmp_path, edited, "--prune")

    assert "update nightly-triage: enabled: True -> False" in out
    assert "delete every-ten" in out
    assert not Schedule.objects.get(name="nightly-triage").enabled
    assert set(Schedule.objects.values_list("name", flat=True)) == {"nightly-triage", "hand-made"}
    assert ScheduleChange.objects.filter(action="delete", source="sync", schedule_name="every-ten").exists()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (SCHEDULES_TOML.replace("interval_minutes = 10", "interval_minutes = 0"), "interval_minutes"),
        (SCHEDULES_TOML.replace('cron_expr = "@daily"', 'cron_expr = "61 * * * *"'), "minute"),
        (SCHEDULES_TOML.replace("max_runs = 50", "max_rums = 50"), "unknown field 'max_rums'"),
        (SCHEDULES_TOML.replace('name = "every-ten"', 'name = "nightly-triage"'), "declared twice"),
        (SCHEDULES_TOML + "\n[oops", "not valid TOML"),
        (SCHEDULES_TOML.replace("interval_minutes = 10", 'interval_minutes = "ten"'), "must be an integer"),
        (SCHEDULES_TOML.replace("max_runs = 50", "enabled = 1"), "must be true or false"),
    ],
)
def test_sync__a_bad_file_changes_nothing_and_says_what_is_wrong(tmp_path, text, words):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="nothing changed") as caught:
        sync_file(tmp_path, text)
    assert words in str(caught.value)
    assert not Schedule.objects.exists()


def test_sync__reads_yaml_too(tmp_path):
    pytest.importorskip("yaml", reason="YAML schedules files need PyYAML")
    text = (
        "schedules:\n"
        "  - name: yaml-one\n    job_key: log_triage\n    schedule_type: interval\n    interval_minutes: 30\n"
        "    start_at: '2030-01-01T00:00:00Z'\n"
    )
    assert "create yaml-one" in sync_file(tmp_path, text, name="schedules.yaml")
    schedule = Schedule.objects.get(name="yaml-one")
    assert schedule.managed
    assert schedule.next_run_at == parse_datetime("2030-01-01T00:00:00Z")  # an interval starts at start_at


# --- the admin -------------------------------------------------------------------------------------------


def test_admin__shows_the_new_fields_and_the_change_history(staff, api):
    created = create(api, jitter_seconds=30, max_runs=4)
    api.post(f"/api/schedules/{created['id']}/disable", {"note": "holiday freeze"}, format="json")
    page = staff.get(f"/admin/schedules/schedule/{created['id']}/change/").content.decode().lower()
    for text in (
        "jitter_seconds",
        "catchup_window_seconds",
        "holiday freeze",
        "runs remaining",
        "changes (newest first)",
    ):
        assert text in page
    history = page[page.index("changes (newest first)") :]
    assert history.index("<td>disable</td>") < history.index("<td>create</td>")  # newest first


def test_admin__a_managed_schedules_declared_fields_are_read_only_and_saves_are_recorded(staff, api):
    created = create(api)
    Schedule.objects.filter(pk=created["id"]).update(managed=True)
    url = f"/admin/schedules/schedule/{created['id']}/change/"
    form = staff.get(url).context["adminform"].form
    assert "interval_minutes" not in form.fields  # shown read-only
    assert "enabled" in form.fields

    response = staff.post(url, {"enabled": "", "interval_minutes": "1", "_save": "Save"})
    assert response.status_code == 302, response.content[-2000:]
    schedule = Schedule.objects.get(pk=created["id"])
    assert (schedule.enabled, schedule.interval_minutes) == (False, 10)
    latest = ScheduleChange.objects.filter(schedule_id=schedule.pk).first()
    assert (latest.source, latest.actor, latest.changes["enabled"]) == (
        "admin",
        "root",
        {"old": True, "new": False},
    )
    assert staff.get(f"/admin/schedules/schedule/{created['id']}/delete/").status_code == 403


def test_admin__disable_with_a_note_and_backfill_actions_ask_first_then_act(staff):
    s = make_schedule("admin-actions", next_run_at=db_now() + timedelta(minutes=5))
    changelist = "/admin/schedules/schedule/"
    asked = staff.post(changelist, {"action": "disable_with_note", "_selected_action": [s.pk]})
    assert asked.status_code == 200
    assert b'name="note"' in asked.content
    s.refresh_from_db()
    assert s.enabled  # nothing done before the form is sent

    done = staff.post(
        changelist,
        {"action": "disable_with_note", "_selected_action": [s.pk], "apply": "1", "note": "db upgrade"},
    )
    assert done.status_code == 302
    s.refresh_from_db()
    assert (s.enabled, s.paused_note, s.paused_by) == (False, "db upgrade", "root")

    start = (s.next_run_at - timedelta(minutes=45)).strftime("%Y-%m-%d %H:%M:%S")
    end = (s.next_run_at - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
    body = {"action": "backfill", "_selected_action": [s.pk], "apply": "1", "start": start, "end": end}
    assert staff.post(changelist, body).status_code == 302
    assert ScheduledRun.objects.filter(schedule=s, trigger="backfill").count() == 4
    staff.post(changelist, body)
    assert ScheduledRun.objects.filter(schedule=s, trigger="backfill").count() == 4
