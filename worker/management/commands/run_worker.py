"""`python manage.py run_worker [--jobs a,b] [--concurrency N]`: a Celery worker on the jobs' queues.

The worker runs as a child of this command, which starts it again if it stops on its own
(worker/supervisor.py); `--no-supervise` runs it in this process instead.
"""

from __future__ import annotations

import logging
import sys

from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connections
from tenacity import RetryCallState, retry, retry_if_exception_type, wait_exponential

from worker.routing import UnknownJobs, worker_queue_names
from worker.supervisor import Supervisor

logger = logging.getLogger("worker.supervisor")


def _database_unreachable(state: RetryCallState) -> None:
    logger.warning(
        "database unreachable; retrying",
        extra={"retry_in_s": state.upcoming_sleep, "error": type(state.outcome.exception()).__name__},
    )
    connections.close_all()


@retry(
    retry=retry_if_exception_type(OperationalError),
    wait=wait_exponential(multiplier=1.0, max=10.0),
    before_sleep=_database_unreachable,
)
def _queue_names_once_the_database_answers(keys: list[str]) -> list[str]:
    """The queues come from the Job table: wait for PostgreSQL, as Celery waits for its broker at start
    (a worker restarted while the database restarts must not exit; found by scripts/soak.py)."""
    return worker_queue_names(keys or None)


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
