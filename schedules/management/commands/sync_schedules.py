"""`manage.py sync_schedules FILE [--dry-run] [--prune]`: make the schedules match a TOML (or YAML) file.

Thin: parse the arguments, call schedules.sync, print the plan. The format is in docs/SCHEDULES.md.
"""

from __future__ import annotations

import getpass
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from schedules.sync import SyncError, load_file, sync


class Command(BaseCommand):
    help = (
        "Create, update and disable the schedules FILE declares (TOML, or YAML with PyYAML) and mark them "
        "managed; idempotent. --dry-run prints the plan and writes nothing; --prune also deletes managed "
        "schedules FILE no longer names."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--dry-run", action="store_true", help="Print what would change; write nothing.")
        parser.add_argument(
            "--prune", action="store_true", help="Delete managed schedules the file no longer declares."
        )

    def handle(self, *args, file: Path, dry_run: bool, prune: bool, **options) -> None:
        actor = f"{getpass.getuser()}:{file.name}"
        try:
            steps = sync(load_file(file), prune=prune, dry_run=dry_run, actor=actor)
        except SyncError as exc:
            raise CommandError(f"{exc} (nothing changed)") from exc
        changed = [step for step in steps if step.action != "unchanged"]
        prefix = "would " if dry_run else ""
        for step in changed:
            self.stdout.write(prefix + step.describe())
        unchanged = len(steps) - len(changed)
        if not changed:
            self.stdout.write(f"nothing to change ({unchanged} schedule(s) already as declared)")
        else:
            summary = f"{len(changed)} change(s), {unchanged} unchanged"
            self.stdout.write(f"{summary} (dry run: nothing written)" if dry_run else summary)
