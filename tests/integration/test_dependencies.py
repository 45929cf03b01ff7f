"""Run-after dependencies (issue 33.3, docs/SCHEDULES.md "Run after other schedules"): the API's rules
(ids or names, cycles refused naming the cycle, type none), the database's record of an upstream end,
and the sweep that turns each end into exactly one downstream run (guarantee 9)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.db import connection

from orchestrator.models import Job
from schedules import services
from schedules.dependencies import fire_dependencies
from schedules.models import Schedule, ScheduleChange, ScheduledRun, UpstreamEnd

pytestmark = pytest.mark.django_db

URL = "/api/schedules/"


def _schedule(name: str, **fields) -> Schedule:
    fields.setdefault("schedule_type", "interval")
    if fields["schedule_type"] == "interval":
        fields.setdefault("interval_minutes", 60)
    return services.create_schedule(name=name, job=Job.objects.get(key="log_triage"), **fields)


def _end(
    schedule: Schedule, status: str = "succeeded", scheduled_for: datetime | None = None
) -> ScheduledRun:
    """A run of `schedule` that ended in `status` (as the worker's finish writes it)."""
    run = services.run_now(schedule)
    if scheduled_for is not None:
        ScheduledRun.objects.filter(pk=run.pk).update(scheduled_for=scheduled_for)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE schedules_scheduledrun SET status = %s, finished_at = now() WHERE id = %s",
            [status, run.pk],
        )
    return run


def _downstream_runs(schedule: Schedule) -> list[ScheduledRun]:
    return list(ScheduledRun.objects.filter(schedule=schedule, trigger="dependency").order_by("pk"))


def test_api__run_after_takes_ids_or_names_and_shows_names(api):
    a = _schedule("dep-a")
    b = _schedule("dep-b")
    response = api.post(
        URL,
        {"name": "dep-c", "job_key": "log_triage", "schedule_type": "none", "run_after": [a.pk, "dep-b"]},
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["run_after"] == ["dep-a", "dep-b"]
    assert body["run_after_statuses"] == ["succeeded"]
    assert body["run_after_mode"] == "any"
    assert body["next_run_at"] is None
    assert body["upcoming"] == []
    assert body["next_run_note"] == "runs only after dep-a, dep-b"
    assert api.get(f"{URL}{a.pk}/").json()["run_before"] == ["dep-c"]
    assert b.run_before.get().name == "dep-c"


def test_api__unknown_upstream_is_a_400_naming_it(api):
    response = api.post(
        URL,
        {"name": "dep-x", "job_key": "log_triage", "schedule_type": "none", "run_after": ["nope", 999999]},
        format="json",
    )
    assert response.status_code == 400
    assert "'nope'" in response.json()["run_after"][0]
    assert "id 999999" in response.json()["run_after"][0]
    assert not Schedule.objects.filter(name="dep-x").exists()


@pytest.mark.parametrize("value", [[True], [{"id": 1}], "dep-a", [2**70], [""]])
def test_api__malformed_run_after_is_a_400(api, value):
    response = api.post(
        URL,
        {"name": "dep-y", "job_key": "log_triage", "schedule_type": "none", "run_after": value},
        format="json",
    )
    assert response.status_code == 400
    assert "run_after" in response.json()


def test_api__type_none_needs_an_upstream_and_no_timing(api):
    response = api.post(
        URL, {"name": "dep-n", "job_key": "log_triage", "schedule_type": "none"}, format="json"
    )
    assert response.status_code == 400
    assert "run_after" in response.json()
    a = _schedule("dep-a")
    response = api.post(
        URL,
        {
            "name": "dep-n",
            "job_key": "log_triage",
            "schedule_type": "none",
            "interval_minutes": 5,
            "run_after": ["dep-a"],
        },
        format="json",
    )
    assert response.status_code == 400
    assert "interval_minutes" in response.json()
    assert a.run_before.count() == 0


def test_api__a_cycle_is_a_400_that_names_it_and_changes_nothing(api):
    a = _schedule("cyc-a")
    b = _schedule("cyc-b", schedule_type="none", run_after=[a])
    c = _schedule("cyc-c", schedule_type="none", run_after=[b])
    response = api.patch(f"{URL}{a.pk}/", {"run_after": ["cyc-c"]}, format="json")
    assert response.status_code == 400
    assert response.json() == {"run_after": ["cycle cyc-a -> cyc-c -> cyc-b -> cyc-a."]}
    assert list(a.run_after.all()) == []
    response = api.patch(f"{URL}{c.pk}/", {"run_after": [c.pk]}, format="json")
    assert response.status_code == 400
    assert "cyc-c -> cyc-c" in response.json()["run_after"][0]
    assert list(c.run_after.all()) == [b]


def test_api__run_after_statuses_and_mode_are_checked(api):
    _schedule("dep-a")
    base = {"name": "dep-s", "job_key": "log_triage", "schedule_type": "none", "run_after": ["dep-a"]}
    for field, value in (
        ("run_after_statuses", ["queued"]),
        ("run_after_statuses", []),
        ("run_after_statuses", "succeeded"),
        ("run_after_statuses", ["failed", "failed"]),
        ("run_after_mode", "some"),
    ):
        response = api.post(URL, {**base, field: value}, format="json")
        assert response.status_code == 400, (field, value)
        assert field in response.json()
    response = api.post(URL, {**base, "run_after_statuses": ["failed", "succeeded"]}, format="json")
    assert response.status_code == 201


def test_change_history_records_run_after(api):
    a = _schedule("hist-a")
    b = _schedule("hist-b")
    response = api.patch(f"{URL}{b.pk}/", {"run_after": ["hist-a"], "run_after_mode": "all"}, format="json")
    assert response.status_code == 200, response.json()
    change = ScheduleChange.objects.filter(schedule_id=b.pk, action="update").get()
    assert change.changes["run_after"] == {"old": [], "new": ["hist-a"]}
    assert change.changes["run_after_mode"] == {"old": "any", "new": "all"}
    create = ScheduleChange.objects.filter(schedule_id=b.pk, action="create").get()
    assert create.changes["run_after"] == {"old": None, "new": []}
    assert a.run_before.get() == b


def test_deleting_an_upstream_is_refused_until_no_schedule_runs_after_it():
    a = _schedule("del-a")
    keep = _schedule("del-k")
    b = _schedule("del-b", run_after=[a, keep])
    with pytest.raises(services.ScheduleInUse, match="'del-b' runs after 'del-a'"):
        services.delete_schedule(a)
    assert [s.name for s in b.run_after.order_by("name")] == ["del-a", "del-k"]
    services.update_schedule(b, {"run_after": [keep]})
    services.delete_schedule(a)
    assert [s.name for s in b.run_after.all()] == ["del-k"]


def test_an_upstream_end_yields_one_downstream_run_linked_to_it():
    a = _schedule("end-a")
    b = _schedule("end-b", schedule_type="none", run_after=[a])
    up = _end(a)
    assert UpstreamEnd.objects.filter(scheduled_run_id=up.pk).count() == 1
    result = fire_dependencies()
    assert (result.consumed, result.created) == (1, 1)
    (down,) = _downstream_runs(b)
    assert down.upstream_run_id == up.pk
    assert down.status == "queued"
    assert down.run is not None
    assert down.run.trigger == "dependency"
    assert not UpstreamEnd.objects.exists()
    # A second sweep, and the same end recorded again (a replay), add nothing.
    assert fire_dependencies().created == 0
    UpstreamEnd.objects.create(scheduled_run_id=up.pk, schedule_id=a.pk, status="succeeded")
    assert fire_dependencies().created == 0
    assert len(_downstream_runs(b)) == 1
    assert ScheduledRun.objects.filter(run__trigger="dependency").count() == 1


def test_a_chain_fires_each_level_once():
    a = _schedule("ch-a")
    b = _schedule("ch-b", schedule_type="none", run_after=[a])
    c = _schedule("ch-c", schedule_type="none", run_after=[b])
    _end(a)
    fire_dependencies()
    (down_b,) = _downstream_runs(b)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE schedules_scheduledrun SET status = 'succeeded' WHERE id = %s", [down_b.pk])
    fire_dependencies()
    (down_c,) = _downstream_runs(c)
    assert down_c.upstream_run_id == down_b.pk


def test_only_the_statuses_named_qualify():
    a = _schedule("st-a")
    on_success = _schedule("st-s", schedule_type="none", run_after=[a])
    on_failure = _schedule("st-f", schedule_type="none", run_after=[a], run_after_statuses=["failed"])
    _end(a, "failed")
    _end(a, "cancelled")
    fire_dependencies()
    assert _downstream_runs(on_success) == []
    assert len(_downstream_runs(on_failure)) == 1
    assert not UpstreamEnd.objects.exists()


def test_runs_of_schedules_without_downstreams_record_nothing():
    a = _schedule("lone-a")
    _end(a)
    assert not UpstreamEnd.objects.exists()


def test_mode_all_fires_once_every_upstream_has_a_run_that_date():
    a1 = _schedule("all-a1")
    a2 = _schedule("all-a2")
    b = _schedule(
        "all-b", schedule_type="none", run_after=[a1, a2], run_after_mode="all", timezone="Asia/Tokyo"
    )
    # 2026-03-01 in Tokyo: 2026-02-28T15:00Z .. 2026-03-01T15:00Z.
    _end(a1, scheduled_for=datetime(2026, 2, 28, 16, 0, tzinfo=UTC))
    fire_dependencies()
    assert _downstream_runs(b) == []
    # a2's run of the day before (in Tokyo) does not complete the set.
    _end(a2, scheduled_for=datetime(2026, 2, 28, 14, 0, tzinfo=UTC))
    fire_dependencies()
    assert _downstream_runs(b) == []
    last = _end(a2, scheduled_for=datetime(2026, 3, 1, 14, 0, tzinfo=UTC))
    fire_dependencies()
    (down,) = _downstream_runs(b)
    assert down.upstream_run_id == last.pk
    assert str(down.dependency_date) == "2026-03-01"
    # Another upstream end the same date: still one.
    _end(a1, scheduled_for=datetime(2026, 3, 1, 1, 0, tzinfo=UTC))
    fire_dependencies()
    assert len(_downstream_runs(b)) == 1


def test_overlap_and_a_disabled_downstream_record_a_skipped_run():
    a = _schedule("ov-a")
    b = _schedule("ov-b", schedule_type="none", run_after=[a], overlap_policy="skip")
    _end(a)
    _end(a)
    fire_dependencies()
    statuses = sorted(r.status for r in _downstream_runs(b))
    assert statuses == ["queued", "skipped"]
    services.disable_schedule(b)
    _end(a)
    fire_dependencies()
    assert [r.status for r in _downstream_runs(b)][-1] == "skipped"
    assert len(_downstream_runs(b)) == 3


def test_the_unique_keys_are_database_constraints():
    a = _schedule("uq-a")
    b = _schedule("uq-b", schedule_type="none", run_after=[a])
    up = _end(a)
    fire_dependencies()
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        ScheduledRun.objects.create(
            schedule=b,
            trigger="dependency",
            scheduled_for=datetime.now(UTC),
            upstream_run=up,
            status="skipped",
        )


# --- Admin and dashboard --------------------------------------------------------------------------


def test_admin__run_after_by_names_and_a_cycle_shown_on_the_form(staff):
    from tests.support import admin_schedule_form

    a = _schedule("adm-a")
    response = staff.post(
        "/admin/schedules/schedule/add/",
        admin_schedule_form(
            name="adm-b",
            schedule_type="none",
            interval_minutes="",
            run_after_names="adm-a",
            run_after_mode="all",
            run_after_statuses=["succeeded", "failed"],
        ),
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    b = Schedule.objects.get(name="adm-b")
    assert list(b.run_after.all()) == [a]
    assert (b.run_after_mode, b.run_after_statuses, b.next_run_at) == ("all", ["succeeded", "failed"], None)
    assert ScheduleChange.objects.get(schedule_id=b.pk, source="admin").changes["run_after"]["new"] == [
        "adm-a"
    ]
    page = staff.get(f"/admin/schedules/schedule/{a.pk}/change/").content.decode()
    assert "adm-b" in page  # runs after this one

    response = staff.post(
        f"/admin/schedules/schedule/{a.pk}/change/",
        admin_schedule_form(name="adm-a", interval_minutes="60", run_after_names="adm-b"),
    )
    assert response.status_code == 200
    assert "cycle adm-a -&gt; adm-b -&gt; adm-a" in response.content.decode()
    assert list(a.run_after.all()) == []
    response = staff.post(
        f"/admin/schedules/schedule/{a.pk}/change/",
        admin_schedule_form(name="adm-a", interval_minutes="60", run_after_names="nope"),
    )
    assert response.status_code == 200
    assert "No such schedule: &#x27;nope&#x27;" in response.content.decode()


def test_dashboard__schedule_page_shows_upstreams_downstreams_and_the_link_in_history(staff):
    a = _schedule("dash-a")
    b = _schedule("dash-b", schedule_type="none", run_after=[a])
    up = _end(a)
    fire_dependencies()
    page = staff.get(f"/dashboard/schedules/{b.pk}/").content.decode()
    assert f'href="/dashboard/schedules/{a.pk}/">dash-a</a>' in page
    assert "when a run ends succeeded" in page
    assert f'(<a href="/dashboard/runs/{up.run_id}/">run {up.run_id}</a>)' in page
    page = staff.get(f"/dashboard/schedules/{a.pk}/").content.decode()
    assert f'runs before <a href="/dashboard/schedules/{b.pk}/">dash-b</a>' in page


def test_sync_schedules__run_after_by_name_in_any_order_and_a_cycle_refused():
    from schedules import sync

    entries = [
        {"name": "sync-b", "job_key": "log_triage", "schedule_type": "none", "run_after": ["sync-a"]},
        {"name": "sync-a", "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 60},
    ]
    steps = sync.sync(entries)
    assert [s.action for s in steps] == ["create", "create"]
    b = Schedule.objects.get(name="sync-b")
    assert [s.name for s in b.run_after.all()] == ["sync-a"]
    assert [s.action for s in sync.sync(entries)] == ["unchanged", "unchanged"]

    cyclic = [entries[0], {**entries[1], "run_after": ["sync-b"]}]
    with pytest.raises(sync.SyncError, match=r"run_after: cycle sync-(a|b) -> sync-(b|a) -> sync-(a|b)"):
        sync.sync(cyclic)
    assert list(Schedule.objects.get(name="sync-a").run_after.all()) == []
    with pytest.raises(sync.SyncError, match="run_after 'ghost' names no schedule"):
        sync.sync([{**entries[0], "run_after": ["ghost"]}, entries[1]])
    # A cycle through a schedule outside the file: the service finds it.
    outside = _schedule("sync-out", run_after=[Schedule.objects.get(name="sync-b")])
    with pytest.raises(sync.SyncError, match=r"run_after: cycle sync-a -> sync-out -> sync-b -> sync-a"):
        sync.sync([entries[0], {**entries[1], "run_after": [outside.name]}])
    with pytest.raises(sync.SyncError, match="run_after_statuses must be a list"):
        sync.sync([{**entries[0], "run_after_statuses": "failed"}, entries[1]])
    on_its_own = {**entries[0], "schedule_type": "interval", "interval_minutes": 60, "run_after": []}
    steps = sync.sync([on_its_own, entries[1]])
    assert steps[0].action == "update"
    assert steps[0].fields["run_after"] == {"old": ["sync-a"], "new": []}


def test_backfill_of_a_dependency_only_schedule_is_a_400(api):
    a = _schedule("bf-a")
    b = _schedule("bf-b", schedule_type="none", run_after=[a])
    response = api.post(
        f"{URL}{b.pk}/backfill",
        {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
        format="json",
    )
    assert response.status_code == 400
    assert "schedule_type" in response.json()
    response = api.post(f"{URL}preview", {"schedule_type": "none"}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["times"] == []


def test_the_upstream_link_is_nulled_when_the_upstream_run_goes(django_assert_max_num_queries):
    a = _schedule("gone-a")
    b = _schedule("gone-b", schedule_type="none", run_after=[a])
    _end(a)
    _end(a)
    fire_dependencies()
    first, second = _downstream_runs(b)
    # Retention deletes with raw SQL: the database nulls the link (no foreign key error at commit).
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM schedules_scheduledrun WHERE id = %s", [first.upstream_run_id])
    first.refresh_from_db()
    assert first.upstream_run_id is None
    # Deleting the upstream schedule (b no longer runs after it): its history goes in one DELETE, not
    # row by row.
    services.update_schedule(b, {"run_after": [_schedule("gone-k")]})
    with django_assert_max_num_queries(15):
        services.delete_schedule(a)
    second.refresh_from_db()
    assert second.upstream_run_id is None
    assert len(_downstream_runs(b)) == 2
