"""Schemathesis fuzzing of the REST API against its own OpenAPI schema (docs/ARCHITECTURE.md, "API
conventions").

Every operation drf-spectacular documents at /api/schema/ is called in-process (the WSGI app, no
server) with generated valid and invalid input, authenticated with a DRF token. Each response must:
not be a 5xx; have a documented status code and content type; and match the documented body schema.
Bad input must be a 4xx (docs/ARCHITECTURE.md, "API conventions": never a 500).

Path parameters are steered, part of the time, to rows that exist (a schedule, a directive, a run
with findings, the registered jobs), and a body's `job_key` to a registered job, so the fuzzer gets
past 404 and "no such job" into the real code paths.

Dates (issue 31.2): the operations that take one (preview, create, patch, backfill) get, half the time,
a body that passes their other rules and carries dates at and beyond the ends of the accepted range
(1970-01-01 .. 9000-01-01) and of datetime's (years 1 and 9999), with offsets of +14:00 and -12:00, in
zones at the ends of the offsets or with DST; test_dates_and_zones_at_the_ends_of_the_range fuzzes them
again with FUZZ_DATE_EXAMPLES (default 100) examples each. Every one must be a 2xx or a 4xx.

CI form (part of `make test`; deterministic: derandomized Hypothesis, fixed seed; about 2,100 cases,
800 of them with dates; about 45 s of CPU, 2 minutes on a busy 2-core machine):

    .venv/bin/pytest tests/integration/test_api_fuzz.py -q

Long form (about 3,000 cases, about a minute):

    FUZZ_EXAMPLES=100 .venv/bin/pytest tests/integration/test_api_fuzz.py -q

FUZZ_EXAMPLES is Hypothesis's max_examples per operation for the fuzzing phase; schemathesis adds its
coverage-phase cases (boundary and type-violating values, most of the CI form) and unsupported-method
probes on top. FUZZ_SEED changes the seed for an exploratory run. The run ends with a line giving the
number of cases by status code.
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from functools import partial

import pytest
import schemathesis
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from project.wsgi import application

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261128"))

FUZZ_DATE_EXAMPLES = int(os.environ.get("FUZZ_DATE_EXAMPLES", "100"))

CONFIG = {
    "seed": FUZZ_SEED,
    # No NUL in generated strings: DRF refuses it in every CharField (PostgreSQL text cannot
    # hold it), a 400 the schema does not state, since a pattern there makes generation ~100x
    # slower. test_nul_in_a_string_is_a_400_naming_the_field covers it instead.
    "generation": {"deterministic": True, "database": "none", "allow-x00": False},
}
schema = schemathesis.openapi.from_wsgi(
    "/api/schema/?format=json", application, config=schemathesis.Config.from_dict(CONFIG)
)
# The operations that take dates, fuzzed again with more examples (the fuzzing phase only: the
# coverage phase's cases are the same as above), half of them with extreme dates and zones.
dated_schema = schemathesis.openapi.from_wsgi(
    "/api/schema/?format=json",
    application,
    config=schemathesis.Config.from_dict(
        {
            **CONFIG,
            # Valid requests only: the point is the dates; the test above sends the invalid ones.
            "generation": {**CONFIG["generation"], "mode": "positive"},
            "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}},
        }
    ),
)

# positive_data_acceptance ("a schema-valid request must be accepted") is a false positive where a
# valid body also has to satisfy rules a JSON schema cannot state, each a 400 naming the field
# (docs/ARCHITECTURE.md, "API conventions"): the job_key and directive must name existing rows and the job be
# enabled; interval
# needs interval_minutes >= 1 and no cron_expr, cron a parseable cron_expr and no interval_minutes;
# a known timezone; a name or key not taken; not both directive and custom_directive_text. Every
# other check (5xx, status code, content type, body schema, negative data rejected) still applies.
BUSINESS_RULES = {
    "POST /api/schedules/",
    "PATCH /api/schedules/{id}/",
    "POST /api/directives/",
    "PATCH /api/directives/{id}/",
    "POST /api/runs/",
    # Timing rules (zones, cron syntax, bounds) and backfill ranges are business rules too.
    "POST /api/schedules/preview/",
    "POST /api/schedules/{id}/backfill/",
    # Label syntax (Kubernetes': alphanumeric at both ends, at most 63 characters) in ?label= and in a
    # bulk selector; a bulk's ids must name schedules (else a 409 listing the refused ones).
    "GET /api/schedules/",
    "POST /api/schedules/bulk/",
    # Calendars: rules and holidays (dates, months, weekdays, countries, markets), an iCalendar file,
    # a name not taken, and a days range of at most 3,660 days.
    "POST /api/calendars/",
    "PATCH /api/calendars/{id}/",
    "POST /api/calendars/{id}/import/",
    "GET /api/calendars/{id}/days/",
}

# Ids of the rows the `existing_rows` fixture created, by path parameter name; read while generating.
KNOWN: dict[str, list] = {}


def _steer(case, location, name, value):
    steered = case.derive(keep_auth=True)
    steered.get_container(location)[name] = value
    return steered


# Issue 31.2: dates at and beyond the ends of the range a client may give (1970-01-01 .. 9000-01-01)
# and of what a datetime can hold, with offsets at the ends of the real ones (+14:00, -12:00), and
# zones with odd offsets or DST. Any of them must be a 200/201 or a 400 naming the field, never a 500.
EXTREME_DATES = st.sampled_from(
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T23:59:59-12:00",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:00:00Z",
        "1970-01-01T00:00:00+01:00",
        "1970-01-01T11:59:59-12:00",
        "2027-03-14T07:30:00Z",  # 02:30 New York, the hour that does not exist
        "9000-01-01T00:00:00Z",
        "9000-01-01T00:00:00-12:00",
        "9000-01-01T13:59:59+14:00",
        "9999-12-30T00:00:00Z",
        "9999-12-31T00:00:00Z",
        "9999-12-31T23:59:59.999999-12:00",
        "9999-12-31T23:59:59+14:00",
    ]
) | st.datetimes(timezones=st.timezones()).map(lambda value: value.isoformat())
EXTREME_ZONES = st.sampled_from(
    [
        "UTC",
        "Pacific/Kiritimati",  # UTC+14
        "Etc/GMT+12",  # UTC-12
        "Etc/GMT-14",
        "America/New_York",
        "Australia/Lord_Howe",  # 30-minute DST
        "Asia/Kathmandu",  # +05:45
        "Pacific/Chatham",  # +12:45 / +13:45
        "America/St_Johns",  # -03:30 with DST
    ]
)
CRONS = st.sampled_from(
    ["0 2 * * *", "*/5 * * * *", "30 2 * * 0", "0 0 29 2 *", "H H * * *", "@yearly", "0 0 L * *"]
)
TIMING = st.tuples(
    st.fixed_dictionaries(
        {"schedule_type": st.just("interval"), "interval_minutes": st.sampled_from([1, 60, 525_600])}
    )
    | st.fixed_dictionaries({"schedule_type": st.just("cron"), "cron_expr": CRONS}),
    st.fixed_dictionaries({"timezone": EXTREME_ZONES}, optional={"jitter_seconds": st.sampled_from([0, 59])}),
).map(lambda parts: parts[0] | parts[1])


def _timing_and(required: dict, optional: dict) -> st.SearchStrategy:
    """A body of timing fields (a valid interval or cron, an extreme zone) and these fields."""
    more = st.fixed_dictionaries(required, optional=optional)
    return st.tuples(TIMING, more).map(lambda parts: parts[0] | parts[1])


DATES = {"start_at": EXTREME_DATES, "end_at": EXTREME_DATES}
# The operations that take dates, and a body for each that gets past the other rules to the dates.
DATED_BODIES = {
    "POST /api/schedules/preview/": _timing_and(
        {}, {"after": EXTREME_DATES, **DATES, "count": st.just(100), "max_runs": st.just(3)}
    ),
    "POST /api/schedules/": _timing_and(
        {"name": st.uuids().map(str), "job_key": st.just("log_triage")}, DATES
    ),
    "PATCH /api/schedules/{id}/": _timing_and({}, DATES),
    "POST /api/schedules/{id}/backfill/": st.fixed_dictionaries(
        {"start": EXTREME_DATES, "end": EXTREME_DATES},
        optional={"overlap_policy": st.sampled_from(["allow", "skip", "buffer_one"])},
    ),
}


def _with_body(case, body):
    steered = case.derive(keep_auth=True)
    steered.body = body
    return steered


def _valid_at(case, location) -> bool:
    return not (case.meta and case.meta.is_negative_at(location))


def _positive(case) -> bool:
    """A case generated valid everywhere: a dated body replaces its body only then, so schemathesis never
    expects a rejection for a request that is valid as sent."""
    if not case.meta:
        return False
    return not case.meta.generation.mode.is_negative and not any(
        case.meta.is_negative_at(location) for location in ParameterLocation
    )


def flatmap_case(context, case):
    """Part of the time (Hypothesis chooses, deterministically), name rows that exist.

    A valid path parameter becomes an existing row's id or key, and a valid body's `job_key` a
    registered job, so requests get past 404 and "no job with key" into the real code paths. A
    negative case's path or body stays as generated.
    """
    choices = [st.just(case)]
    if case.path_parameters and _valid_at(case, ParameterLocation.PATH):
        for name in case.path_parameters:
            if KNOWN.get(name):
                steer = partial(_steer, case, ParameterLocation.PATH, name)
                choices.append(st.sampled_from(KNOWN[name]).map(steer))
    if isinstance(case.body, dict) and "job_key" in case.body and _valid_at(case, ParameterLocation.BODY):
        steer = partial(_steer, case, ParameterLocation.BODY, "job_key")
        choices.append(st.sampled_from(KNOWN["key"]).map(steer))
    steered = st.one_of(*choices)
    if case.operation.label in DATED_BODIES and _positive(case):
        # Half the time, a body that gets past the other rules to the dates, with extreme dates and zones.
        bodies = DATED_BODIES[case.operation.label]
        dated = steered.flatmap(lambda chosen: bodies.map(partial(_with_body, chosen)))
        return st.one_of(steered, dated)
    return steered


schema.hook(flatmap_case)
dated_schema.hook(flatmap_case)
dated_schema = dated_schema.include(name=list(DATED_BODIES))


STATUSES: Counter[int] = Counter()
DATED: Counter[int] = Counter()  # the cases whose body carried a date


@pytest.fixture(scope="module", autouse=True)
def _report_case_count(request):
    """One line after the run: how many requests were made, by status code (for docs/RELIABILITY.md)."""
    STATUSES.clear()
    DATED.clear()
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and STATUSES:
        by_code = ", ".join(f"{code}: {n}" for code, n in sorted(STATUSES.items()))
        total = STATUSES.total()
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            reporter.write_line(f"\napi fuzz: {total} cases (FUZZ_EXAMPLES={FUZZ_EXAMPLES}); {by_code}")
            dated = ", ".join(f"{code}: {n}" for code, n in sorted(DATED.items()))
            reporter.write_line(
                f"api fuzz: {DATED.total()} of them with dates (FUZZ_DATE_EXAMPLES={FUZZ_DATE_EXAMPLES});"
                f" {dated} (a 5xx fails the test)"
            )


@pytest.fixture
def token(user):
    from rest_framework.authtoken.models import Token

    return Token.objects.get_or_create(user=user)[0].key


@pytest.fixture
def existing_rows(redis_client):
    """A directive, schedules (interval, cron, disabled), a run with findings and a scheduled run."""
    from orchestrator.models import Directive, Finding, Job, Run, Trigger
    from schedules import calendar_service, services
    from schedules.models import ScheduledRun

    jobs = list(Job.objects.order_by("key"))
    # log_triage, whatever test jobs other modules registered (a job whose params_schema requires a key
    # would refuse these schedules' empty params).
    job = Job.objects.get(key="log_triage")
    directive = Directive.objects.create(key="fuzz-directive", name="Fuzz", text="be careful", job=job)
    interval = services.create_schedule(
        name="fuzz-interval", job=job, schedule_type="interval", interval_minutes=10, timezone="UTC"
    )
    cron = services.create_schedule(
        name="fuzz-cron",
        job=job,
        schedule_type="cron",
        cron_expr="*/5 * * * *",
        timezone="Europe/Paris",
        directive=directive,
    )
    disabled = services.create_schedule(
        name="fuzz-disabled", job=job, schedule_type="interval", interval_minutes=1, enabled=False
    )
    calendar = calendar_service.create_calendar(
        name="fuzz-calendar",
        timezone="Europe/Paris",
        rules=[{"weekdays": ["sat", "sun"]}, {"yearly": "12-25"}],
    )
    services.update_schedule(cron, {"exclude_calendars": [calendar]})
    now = timezone.now()
    run = Run.objects.create(job=job, trigger=Trigger.SCHEDULE, status="succeeded", finished_at=now)
    ScheduledRun.objects.create(
        schedule=interval, run=run, trigger=Trigger.SCHEDULE, scheduled_for=now - timedelta(minutes=10)
    )
    Finding.objects.create(
        run=run,
        rule="ssh_brute_force",
        severity="high",
        subject="10.0.0.1",
        count=12,
        first_seen=now - timedelta(minutes=5),
        last_seen=now,
        source_file="auth.log",
        risk_score=8,
    )
    KNOWN.update(
        id=[interval.pk, cron.pk, disabled.pk, directive.pk, run.pk, calendar.pk],
        run_id=[run.pk],
        key=[j.key for j in jobs],
    )
    yield
    KNOWN.clear()
    redis_client.flushdb()


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_conforms_to_its_schema(case, token, existing_rows):
    _call(case, token)


def _unmutated_negative(case) -> bool:
    """Schemathesis at times marks a case negative although it mutated nothing (its phase data says
    "Positive test case", no mutation): the request is valid, and accepting it is right."""
    data = case.meta.phase.data if case.meta else None
    return bool(
        case.meta
        and case.meta.generation.mode.is_negative
        and getattr(data, "mutations", None) == ()
        and getattr(data, "parameter", None) is None
    )


def _call(case, token, *, excluded=()) -> None:
    excluded = [*excluded, *([positive_data_acceptance] if case.operation.label in BUSINESS_RULES else [])]
    if _unmutated_negative(case):
        excluded.append(negative_data_rejection)
    response = case.call_and_validate(headers={"Authorization": f"Token {token}"}, excluded_checks=excluded)
    STATUSES[response.status_code] += 1
    if isinstance(case.body, dict) and case.body.keys() & {"after", "start_at", "end_at", "start", "end"}:
        DATED[response.status_code] += 1


@pytest.mark.django_db(transaction=True)
@dated_schema.parametrize()
@settings(
    max_examples=FUZZ_DATE_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_dates_and_zones_at_the_ends_of_the_range(case, token, existing_rows):
    """Issue 31.2: no 500 on dates, ever (preview, create, patch, backfill).

    Invalid requests are the test above's: here schemathesis re-judges a case after the hook swapped in a
    dated body, and can keep a path parameter it generated invalid marked so after the path was steered
    to an existing row, then reads the 200 as "invalid data accepted"."""
    _call(case, token, excluded=[negative_data_rejection])


@pytest.mark.django_db(transaction=True)  # ordered with the two transactional tests above, after them
def test_the_fuzzing_above_made_enough_cases():
    """The two schema tests above ran (pytest keeps file order) and made at least 2,000 requests, some
    hundreds of them with extreme dates: a schema or hook change that quietly shrank them would
    otherwise still pass with 0 server errors."""
    if not STATUSES:
        pytest.skip("run together with test_api_conforms_to_its_schema and the dates test")
    assert STATUSES.total() >= 2000, STATUSES
    assert DATED.total() >= 400, DATED
    assert not [code for code in STATUSES if code >= 500], STATUSES


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("post", "/api/directives/", {"key": "k", "name": "n", "text": "a\x00b"}, "text"),
        ("post", "/api/schedules/", {"name": "a\x00", "job_key": "log_triage"}, "name"),
        ("patch", "/api/jobs/log_triage/", {"task3_allowlist": ["ok", "\x00"]}, "task3_allowlist"),
    ],
)
def test_nul_in_a_string_is_a_400_naming_the_field(api, method, path, body, field):
    response = getattr(api, method)(path, body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/directives/", {"key": 5, "name": "n", "text": "t"}, "key"),
        ("/api/directives/", {"key": "k", "name": "n", "text": "t", "job_key": ""}, "job_key"),
        ("/api/schedules/", {"name": "s", "job_key": "log_triage", "enabled": 1}, "enabled"),
        ("/api/schedules/", {"name": "s", "job_key": "log_triage", "interval_minutes": "9"}, "interval_min"),
        ("/api/runs/", {"job_key": 7}, "job_key"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_a_400_not_coerced(api, path, body, field):
    response = api.post(path, body, format="json")
    assert response.status_code == 400, response.content
    assert any(key.startswith(field) for key in response.json())


@pytest.mark.django_db
@pytest.mark.parametrize("query", ["page=abc", "page=0", "page_size=0", "page_size=x", "page=-1"])
def test_a_bad_page_or_page_size_is_a_400_naming_it(api, query):
    response = api.get(f"/api/schedules/?{query}")
    assert response.status_code == 400
    assert query.split("=")[0] in response.json()


@pytest.mark.django_db
def test_an_unknown_finding_severity_is_a_400_naming_it(api):
    from orchestrator.models import Job, Run

    run = Run.objects.create(job=Job.objects.order_by("key").first(), trigger="manual")
    response = api.get(f"/api/runs/{run.pk}/findings/?severity=severe")
    assert response.status_code == 400
    assert "severity" in response.json()


@pytest.mark.django_db
def test_a_path_no_route_matches_is_a_json_404(api):
    response = api.get("/api/schedules/not-a-number/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}
