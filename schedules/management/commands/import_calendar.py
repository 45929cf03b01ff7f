"""manage.py import_calendar NAME FILE: add an iCalendar file's events to a calendar's days."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from schedules import calendar_service
from schedules.models import Calendar, ChangeSource


class Command(BaseCommand):
    help = (
        "Add the events of an iCalendar (.ics) file to the calendar NAME (created in --timezone if it does"
        " not exist): all-day events as dates or ranges, timed events as the days they touch, a plain"
        " yearly recurrence as a yearly rule. Schedules using the calendar get their next runs recomputed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("file", help="The .ics file, or - for standard input.")
        parser.add_argument("--timezone", default="UTC", help="The zone of a calendar created here (IANA).")

    def handle(self, *args: Any, name: str, file: str, timezone: str, **options: Any) -> None:
        try:
            data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from exc
        try:
            with transaction.atomic():
                calendar = Calendar.objects.filter(name=name).first()
                if calendar is None:
                    calendar = calendar_service.create_calendar(name=name, timezone=timezone)
                    self.stdout.write(f"created calendar {name!r} ({timezone})")
                calendar, added = calendar_service.import_ics(
                    calendar, data, source=ChangeSource.SYNC, actor=f"import_calendar {file}"
                )
        except calendar_service.CalendarInvalid as exc:
            raise CommandError(
                "; ".join(f"{field}: {' '.join(messages)}" for field, messages in exc.errors.items())
            ) from exc
        self.stdout.write(f"{name}: {added} rules added, {len(calendar.rules)} in all")
