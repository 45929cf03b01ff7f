"""Issue 31.7: Swagger (/api/docs/, from /api/schema/) groups operations by resource, names each one, and
its request examples work as they stand in "Try it out"."""

from __future__ import annotations

import json

import pytest

from orchestrator.models import Job
from project.api import ApiViewMixin
from schedules import services

pytestmark = pytest.mark.django_db

RESOURCES = {"schedules", "calendars", "runs", "jobs", "directives", "alerts", "health"}
METHODS = {"get", "post", "patch", "put", "delete"}


def schema(anon) -> dict:
    response = anon.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return json.loads(response.content)


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def test_every_operation_has_its_resource_tag_and_a_summary(anon):
    doc = schema(anon)
    seen_tags = set()
    for path, method, operation in operations(doc):
        where = f"{method.upper()} {path}"
        tags = operation.get("tags", [])
        assert len(tags) == 1, where
        assert tags[0] in RESOURCES, where
        assert path.startswith(f"/api/{tags[0]}/"), where
        seen_tags.add(tags[0])
        assert operation.get("summary"), f"{where} has no summary"
        # The shared mixin's docstring is about the code, not the operation.
        assert ApiViewMixin.__doc__.strip() not in operation.get("description", ""), where
    assert seen_tags == RESOURCES
    # Each tag is described once, so Swagger's sections say what they hold.
    described = {tag["name"]: tag.get("description") for tag in doc.get("tags", [])}
    assert set(described) == RESOURCES
    assert all(described.values()), described


def request_examples(doc: dict):
    for path, method, operation in operations(doc):
        content = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
        for name, example in content.get("examples", {}).items():
            yield path, method, name, example["value"]


def test_every_request_example_is_accepted_by_the_api(anon, api):
    doc = schema(anon)
    examples = list(request_examples(doc))
    documented = {(path, method) for path, method, _, _ in examples}
    # The operations a newcomer tries first all carry a working example.
    for needed in [
        ("/api/schedules/", "post"),
        ("/api/schedules/{id}/", "patch"),
        ("/api/schedules/preview/", "post"),
        ("/api/schedules/{id}/backfill/", "post"),
        ("/api/runs/", "post"),
        ("/api/directives/", "post"),
    ]:
        assert needed in documented, needed

    target = services.create_schedule(
        name="docs-target",
        job=Job.objects.get(key="log_triage"),
        schedule_type="interval",
        interval_minutes=10,
    )
    expected = {"post": {201, 200, 202}, "patch": {200}}
    # Creates first, as in Swagger: the documented create example answers 201.
    examples.sort(key=lambda e: (e[0] != "/api/schedules/", e[0]))
    for path, method, name, value in examples:
        url = path.replace("{id}", str(target.pk)).replace("{key}", "log_triage")
        response = getattr(api, method)(url, value, format="json")
        where = f"{method.upper()} {path} example {name!r}"
        assert response.status_code in expected[method], (
            f"{where}: {response.status_code} {response.content!r}"
        )
        if path in {"/api/schedules/", "/api/directives/"}:
            assert response.status_code == 201, where
