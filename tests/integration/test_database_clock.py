"""Row times are the database's (issue 15.2): `created_at` of runs and scheduled runs is PostgreSQL's
now(), returned by the insert itself (single and bulk), and a service's "now" is one SELECT now()."""

from __future__ import annotations

from datetime import datetime

import pytest

from orchestrator.models import Run
from orchestrator.services import OrchestratorService
from schedules import services
from schedules.dispatch import run_now
from tests.scheduler_support import db_now, make_schedule, sleep_job, sql

pytestmark = pytest.mark.django_db


def test_created_at__is_the_database_clock_and_comes_back_from_the_insert(redis_client):
    (before,) = sql("SELECT clock_timestamp()")[0]
    one = OrchestratorService.launch(job=sleep_job(), custom_directive_text="0")
    many = OrchestratorService.launch_many([{"job": sleep_job(), "task_id": "t1"}, {"job": sleep_job()}])
    scheduled = run_now(make_schedule("clock", enabled=False))
    (after,) = sql("SELECT clock_timestamp()")[0]
    for instance in (one, *many, scheduled, scheduled.run):
        assert isinstance(instance.created_at, datetime)  # not an unresolved DatabaseDefault
        assert before <= instance.created_at <= after
    # A run-now's slot is its request's now() (the transaction's start, here the test's).
    assert scheduled.scheduled_for <= scheduled.created_at
    stored = dict(Run.objects.values_list("pk", "created_at"))
    assert stored == {run.pk: run.created_at for run in (one, *many, scheduled.run)}


def test_now__without_an_argument_is_one_select_now(django_assert_num_queries):
    expected = db_now().replace(microsecond=0)
    with django_assert_num_queries(1):
        assert services.database_now(None) == expected
