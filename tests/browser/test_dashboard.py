"""The dashboard in a real browser (issue 17.3): headless Chromium (Debian's `chromium`) driven by
Playwright, against a live server and a real worker. Log in, press run-now and see the run succeed
without a reload, disable with a note and see the note. Saves a screenshot of each page
(docs/screenshots/ when SAVE_SCREENSHOTS=1, else the test's tmp dir)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orchestrator.models import Job
from schedules import services
from schedules.models import Schedule, ScheduledRun
from tests.workerproc import start_run_worker

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs the Debian package chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the PyPI package playwright")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


@pytest.fixture
def browser_page(monkeypatch):
    # Playwright's sync API runs an event loop in this thread; Django would then refuse the test's own
    # ORM calls as "async context" (Django's documented switch for exactly this case).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def shot(page, name: str, tmp_path: Path) -> None:
    folder = SCREENSHOTS if os.environ.get("SAVE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


def test_run_now_succeeds_live_and_disable_shows_the_note(
    live_server, browser_page, django_user_model, redis_client, tmp_path
):
    django_user_model.objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    job = Job.objects.get(key="sleep")
    schedule = services.create_schedule(
        name="nightly-triage",
        job=job,
        schedule_type="cron",
        cron_expr="0 2 * * *",
        custom_directive_text="0.2",
    )
    services.create_schedule(
        name="every-ten", job=job, schedule_type="interval", interval_minutes=10, custom_directive_text="0.1"
    )
    worker = start_run_worker(tmp_path=tmp_path)
    page = browser_page
    try:
        page.goto(f"{live_server.url}/dashboard/")
        assert "/admin/login/" in page.url, "the dashboard needs a login"
        page.fill("input[name=username]", "ops")
        page.fill("input[name=password]", "pw-ops-12345")
        page.click("input[type=submit]")
        page.wait_for_url(f"{live_server.url}/dashboard/")
        row = page.locator(f"tr[data-schedule='{schedule.pk}']")
        assert "At 02:00 AM" in row.inner_text()

        row.locator("button[data-kind=run-now]").click()
        # The poll redraws the strip: the new run appears and turns succeeded, no reload.
        row.locator(".cell[data-status=succeeded]").wait_for(timeout=90_000)
        assert ScheduledRun.objects.get(schedule=schedule).status == "succeeded"
        shot(page, "dashboard", tmp_path)

        page.once("dialog", lambda dialog: dialog.accept("paused for the log rotation change"))
        row.locator("button[data-kind=disable]").click()
        row.locator("[data-note]").wait_for()
        assert row.locator("[data-note]").inner_text() == "paused for the log rotation change"
        row.locator("button[data-kind=enable]").wait_for()  # Enable replaces Disable, no reload
        assert not row.locator("button[data-kind=disable]").is_visible()
        schedule.refresh_from_db()
        assert not schedule.enabled
        assert schedule.paused_note == "paused for the log rotation change"
        assert schedule.paused_by == "ops"

        page.click(f"a[href='/dashboard/schedules/{schedule.pk}/']")
        page.locator(".timeline .bar").first.wait_for()
        assert "paused for the log rotation change" in page.inner_text("table.facts")
        shot(page, "schedule", tmp_path)
        page.locator("table.history a").first.click()
        page.wait_for_url("**/dashboard/runs/*/")
        assert "succeeded" in page.inner_text("table.facts")
        assert page.locator("a[href*='/task/']").count() == 1, "links to the run's task in Flower"
        shot(page, "run", tmp_path)
    finally:
        worker.stop()
    assert Schedule.objects.count() == 2


def test_bulk_form_disables_the_ticked_schedules_by_label(
    live_server, browser_page, django_user_model, tmp_path
):
    """Issue 33.4: filter the list by a label, tick "all on this page", disable with a note: every ticked
    schedule is disabled in one call (schedules.bulk), the others stay as they were."""
    django_user_model.objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    job = Job.objects.get(key="sleep")
    for name, team in (("pay-a", "payments"), ("pay-b", "payments"), ("risk-a", "risk")):
        services.create_schedule(
            name=name, job=job, schedule_type="interval", interval_minutes=10, labels={"team": team}
        )
    page = browser_page
    page.goto(f"{live_server.url}/dashboard/")
    page.fill("input[name=username]", "ops")
    page.fill("input[name=password]", "pw-ops-12345")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/dashboard/")
    page.click("a.label:has-text('team=payments')")
    page.wait_for_url("**label=team*")
    assert page.locator("tr[data-schedule]").count() == 2
    page.check("input[data-select-all]")
    page.select_option("form#bulk select[name=action]", "disable")
    page.fill("form#bulk input[name=note]", "payments freeze")
    page.click("form#bulk button[type=submit]")
    page.locator(".messages li").wait_for()
    assert "Disabled 2 schedule(s)" in page.inner_text(".messages")
    shot(page, "dashboard-bulk", tmp_path)
    states = dict(Schedule.objects.values_list("name", "enabled"))
    assert states == {"pay-a": False, "pay-b": False, "risk-a": True}
    assert set(Schedule.objects.filter(enabled=False).values_list("paused_note", flat=True)) == {
        "payments freeze"
    }


def test_run_now_with_params_prompts_for_json_and_shows_a_refusal(
    live_server, browser_page, django_user_model, tmp_path
):
    """Issue 32.6: "Run now…" on a schedule's page asks for the params as JSON (prefilled with the
    schedule's); a schema violation is shown naming the path and runs nothing; valid params run."""
    import time

    from orchestrator.models import Run

    django_user_model.objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    schedule = services.create_schedule(
        name="triage", job=Job.objects.get(key="log_triage"), schedule_type="interval", interval_minutes=10,
        params={"min_severity": "medium"},
    )  # fmt: skip
    answers = ['{"min_severity": "urgent"}', '{"min_severity": "high"}']
    seen: list[tuple[str, str, str]] = []

    def on_dialog(dialog):
        seen.append((dialog.type, dialog.message, dialog.default_value))
        if dialog.type == "prompt":
            dialog.accept(answers.pop(0))
        else:
            dialog.accept()

    page = browser_page
    page.on("dialog", on_dialog)

    def until(condition, what: str) -> None:
        # Polls through Playwright (its events, the dialogs, are handled only inside its calls).
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            page.wait_for_timeout(200)

    page.goto(f"{live_server.url}/dashboard/schedules/{schedule.pk}/")
    page.fill("input[name=username]", "ops")
    page.fill("input[name=password]", "pw-ops-12345")
    page.click("input[type=submit]")
    page.wait_for_url(f"**/dashboard/schedules/{schedule.pk}/")

    page.click("button[data-kind=run-now-params]")
    until(lambda: any(kind == "alert" for kind, _, _ in seen), "the refusal shown")
    assert seen[0][0] == "prompt"
    assert seen[0][2] == '{"min_severity": "medium"}'
    assert "$.min_severity: 'urgent' is not one of" in seen[1][1]
    assert not Run.objects.exists()

    page.click("button[data-kind=run-now-params]")
    until(Run.objects.exists, "the run launched")
    assert Run.objects.get().params == {"min_severity": "high"}


def test_calendar_view_at_10000_schedules(live_server, browser_page, django_user_model, tmp_path):
    """Issue 33.5: the calendar view over 10,000 schedules (intervals and crons in three zones, one in twenty
    excluding weekends) renders its week grid in Chromium; the server's time is printed, not asserted. A known
    schedule, filtered by its label, shows its counts in the right cells, and the weekend is named."""
    from datetime import timedelta

    from django.utils import timezone

    from schedules import calendar_service, timing

    django_user_model.objects.create_user("ops", password="pw-ops-12345", is_staff=True)
    job = Job.objects.get(key="sleep")
    weekend = calendar_service.create_calendar(name="weekend", rules=[{"weekdays": ["sat", "sun"]}])
    now = timezone.now()
    rows = []
    for g in range(1, 10_001):
        cron = g % 3 == 0
        fields = {
            "name": f"cal-{g}",
            "job": job,
            "custom_directive_text": "0.1",
            "schedule_type": "cron" if cron else "interval",
            "interval_minutes": None if cron else 10 + g % 50,
            "cron_expr": f"{g % 60} * * * *" if cron else "",
            "timezone": ("UTC", "Europe/Paris", "America/New_York")[g % 3],
            "labels": {"team": f"t{g % 4}"},
        }
        schedule = Schedule(**fields)
        schedule.next_run_at = timing.first_slot(timing.spec_of(schedule), now=now)
        rows.append(schedule)
    Schedule.objects.bulk_create(rows, batch_size=2000)
    services.create_schedule(
        name="known-3-hourly", job=job, custom_directive_text="0.1", schedule_type="cron",
        cron_expr="30 */3 * * *", labels={"known": "yes"}, exclude_calendars=[weekend],
    )  # fmt: skip
    Schedule.exclude_calendars.through.objects.bulk_create(
        [
            Schedule.exclude_calendars.through(schedule_id=pk, calendar_id=weekend.pk)
            for pk in Schedule.objects.filter(name__regex=r"^cal-\d*[02468]0$").values_list("pk", flat=True)
        ]
    )
    assert Schedule.objects.count() == 10_001
    monday = (now + timedelta(days=7 - now.weekday())).date()

    page = browser_page
    page.goto(f"{live_server.url}/dashboard/")
    page.fill("input[name=username]", "ops")
    page.fill("input[name=password]", "pw-ops-12345")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/dashboard/")
    for view in ("week", "month"):
        response = page.goto(f"{live_server.url}/dashboard/calendar?view={view}&start={monday}")
        took = response.request.timing
        server_ms = took["responseStart"] - took["requestStart"]
        print(f"calendar {view} at 10,000 schedules: server {server_ms:.0f} ms")
        assert response.status == 200
        days = page.locator("td .daynum").count()
        assert page.locator("[data-cell]").count() == (168 if view == "week" else days)
        totals = page.locator("[data-cell]").evaluate_all("cells => cells.map(c => Number(c.dataset.total))")
        assert max(totals) > 1000
        if view == "week":
            shot(page, "calendar-week", tmp_path)

    page.goto(f"{live_server.url}/dashboard/calendar?view=week&start={monday}&label=known%3Dyes")
    assert "1 schedule with upcoming runs" in page.inner_text("h1")
    for day in range(7):
        date_ = monday + timedelta(days=day)
        for hour in range(24):
            cell = page.locator(f"[data-cell='{date_}T{hour:02d}']")
            expected = 1 if day < 5 and hour % 3 == 0 else 0  # 00:30, 03:30 ... UTC; weekend excluded
            assert int(cell.get_attribute("data-total")) == expected, (date_, hour)
    saturday = page.locator(f"th[data-day='{monday + timedelta(days=5)}'] [data-excluded]")
    assert saturday.inner_text() == "excluded: weekend"
