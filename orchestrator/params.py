"""Run inputs: a job's `params_schema` (JSON Schema, declared in its code) and the `params` a schedule or a
run gives it (docs/SCHEDULES.md, "Run inputs").

Pure: no database. The API, the admin and `sync_schedules` check params with `params_errors` before a
save or a launch (a 400 naming the failing path); the worker checks again when the run starts, because
the job's schema may have changed since (a run whose params no longer fit fails with the same messages).
"""

from __future__ import annotations

import json
from typing import Any

# A run's params are stored on every run and shown in its history: inputs, not a payload.
MAX_PARAMS_BYTES = 16 * 1024
# Messages per refusal: the first few failing paths say what to fix.
MAX_ERRORS = 10
_MAX_MESSAGE = 300


def _validator(schema: dict[str, Any]) -> Any:
    # Imported here: the task template and every task process import the registry, not this library.
    from jsonschema.validators import validator_for

    cls = validator_for(schema)  # the schema's own $schema, else the latest draft
    return cls(schema)


def check_schema(schema: Any) -> None:
    """Raise ValueError when `schema` is not a JSON Schema (a job's declaration is checked when it
    registers, so a bad one fails at import, not at the first save)."""
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise ValueError("params_schema must be a JSON object (a JSON Schema)")
    try:
        _validator(schema).check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"params_schema is not a valid JSON Schema: {exc.message}") from None


def params_errors(schema: dict[str, Any] | None, params: Any) -> list[str]:
    """Why `params` are refused for a job declaring `schema`, one message per failing path
    (`$.min_severity: 'x' is not one of [...]`); empty when they fit. An empty schema takes any object."""
    if not isinstance(params, dict):
        return [f"$: must be a JSON object, not {_json_type(params)}."]
    try:
        size = len(json.dumps(params, allow_nan=False).encode())
    except (TypeError, ValueError):
        return ["$: must hold JSON values only (objects, arrays, strings, numbers, true, false, null)."]
    if size > MAX_PARAMS_BYTES:
        return [f"$: {size} bytes as JSON; at most {MAX_PARAMS_BYTES}."]
    if not schema:
        return []
    errors = sorted(_validator(schema).iter_errors(params), key=lambda e: (e.json_path, e.message))
    return [f"{error.json_path}: {error.message}"[:_MAX_MESSAGE] for error in errors[:MAX_ERRORS]]


def params_from_json(text: str) -> Any:
    """Params typed as JSON text (the admin's and the dashboard's "Run now with params"): the parsed value,
    None for blank (no override). ValueError naming `$` when the text is not JSON; the value itself is
    checked by `params_errors`, like the API's."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"$: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).") from None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__
