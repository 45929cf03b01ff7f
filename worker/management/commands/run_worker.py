"""`python manage.py run_worker [--jobs a,b] [--concurrency N]`: a Celery worker on the jobs' queues.

The worker runs as a child of this command, which starts it again if it stops on its own
(worker/supervisor.py); `--no-supervise` runs it in this process instead.
"""

from __future__ import annotations

import logging
import sys
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connections

from worker.routing import UnknownJobs, worker_queue_names
from worker.supervisor import Supervisor

logger = logging.getLogger("worker.supervisor")


def _queue_names_once_the_database_answers(keys: list[str]) -> list[str]:
    """The queues come from the Job table: wait for PostgreSQL, as Celery waits for its broker at start
    (a worker restarted while the database restarts must not exit; found by scripts/soak.py)."""
    delay = 1.0
    while True:
        try:
            return worker_queue_names(keys or None)
        except OperationalError as exc:
            logger.warning(
                "database unreachable; retrying", extra={"retry_in_s": delay, "error": type(exc).__name__}
            )
            connections.close_all()
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


class Command(BaseCommand):
    help = "Start a Celery worker consuming the queues of the given jobs (default: every enabled job)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--jobs", default="", help="comma-separated job keys (default: all enabled)")
        parser.add_argument("--concurrency", type=int, default=None, help="pool processes (default: CPUs)")
        parser.add_argument("--loglevel", default="INFO")
        parser.add_argument("--hostname", default="", help="Celery node name, e.g. w1@%%h")
        parser.add_argument("--pool", default="prefork")
        parser.add_argument(
            "--no-supervise",
            action="store_true",
            help="run the Celery worker in this process; do not restart it when it stops on its own",
        )

    def handle(self, *args, **options) -> None:
        keys = [key.strip() for key in options["jobs"].split(",") if key.strip()]
        try:
            queues = _queue_names_once_the_database_answers(keys)
        except UnknownJobs as exc:
            raise CommandError(str(exc)) from exc
        if not queues:
            raise CommandError("no enabled jobs: nothing to consume")
        argv = ["worker", "-Q", ",".join(queues), "-P", options["pool"], "--loglevel", options["loglevel"]]
        if options["concurrency"]:
            argv += ["-c", str(options["concurrency"])]
        if options["hostname"]:
            argv += ["-n", options["hostname"]]
        self.stdout.write(f"worker on queues: {', '.join(queues)}")
        self.stdout.flush()
        if options["no_supervise"]:
            from project.celery import app

            app.worker_main(argv=argv)
            return
        connections.close_all()  # the supervisor itself needs no database connection while it waits
        supervisor = Supervisor([sys.executable, "-m", "celery", "-A", "project", *argv])
        supervisor.install_handlers()
        code = supervisor.run()
        if code:
            raise SystemExit(code)
