"""Schedules as code (issue 16.9): `manage.py sync_schedules FILE` makes the database match a file.

The file (TOML, or YAML when PyYAML is installed; format in docs/SCHEDULES.md) declares schedules by
name. A sync creates the ones that are missing, updates the ones that differ, marks every declared one
`managed = true` (the API and admin then refuse edits of its declared fields), and with `prune` deletes
managed schedules the file no longer names. It goes through the same services as the API, so a file
gets the same validation, and every change is recorded in the history with source `sync`.

One transaction for the whole file: a file with one bad schedule changes nothing. A dry run is the same
sync rolled back, so its plan is exactly what a real run would do.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.db import models, transaction
from django.db.models.fields import NOT_PROVIDED
from django.utils.dateparse import parse_datetime

from orchestrator.models import Directive, Job
from schedules import changes as change_log
from schedules import dependencies, services
from schedules.models import ChangeSource, Schedule

# Keys an entry may carry: the API's names (job_key for the job, directive as a key).
ENTRY_KEYS = frozenset({"job_key", *services.SCHEDULE_FIELDS, *services.RELATION_FIELDS} - {"job"})
# JSON fields that hold a list, not a table.
LIST_FIELDS = ("run_after_statuses",)
DATETIME_FIELDS = ("start_at", "end_at")


class SyncError(Exception):
    """A file that cannot be synced; the message names the schedule and field."""


@dataclass
class SyncStep:
    action: str  # create | update | delete | unchanged
    name: str
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.fields or self.action in ("create", "delete"):
            return f"{self.action} {self.name}"
        diffs = ", ".join(f"{f}: {c['old']!r} -> {c['new']!r}" for f, c in sorted(self.fields.items()))
        return f"{self.action} {self.name}: {diffs}"


def load_file(path: Path) -> list[dict[str, Any]]:
    """The entries of a schedules file: `[[schedules]]` tables in TOML, a `schedules:` list in YAML."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SyncError(f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        data = _load_yaml(raw, path)
    else:
        try:
            data = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise SyncError(f"{path}: not valid TOML: {exc}") from exc
    if not isinstance(data, Mapping) or set(data) - {"schedules"}:
        raise SyncError(f"{path}: expected only a `schedules` list at the top level")
    entries = data.get("schedules") or []
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise SyncError(f"{path}: `schedules` must be a list of tables")
    return [dict(entry) for entry in entries]


def _load_yaml(raw: bytes, path: Path) -> Any:
    try:
        import yaml
    except ImportError as exc:  # PyYAML is optional: TOML always works
        raise SyncError(f"{path}: YAML needs PyYAML installed; use TOML (schedules.toml) instead") from exc
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise SyncError(f"{path}: not valid YAML: {exc}") from exc


def _default(name: str) -> Any:
    model_field = Schedule._meta.get_field(name)
    if model_field.default is not NOT_PROVIDED:
        return model_field.get_default()  # a fresh {} for params
    return "" if model_field.empty_strings_allowed and not model_field.null else None


def _type_error(name: str, value: Any) -> str | None:
    """What is wrong with the type of `value` for field `name` (the API's JSON types), or None."""
    if name in ("job_key", "directive") or value is None:
        return None if value is None or isinstance(value, str) else "must be a string (a key)"
    if name == "run_after":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return None if ok else "must be a list of schedule names"
    if name in LIST_FIELDS:
        return None if isinstance(value, list) else "must be a list"
    model_field = Schedule._meta.get_field(name)
    if isinstance(model_field, models.BooleanField):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(model_field, models.IntegerField):
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if isinstance(model_field, models.DateTimeField):
        return None if isinstance(value, str | datetime) else "must be a date-time"
    if isinstance(model_field, models.JSONField):
        return None if isinstance(value, Mapping) else "must be a table (a mapping)"
    return None if isinstance(value, str) else "must be a string"


def declared_values(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared field of one entry as the services take it; a field left out is its default
    (`enabled` excepted: left out, a sync leaves it as it is, so a pause through the API survives)."""
    name = entry.get("name")
    label = f"schedule {name!r}" if isinstance(name, str) and name else "a schedule without a name"
    unknown = sorted(set(entry) - ENTRY_KEYS)
    if unknown:
        raise SyncError(f"{label}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(ENTRY_KEYS))})")
    if not isinstance(name, str) or not name.strip():
        raise SyncError(f"{label}: `name` is required")
    skipped = ("job", "directive", *services.RELATION_FIELDS)
    values = {f: _default(f) for f in services.MANAGED_FIELDS if f not in skipped}
    values.update({k: v for k, v in entry.items() if k not in ("job_key", "directive")})
    job_key = entry.get("job_key")
    values["job"] = Job.objects.filter(key=job_key).first() if isinstance(job_key, str) else None
    if values["job"] is None:
        raise SyncError(f"{label}: job_key {job_key!r} names no job")
    directive_key = entry.get("directive")
    values["directive"] = None
    if directive_key is not None:
        values["directive"] = Directive.objects.filter(key=str(directive_key)).first()
        if values["directive"] is None:
            raise SyncError(f"{label}: directive {directive_key!r} names no directive")
    for f, value in entry.items():
        if (problem := _type_error(f, value)) is not None:
            raise SyncError(f"{label}: {f} {problem}")
    for f in DATETIME_FIELDS:
        if isinstance(values.get(f), str):
            parsed = parse_datetime(values[f])
            if parsed is None:
                raise SyncError(f"{label}: {f} {values[f]!r} is not a date-time")
            values[f] = parsed
        if isinstance(values.get(f), datetime) and values[f].tzinfo is None:
            raise SyncError(f"{label}: {f} needs a UTC offset, e.g. 2026-01-01T00:00:00Z")
    return values


def sync(
    entries: list[dict[str, Any]], *, prune: bool = False, dry_run: bool = False, actor: str = ""
) -> list[SyncStep]:
    """Make the database match `entries`; returns what was (or, dry, would be) done, in file order,
    then the prunes. Raises SyncError (nothing written) on the first bad entry."""
    names = [entry.get("name") for entry in entries]
    duplicates = sorted({n for n in names if isinstance(n, str) and names.count(n) > 1})
    if duplicates:
        raise SyncError(f"schedule {duplicates[0]!r} is declared twice")
    with transaction.atomic():
        # Upstreams first, so an entry may name a schedule declared after it (run_after).
        done = {id(entry): _sync_one(entry, actor=actor) for entry in _upstreams_first(entries)}
        steps = [done[id(entry)] for entry in entries]
        if prune:
            steps += _prune(set(names), actor=actor)
        if dry_run:
            transaction.set_rollback(True)
    return steps


def _upstreams_first(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries, each after the declared entries its run_after names; a cycle among them is a
    SyncError naming it (one through schedules outside the file is found by the service)."""
    by_name = {e["name"]: e for e in entries if isinstance(e.get("name"), str)}

    def upstreams(entry: Mapping[str, Any]) -> list[str]:
        names = entry.get("run_after")
        return [n for n in names if isinstance(n, str) and n in by_name] if isinstance(names, list) else []

    index = {name: i for i, name in enumerate(by_name)}
    edges = {index[name]: {index[n] for n in upstreams(e)} for name, e in by_name.items()}
    for name in by_name:
        cycle = dependencies.find_cycle(edges, index[name])
        if cycle is not None:
            names = {i: n for n, i in index.items()}
            raise SyncError(f"schedule {name!r}: run_after: {dependencies.cycle_message(cycle, names)}")
    ordered: list[dict[str, Any]] = []
    placed: set[int] = set()

    def place(entry: dict[str, Any]) -> None:
        if id(entry) in placed:
            return
        placed.add(id(entry))
        for upstream in upstreams(entry):
            place(by_name[upstream])
        ordered.append(entry)

    for entry in entries:
        place(entry)
    return ordered


def _sync_one(entry: Mapping[str, Any], *, actor: str) -> SyncStep:
    values = declared_values(entry)
    name = values["name"]
    wanted = values.pop("run_after", None) or []
    found = {s.name: s for s in Schedule.objects.filter(name__in=wanted)}
    if missing := [n for n in wanted if n not in found]:
        raise SyncError(f"schedule {name!r}: run_after {missing[0]!r} names no schedule")
    values["run_after"] = [found[n] for n in wanted]
    current = Schedule.objects.filter(name=name).first()
    try:
        if current is None:
            values.setdefault("enabled", True)
            created = services.create_schedule(source=ChangeSource.SYNC, actor=actor, managed=True, **values)
            return SyncStep("create", name, {"managed": {"old": None, "new": created.managed}})
        before = change_log.snapshot(current, (*services.SCHEDULE_FIELDS, "managed"))
        before["run_after"] = services.run_after_names(current)
        updated = services.update_schedule(
            current, values, source=ChangeSource.SYNC, actor=actor, extra={"managed": True}
        )
    except services.ScheduleInvalid as exc:
        problems = "; ".join(f"{f}: {' '.join(m)}" for f, m in exc.errors.items())
        raise SyncError(f"schedule {name!r}: {problems}") from exc
    after = change_log.snapshot(updated, (*services.SCHEDULE_FIELDS, "managed"))
    after["run_after"] = services.run_after_names(updated)
    diff = change_log.diff(before, after)
    return SyncStep("update" if diff else "unchanged", name, diff)


def _prune(declared: set[Any], *, actor: str) -> list[SyncStep]:
    """Delete the managed schedules the file no longer names (recorded, source sync)."""
    doomed = list(
        Schedule.objects.filter(managed=True)
        .exclude(name__in=declared)
        .prefetch_related("exclude_calendars", "only_calendars", "run_after")
        .order_by("name")
    )
    # Every record before any delete: deleting an upstream first would drop it from the run_after its
    # downstream's record keeps.
    for schedule in doomed:
        change_log.record_delete(schedule, source=ChangeSource.SYNC, actor=actor)
    try:
        services.delete_schedules([schedule.pk for schedule in doomed])
    except services.ScheduleInUse as exc:
        # A schedule that stays (declared, or not managed) runs after a doomed one: the whole sync rolls
        # back, records included. Doomed downstreams go with their upstream.
        raise SyncError("--prune: " + " ".join(m for ms in exc.errors.values() for m in ms)) from exc
    return [SyncStep("delete", schedule.name) for schedule in doomed]
