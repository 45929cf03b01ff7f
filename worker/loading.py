"""The delivery's first read: a run with its job and directive (and its scheduled run with its schedule),
and the lease floor, in one statement whose SQL is built once per process.

The ORM's `select_related(...).annotate(...).filter(...).first()` gave the same row, but compiled its
four-table join again for every delivery: about a third of a pool process's CPU per no-op run (py-spy,
issue 14). Here the statement is written from the models' own metadata (every concrete column, so a new
field is read without a change here) the first time it is needed, and the instances are built the way
the ORM builds them: `Model.from_db` with the values after each field's database converters (a
JSONField's decoding, for one), and the related instances set as the ORM's `select_related` sets them.

The statement is also prepared on the server, once per connection (PREPARE, then EXECUTE): planning
its five-table join cost PostgreSQL more than running it (0.9 ms a round trip unprepared, 0.26 ms
prepared, measured on the bench database). Not behind a transaction pool (DB_TRANSACTION_POOLING: the
next transaction may run on another server connection, which never saw the PREPARE); and a prepared
statement the server no longer has (DISCARD ALL by a session pooler, a plan a migration invalidated) is
prepared again and the read asked once more. The read runs outside any transaction (the start gate
comes after it), so such an error aborts nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg2
from django.conf import settings
from django.db import DatabaseError, connections, models

from orchestrator.models import Directive, Job, Run
from schedules import runstate
from schedules.models import Schedule, ScheduledRun

Converter = Callable[[Any, Any, Any], Any]
_PREPARED_STATEMENT_ERRORS = (
    psycopg2.errors.InvalidSqlStatementName,
    psycopg2.errors.DuplicatePreparedStatement,
    psycopg2.errors.FeatureNotSupported,
)


class _Part:
    """One model's columns in the joined row: how to turn its slice of the row into an instance."""

    def __init__(self, model: type[models.Model], alias: str, connection) -> None:
        self.model = model
        self.alias = alias
        self.fields = list(model._meta.concrete_fields)
        self.attnames = [f.attname for f in self.fields]
        quote = connection.ops.quote_name
        self.columns = [f"{alias}.{quote(f.column)}" for f in self.fields]
        self.converters: list[tuple[int, list[Converter], Any]] = []
        for index, f in enumerate(self.fields):
            col = f.get_col(alias)
            found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
            if found:
                self.converters.append((index, found, col))
        self.width = len(self.fields)
        # Where the primary key is in the slice (first for an automatic one, not for every model).
        self.pk_index = self.fields.index(model._meta.pk)

    def build(self, values: list[Any], connection, db: str) -> models.Model | None:
        if values[self.pk_index] is None:  # no primary key: an outer join found no row
            return None
        for index, converters, col in self.converters:
            value = values[index]
            for converter in converters:
                value = converter(value, col, connection)
            values[index] = value
        return self.model.from_db(db, self.attnames, values)


class _Read:
    """A joined read: its SQL (and its prepared form) and the parts, in the order of the select list."""

    def __init__(self, name: str, parts: list[_Part], from_clause: str, where: str, arity: int) -> None:
        self.name = name
        self.parts = parts
        columns = ", ".join(c for part in parts for c in part.columns)
        self.sql = f"SELECT {columns}, ({runstate.LEASE_FLOOR_SQL}) FROM {from_clause} WHERE {where} LIMIT 1"
        self.prepare_sql = f"PREPARE {name} AS " + self.sql % tuple(f"${i}" for i in range(1, arity + 1))
        self.execute_sql = f"EXECUTE {name}(" + ", ".join(["%s"] * arity) + ")"
        # The server connection (psycopg2's) this statement is prepared on, if any.
        self._prepared_on: object | None = None

    def _run(self, connection, cursor, params: list[Any]) -> None:
        raw = connection.connection
        if settings.DB_TRANSACTION_POOLING or raw is None or connection.in_atomic_block:
            # (Inside a transaction an error would abort it: the plain statement, no retry needed.)
            cursor.execute(self.sql, params)
            return
        for attempt in (1, 2):
            try:
                if self._prepared_on is not raw:
                    self._prepared_on = None
                    cursor.execute(self.prepare_sql)
                    self._prepared_on = raw
                cursor.execute(self.execute_sql, params)
                return
            except DatabaseError as exc:
                cause = exc.__cause__
                if attempt == 2 or not isinstance(cause, _PREPARED_STATEMENT_ERRORS):
                    raise
                # Gone from the server (InvalidSqlStatementName), already there under our name from a
                # session we did not track (DuplicatePreparedStatement), or its plan outdated by a
                # schema change (FeatureNotSupported): prepare it afresh.
                self._prepared_on = None
                if not isinstance(cause, psycopg2.errors.InvalidSqlStatementName):
                    cursor.execute(f"DEALLOCATE {self.name}")

    def fetch(self, connection, db: str, params: list[Any]) -> tuple[list[models.Model | None], int] | None:
        with connection.cursor() as cursor:
            self._run(connection, cursor, params)
            row = cursor.fetchone()
        if row is None:
            return None
        row = list(row)
        instances: list[models.Model | None] = []
        at = 0
        for part in self.parts:
            instances.append(part.build(row[at : at + part.width], connection, db))
            at += part.width
        return instances, int(row[at])


_reads: dict[tuple[str, str], _Read] = {}


def _table(model: type[models.Model], connection) -> str:
    return connection.ops.quote_name(model._meta.db_table)


def _build(kind: str, connection) -> _Read:
    q = connection.ops.quote_name
    run = _Part(Run, "r", connection)
    job = _Part(Job, "j", connection)
    directive = _Part(Directive, "d", connection)
    run_joins = (
        f"JOIN {_table(Job, connection)} j ON j.{q('id')} = r.{q('job_id')}"
        f" LEFT JOIN {_table(Directive, connection)} d ON d.{q('id')} = r.{q('directive_id')}"
    )
    if kind == "scheduled":
        scheduled = _Part(ScheduledRun, "sr", connection)
        schedule = _Part(Schedule, "s", connection)
        from_clause = (
            f"{_table(ScheduledRun, connection)} sr"
            f" JOIN {_table(Schedule, connection)} s ON s.{q('id')} = sr.{q('schedule_id')}"
            f" JOIN {_table(Run, connection)} r ON r.{q('id')} = sr.{q('run_id')} {run_joins}"
        )
        return _Read(
            "cb_load_scheduled_delivery",
            [scheduled, schedule, run, job, directive],
            from_clause,
            f"sr.{q('id')} = %s AND sr.{q('run_id')} = %s",
            2,
        )
    return _Read(
        "cb_load_delivery",
        [run, job, directive],
        f"{_table(Run, connection)} r {run_joins}",
        f"r.{q('id')} = %s",
        1,
    )


def _read(kind: str, using: str):
    connection = connections[using]
    key = (using, kind)
    read = _reads.get(key)
    if read is None:
        read = _reads[key] = _build(kind, connection)
    return read, connection


def load_delivery(
    run_id: int, scheduled_run_id: int | None, *, using: str = "default"
) -> tuple[Run | None, ScheduledRun | None, int]:
    """The run (its job and directive loaded), its scheduled run (its schedule loaded; None when the
    message names none, or one that is not this run's) and the lease floor (runstate.LEASE_FLOOR_SQL)."""
    if scheduled_run_id is not None:
        read, connection = _read("scheduled", using)
        found = read.fetch(connection, using, [scheduled_run_id, run_id])
        if found is not None:
            (scheduled, schedule, run, job, directive), floor = found
            _link(run, job, directive)
            scheduled.schedule = schedule
            scheduled.run = run
            return run, scheduled, floor
    read, connection = _read("run", using)
    found = read.fetch(connection, using, [run_id])
    if found is None:
        return None, None, 0
    (run, job, directive), floor = found
    _link(run, job, directive)
    return run, None, floor


def _link(run: Run, job: Job, directive: Directive | None) -> None:
    run.job = job
    run.directive = directive
