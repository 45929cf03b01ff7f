"""Deleting a schedule others run after (docs/SCHEDULES.md "Run after other schedules"): refused with a
409 naming the downstreams, through the API, bulk, the admin and sync_schedules --prune, nothing
written; an upstream deleted together with all its downstreams goes. Before this, the delete dropped
the upstream from each downstream's run_after with no change record, and left a `none` downstream with
no upstream at all (a state create refuses)."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from schedules.models import Schedule, ScheduleChange

pytestmark = pytest.mark.django_db

URL = "/api/schedules/"
BULK = "/api/schedules/bulk"
ADMIN = "/admin/schedules/schedule/"


def make(api, name: str, **fields) -> int:
    body = {"name": name, "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 60}
    body.update(fields)
    response = api.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


@pytest.fixture
def chain(api) -> dict[str, int]:
    """up-x, and down-x (type none) running only after it."""
    up = make(api, "up-x")
    down = make(api, "down-x", schedule_type="none", interval_minutes=None, run_after=["up-x"])
    return {"up-x": up, "down-x": down}


def assert_untouched(api, chain: dict[str, int]) -> None:
    """Both schedules still there, down-x still after up-x, and no record but the creates."""
    assert set(Schedule.objects.values_list("name", flat=True)) >= set(chain)
    assert api.get(f"{URL}{chain['down-x']}/").json()["run_after"] == ["up-x"]
    assert not ScheduleChange.objects.exclude(action="create").exists()


def test_api__deleting_an_upstream_is_a_409_naming_its_downstreams(api, chain):
    refused = api.delete(f"{URL}{chain['up-x']}/")
    assert refused.status_code == 409, refused.content
    (message,) = refused.json()["run_before"]
    assert "'down-x'" in message
    assert "'up-x'" in message
    assert_untouched(api, chain)
    # The downstream first, then the upstream: both go.
    assert api.delete(f"{URL}{chain['down-x']}/").status_code == 204
    assert api.delete(f"{URL}{chain['up-x']}/").status_code == 204
    assert not Schedule.objects.exists()


def test_api__the_409_names_every_downstream(api, chain):
    make(api, "down-y", run_after=["up-x"])
    refused = api.delete(f"{URL}{chain['up-x']}/")
    assert refused.status_code == 409, refused.content
    assert refused.json() == {
        "run_before": [
            "Schedules 'down-x', 'down-y' run after 'up-x': remove 'up-x' from their run_after first, or"
            " delete them together with it."
        ]
    }


@pytest.mark.parametrize("dry_run", [False, True])
def test_bulk__deleting_an_upstream_without_its_downstreams_refuses_all(api, chain, dry_run):
    free = make(api, "free-x")
    response = api.post(
        BULK, {"action": "delete", "ids": [free, chain["up-x"]], "dry_run": dry_run}, format="json"
    )
    assert response.status_code == 409, response.content
    body = response.json()
    assert [(c["id"], c["name"]) for c in body["changed"]] == [(free, "free-x")]
    (refusal,) = body["refused"]
    assert (refusal["id"], refusal["name"]) == (chain["up-x"], "up-x")
    assert "'down-x'" in refusal["reasons"]["run_before"][0]
    assert Schedule.objects.filter(pk=free).exists()
    assert_untouched(api, chain)


def test_bulk__an_upstream_deleted_with_all_its_downstreams_goes(api, chain):
    last = make(api, "last-x", schedule_type="none", interval_minutes=None, run_after=["down-x"])
    # Two of the three of the chain: down-x is still needed by last-x.
    response = api.post(BULK, {"action": "delete", "ids": [chain["up-x"], chain["down-x"]]}, format="json")
    assert response.status_code == 409, response.content
    (refusal,) = response.json()["refused"]
    assert refusal["name"] == "down-x"
    assert "'last-x'" in refusal["reasons"]["run_before"][0]

    response = api.post(BULK, {"action": "delete", "ids": [*chain.values(), last]}, format="json")
    assert response.status_code == 200, response.content
    assert not Schedule.objects.exists()
    record = ScheduleChange.objects.get(schedule_name="down-x", action="delete")
    assert record.changes["run_after"] == {"old": ["up-x"], "new": None}


def test_admin_delete_page__says_cannot_delete_naming_the_downstreams(api, staff, chain):
    page = staff.get(f"{ADMIN}{chain['up-x']}/delete/")
    assert page.status_code == 200
    html = page.content.decode()
    assert "Cannot delete schedule" in html
    assert "&#x27;down-x&#x27; runs after &#x27;up-x&#x27;" in html
    # Confirming anyway deletes nothing: the same page again.
    response = staff.post(f"{ADMIN}{chain['up-x']}/delete/", {"post": "yes"})
    assert response.status_code == 200
    assert "Cannot delete schedule" in response.content.decode()
    assert_untouched(api, chain)


def test_admin_delete_action__refuses_an_upstream_alone_and_takes_it_with_its_downstreams(api, staff, chain):
    response = staff.post(
        ADMIN, {"action": "delete_selected", "_selected_action": [chain["up-x"]], "post": "yes"}, follow=True
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "Cannot delete schedule" in html
    assert "Successfully deleted" not in html
    assert "&#x27;down-x&#x27; runs after &#x27;up-x&#x27;" in html
    assert_untouched(api, chain)

    response = staff.post(
        ADMIN,
        {"action": "delete_selected", "_selected_action": list(chain.values()), "post": "yes"},
        follow=True,
    )
    assert "Successfully deleted 2 schedules" in response.content.decode()
    assert not Schedule.objects.exists()
    assert ScheduleChange.objects.filter(action="delete", source="admin").count() == 2


ENTRY = '[[schedules]]\nname = "{}"\njob_key = "log_triage"\nschedule_type = "{}"\n{}\n'
UP = ENTRY.format("up-x", "interval", "interval_minutes = 60")
DOWN = ENTRY.format("down-x", "none", 'run_after = ["up-x"]')


def test_sync_prune__refuses_an_upstream_a_kept_schedule_runs_after(tmp_path, api):
    path = tmp_path / "schedules.toml"
    path.write_text(UP + DOWN)
    call_command("sync_schedules", str(path), stdout=StringIO())
    ids = dict(Schedule.objects.values_list("name", "pk"))
    # down-x stays in the file (still naming up-x, which the sync finds in the database); up-x goes.
    path.write_text(DOWN)
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(CommandError, match=r"'down-x' runs after 'up-x'.*nothing changed"):
            call_command("sync_schedules", str(path), "--prune", *dry_run, stdout=StringIO())
        assert_untouched(api, ids)
    # Dropped from the file together, they go together.
    path.write_text(ENTRY.format("other-x", "interval", "interval_minutes = 60"))
    out = StringIO()
    call_command("sync_schedules", str(path), "--prune", stdout=out)
    assert "delete up-x" in out.getvalue()
    assert "delete down-x" in out.getvalue()
    assert list(Schedule.objects.values_list("name", flat=True)) == ["other-x"]


def test_sync_prune__refuses_an_upstream_an_unmanaged_schedule_runs_after(tmp_path, api):
    path = tmp_path / "schedules.toml"
    path.write_text(UP)
    call_command("sync_schedules", str(path), stdout=StringIO())
    chain = {"up-x": Schedule.objects.get(name="up-x").pk}
    chain["down-x"] = make(api, "down-x", schedule_type="none", interval_minutes=None, run_after=["up-x"])
    path.write_text(ENTRY.format("other-x", "interval", "interval_minutes = 60"))
    with pytest.raises(CommandError, match="'down-x' runs after 'up-x'"):
        call_command("sync_schedules", str(path), "--prune", stdout=StringIO())
    assert_untouched(api, chain)
    assert not Schedule.objects.filter(name="other-x").exists()


@pytest.mark.django_db(transaction=True)
def test_an_edit_racing_the_upstreams_delete_gets_a_400_or_the_delete_a_409_never_a_500(api):
    """Two sessions at once: one deletes up-x, the other makes down-x run after it. Whichever locks
    up-x first wins cleanly: the edit that comes second is a 400 naming run_after (before, its foreign key
    failed at commit: a 500), the delete that comes second a 409 naming down-x. Nothing half-written."""
    import threading

    from django.db import connection, transaction

    from schedules import services

    def race(first: str) -> tuple[int | str, int]:
        up, down = make(api, "up-x"), make(api, "down-x")
        holding, release = threading.Event(), threading.Event()
        outcome: dict[str, object] = {}

        def delete() -> None:
            try:
                with transaction.atomic():
                    services.delete_schedules([up])
                    holding.set()
                    release.wait(30)
                outcome["delete"] = "deleted"
            except services.ScheduleInUse as exc:
                outcome["delete"] = exc
            finally:
                holding.set()
                connection.close()

        def edit() -> None:
            try:
                with transaction.atomic():
                    response = api.patch(f"{URL}{down}/", {"run_after": ["up-x"]}, format="json")
                    outcome["edit"] = response.status_code, response.json()
                    holding.set()
                    release.wait(30)
            finally:
                holding.set()
                connection.close()

        threads = {"delete": threading.Thread(target=delete), "edit": threading.Thread(target=edit)}
        threads[first].start()
        assert holding.wait(30)
        second = "edit" if first == "delete" else "delete"
        threads[second].start()
        threads[second].join(1.0)
        assert threads[second].is_alive()  # it waits for the first one's lock
        release.set()
        for thread in threads.values():
            thread.join(30)
        return outcome

    outcome = race(first="delete")
    status, body = outcome["edit"]
    assert status == 400
    assert "up-x" in body["run_after"][0]
    assert outcome["delete"] == "deleted"
    assert list(Schedule.objects.values_list("name", flat=True)) == ["down-x"]
    assert not Schedule.objects.get(name="down-x").run_after.exists()

    Schedule.objects.all().delete()
    outcome = race(first="edit")
    assert outcome["edit"][0] == 200
    assert isinstance(outcome["delete"], services.ScheduleInUse)
    assert "down-x" in str(outcome["delete"])
    assert list(Schedule.objects.get(name="down-x").run_after.values_list("name", flat=True)) == ["up-x"]
