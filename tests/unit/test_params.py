"""Run inputs, pure parts: params against a JSON Schema (orchestrator/params.py), a job's declaration
checked when it registers, and log_triage's `files` patterns."""

from __future__ import annotations

import pytest

from orchestrator.jobs import sleep
from orchestrator.jobs.log_triage import JOB as LOG_TRIAGE
from orchestrator.jobs.log_triage.collect import selected
from orchestrator.jobs.registry import JobSpec, register
from orchestrator.params import MAX_ERRORS, MAX_PARAMS_BYTES, check_schema, params_errors

SCHEMA = {
    "type": "object",
    "properties": {"level": {"enum": ["a", "b"]}, "items": {"type": "array", "items": {"type": "integer"}}},
    "required": ["level"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("params", "errors"),
    [
        ({"level": "a"}, []),
        ({"level": "a", "items": [1, 2]}, []),
        ({}, ["$: 'level' is a required property"]),
        ({"level": "c"}, ["$.level: 'c' is not one of ['a', 'b']"]),
        ({"level": "a", "items": [1, "2"]}, ["$.items[1]: '2' is not of type 'integer'"]),
        ({"level": "a", "x": 1}, ["$: Additional properties are not allowed ('x' was unexpected)"]),
        (None, ["$: must be a JSON object, not null."]),
        ([], ["$: must be a JSON object, not an array."]),
        (3, ["$: must be a JSON object, not a number."]),
        (
            {"level": float("nan")},
            ["$: must hold JSON values only (objects, arrays, strings, numbers, true, false, null)."],
        ),
    ],
)
def test_params_errors__one_message_per_failing_path(params, errors):
    assert params_errors(SCHEMA, params) == errors


def test_params_errors__every_path_sorted_bounded_and_size_capped():
    errors = params_errors(SCHEMA, {"level": "c", "items": ["x"] * 20})
    assert len(errors) == MAX_ERRORS
    assert errors[0] == "$.items[0]: 'x' is not of type 'integer'"
    assert params_errors({}, {"any": ["thing"]}) == []
    too_big = params_errors({}, {"pad": "x" * MAX_PARAMS_BYTES})
    assert too_big == [f"$: {MAX_PARAMS_BYTES + 11} bytes as JSON; at most {MAX_PARAMS_BYTES}."]


def test_register__a_job_declaring_an_invalid_schema_is_refused():
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        register(
            JobSpec(
                key="bad_schema", name="b", description="", tasks=sleep.JOB.tasks, params_schema={"type": 5}
            )
        )
    with pytest.raises(ValueError, match="must be a JSON object"):
        check_schema([])
    check_schema(LOG_TRIAGE.params_schema)


@pytest.mark.parametrize(
    ("patterns", "path", "taken"),
    [
        ([], "logs/auth.log", True),
        (["auth.log*"], "logs/auth.log", True),
        (["auth.log*"], "logs/old/auth.log.1.gz", True),  # no '/': the name, in any folder
        (["auth.log*"], "logs/app.log", False),
        (["nginx/*.log"], "logs/nginx/access.log", True),  # with '/': the path under the folder
        (["nginx/*.log"], "logs/access.log", False),
        (["nginx/*.log"], "uploads/nginx/access.log", True),
        (["app.log", "kern.log"], "logs/kern.log", True),
    ],
)
def test_log_triage_files__a_name_or_a_path_under_its_folder(tmp_path, patterns, path, taken):
    roots = [tmp_path / "logs", tmp_path / "uploads"]
    assert selected(str(tmp_path / path), roots, patterns) is taken
