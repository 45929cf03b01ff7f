"""Calendars with a real `run_scheduler` process (issue 33): a calendar that excludes "today".

With calendar_policy skip the slot is recorded `skipped`, naming the calendar, while a schedule without
the calendar runs the same slot; with next_allowed nothing runs today and the run comes tomorrow, at the
same time. Tomorrow is reached by setting the database clock forward for the scheduler's sessions only:
its connection puts `public` before `pg_catalog` on the search_path, where a `now()` adds the shift held
in a one-row table, so every `now()` of the scheduler's SQL (what is due, the claims, the rows' times)
moves together, and nothing else does.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import quote

import pytest
from django.db import connection

from schedules import timing
from schedules.models import Schedule, ScheduledRun
from tests.scheduler_support import Processes, db_now, sleep_job, sql
from tests.support import process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def shifted_clock():
    """A `now()` the scheduler's sessions see `shift` ahead; returns a setter of the shift."""
    sql("CREATE TABLE IF NOT EXISTS public.test_clock_shift (shift interval NOT NULL)")
    sql("DELETE FROM public.test_clock_shift")
    sql("INSERT INTO public.test_clock_shift VALUES ('0 seconds')")
    sql(
        "CREATE OR REPLACE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql STABLE AS"
        " $$ SELECT pg_catalog.now() + (SELECT shift FROM public.test_clock_shift LIMIT 1) $$"
    )

    def set_shift(delta: timedelta) -> None:
        sql("UPDATE public.test_clock_shift SET shift = make_interval(secs => %s)", [delta.total_seconds()])

    try:
        yield set_shift
    finally:
        sql("DROP FUNCTION IF EXISTS public.now()")
        sql("DROP TABLE IF EXISTS public.test_clock_shift")


@pytest.fixture
def procs(tmp_path, redis_client):
    p = Processes(process_env(), tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def _scheduler_env() -> dict[str, str]:
    db = connection.settings_dict
    options = quote("-c search_path=public,pg_catalog")
    url = (
        f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )
    return process_env(DATABASE_URL=f"{url}?options={options}")


def test_a_calendar_excluding_today__skips_the_slot_naming_it_or_runs_it_tomorrow(api, procs, shifted_clock):
    """What this proves: the scheduler records a slot on an excluded day `skipped` with the calendar's
    name and launches nothing for it, while it runs the same slot of a schedule without the calendar;
    a next_allowed schedule's slot is not run that day, and is run the next day at the same time
    (scheduled_for the slot plus one day), once.
    """
    sleep_job()
    now = db_now()
    spec = timing.ScheduleSpec(schedule_type="cron", cron_expr="* * * * *")
    slot = timing.next_slot(spec, after=now + timedelta(seconds=5))  # the next whole minute
    cron = f"{slot.minute} {slot.hour} * * *"  # daily, at the slot's time
    calendar = api.post(
        "/api/calendars/",
        {"name": "closed-today", "rules": [{"date": slot.date().isoformat()}]},
        format="json",
    ).json()
    ids = {}
    for name, extra in [
        ("skipping", {"exclude_calendars": [calendar["id"]]}),
        ("moving", {"exclude_calendars": [calendar["id"]], "calendar_policy": "next_allowed"}),
        ("plain", {}),
    ]:
        response = api.post(
            "/api/schedules/",
            {"name": name, "job_key": "sleep", "schedule_type": "cron", "cron_expr": cron, **extra},
            format="json",
        )
        assert response.status_code == 201, response.content
        ids[name] = response.json()["id"]
    tomorrow = slot + timedelta(days=1)
    assert Schedule.objects.get(pk=ids["skipping"]).next_run_at == slot
    assert Schedule.objects.get(pk=ids["moving"]).next_run_at == tomorrow

    procs.start("--interval", "1", env=_scheduler_env())
    shifted_clock(slot - now + timedelta(seconds=2))  # the scheduler's clock: just past today's slot

    def today_done():
        rows = {r.schedule_id: r for r in ScheduledRun.objects.filter(scheduled_for=slot)}
        return rows if {ids["skipping"], ids["plain"]} <= rows.keys() else None

    rows = wait_for(today_done, timeout=90, what="today's slot decided")
    skipped = rows[ids["skipping"]]
    assert skipped.status == "skipped"
    assert skipped.run_id is None
    assert skipped.error_summary == "excluded by calendar 'closed-today'"
    assert rows[ids["plain"]].run_id is not None  # the same slot runs without the calendar
    assert ids["moving"] not in rows
    assert not ScheduledRun.objects.filter(schedule_id=ids["moving"]).exists()

    shifted_clock(tomorrow - now + timedelta(seconds=2))  # tomorrow, just past the same time

    def moved_run():
        return ScheduledRun.objects.filter(schedule_id=ids["moving"]).first()

    run = wait_for(moved_run, timeout=90, what="the moved run")
    wait_for(
        lambda: ScheduledRun.objects.filter(scheduled_for=tomorrow).count() == 3, timeout=90, what="tomorrow"
    )
    assert run.scheduled_for == tomorrow
    assert run.trigger == "schedule"
    assert run.run_id is not None
    assert ScheduledRun.objects.filter(schedule_id=ids["moving"]).count() == 1
    assert Schedule.objects.get(pk=ids["moving"]).last_run_at == tomorrow
    assert sql("SELECT count(*) FROM orchestrator_run WHERE scheduled_for = %s", [slot])[0][0] == 1
