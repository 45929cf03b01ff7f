"""`python manage.py health --scheduler | --worker`: the liveness and readiness probe of a scheduler or
worker container (deploy/kubernetes/). Exit 0 healthy, 1 not, with one line saying why.

- `--scheduler`: the scheduler loop (run_scheduler, or Celery beat with the DatabaseScheduler) went
  round within twice its `--interval`;
- `--worker`: the worker's event loop sent a Celery heartbeat within twice its interval (or the worker
  is draining after SIGTERM), and Redis answers a PING.

Both read the stamp the process writes in HEALTH_DIR (project/health.py), so run the probe in the
process's own container, with the same HEALTH_DIR.
"""

from __future__ import annotations

import redis
from django.core.management.base import BaseCommand, CommandError

from project import redisconn
from project.health import Verdict, check_tick


def redis_reachable() -> Verdict:
    client = redisconn.client(socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        # The class only: the message may carry the URL and its password.
        return Verdict(False, f"Redis unreachable ({type(exc).__name__})")
    finally:
        client.close()
    return Verdict(True, "Redis answers")


class Command(BaseCommand):
    help = "Exit 0 if this container's scheduler or worker loop is alive, else 1 (one line says why)."
    requires_system_checks: list = []  # a probe: fast, and no database needed

    def add_arguments(self, parser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--scheduler", action="store_true", help="the scheduler loop went round")
        which.add_argument("--worker", action="store_true", help="the worker's heartbeat, and Redis")

    def handle(self, *args, **options) -> None:
        verdicts = [check_tick("scheduler" if options["scheduler"] else "worker")]
        if options["worker"]:
            verdicts.append(redis_reachable())
        failed = [verdict.reason for verdict in verdicts if not verdict.healthy]
        if failed:
            raise CommandError("unhealthy: " + "; ".join(failed), returncode=1)
        self.stdout.write("ok: " + "; ".join(verdict.reason for verdict in verdicts))
