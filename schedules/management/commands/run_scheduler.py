"""`python manage.py run_scheduler`: the beat loop. Any number of instances may run at once."""

from __future__ import annotations

import logging
import signal

from django.core.management.base import BaseCommand, CommandError

from project.celery import app
from schedules.beat import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CLAIM_TTL,
    DEFAULT_INTERVAL,
    DEFAULT_PUBLISH_GRACE,
    DEFAULT_REPUBLISH_AFTER,
    DEFAULT_REPUBLISH_BACKLOG_AFTER,
    DatabaseScheduler,
    default_claimant,
)

logger = logging.getLogger("schedules.scheduler")


class Command(BaseCommand):
    help = "Claim due schedules and dispatch their runs (docs/ARCHITECTURE.md, 'Claims and leases')."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL, help="longest sleep (s)")
        parser.add_argument("--claim-ttl", type=float, default=DEFAULT_CLAIM_TTL, help="claim lease (s)")
        parser.add_argument("--claimant", default="", help="instance id (default hostname:pid)")
        parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="claims per query")
        parser.add_argument("--once", action="store_true", help="one pass, then exit")
        parser.add_argument(
            "--misfire-grace", type=float, default=None, help="a slot older than this is missed (s)"
        )
        parser.add_argument(
            "--publish-grace",
            type=float,
            default=DEFAULT_PUBLISH_GRACE,
            help="outbox: seconds before a never-published run is published by the sweep",
        )
        parser.add_argument(
            "--republish-after",
            type=float,
            default=DEFAULT_REPUBLISH_AFTER,
            help="outbox: wait (s) before a run published but not started is published again, when its"
            " queue holds no message (its message was taken by a worker that vanished)",
        )
        parser.add_argument(
            "--republish-backlog-after",
            type=float,
            default=DEFAULT_REPUBLISH_BACKLOG_AFTER,
            help="outbox: shortest wait (s) before such a run is published again whatever its queue"
            " holds (doubling with the run's age)",
        )

    def handle(self, *args, **options) -> None:
        if options["interval"] <= 0 or options["claim_ttl"] <= 0 or options["batch_size"] < 1:
            raise CommandError("--interval and --claim-ttl must be > 0 and --batch-size >= 1")
        scheduler = DatabaseScheduler(
            app=app,
            claimant=options["claimant"] or default_claimant(),
            claim_ttl=options["claim_ttl"],
            batch_size=options["batch_size"],
            interval=options["interval"],
            misfire_grace=options["misfire_grace"],
            publish_grace=options["publish_grace"],
            republish_after=options["republish_after"],
            republish_backlog_after=options["republish_backlog_after"],
        )

        def _stop(signum, frame) -> None:
            logger.info("stop requested", extra={"signal": signum, "claimant": scheduler.claimant})
            scheduler.request_stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            while True:
                sleep = scheduler.run_pass()
                if options["once"] or scheduler.stopping:
                    break
                scheduler.wait(sleep)
                if scheduler.stopping:
                    break
        finally:
            scheduler.shutdown()
            logger.info("scheduler stopped", extra={"claimant": scheduler.claimant})
