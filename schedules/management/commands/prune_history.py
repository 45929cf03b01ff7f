"""`manage.py prune_history [--dry-run] [--keep-days N]`: delete the history retention no longer keeps.

The schedulers do this by themselves every few minutes (schedules/retention.py); the command is for a
first prune of an old database, a cron outside the schedulers, or to see what would go (--dry-run).
"""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from schedules.retention import PruneResult, count_prunable, prune_history


class Command(BaseCommand):
    help = (
        "Delete finished scheduled runs, runs, findings and task results older than HISTORY_KEEP_DAYS, "
        "keeping each schedule's newest history_keep runs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be deleted; delete nothing."
        )
        parser.add_argument(
            "--keep-days",
            type=float,
            default=None,
            help=f"Days of history to keep (default HISTORY_KEEP_DAYS: {settings.HISTORY_KEEP_DAYS:g}).",
        )

    def handle(self, *args, dry_run: bool, keep_days: float | None, **options) -> None:
        days = settings.HISTORY_KEEP_DAYS if keep_days is None else keep_days
        if days <= 0:
            self.stdout.write("Retention is off (keep days 0): nothing to prune.")
            return
        if dry_run:
            self.stdout.write(
                f"Would delete (keeping {days:g} days): {_counts(count_prunable(keep_days=days))}"
            )
            return
        result = prune_history(keep_days=days)
        self.stdout.write(f"Deleted (keeping {days:g} days): {_counts(result)}")


def _counts(result: PruneResult) -> str:
    return (
        f"{result.scheduled_runs} scheduled runs, {result.runs} runs, {result.findings} findings, "
        f"{result.task_results} task results"
    )
