"""Wait (bounded) until a Celery worker answers a ping; `make run` starts Flower after it (Procfile).

honcho starts every process at once, and Flower asks the workers about themselves as it starts: with no
worker up yet, each question logs "Inspect method ... failed", four warnings on every start that point
at nothing wrong. Flower starts once a worker answers, or after --timeout seconds anyway (saying so:
then no worker is up, a real problem). Always exits 0 so Flower starts. FLOWER_WAIT_FOR_WORKER_SECONDS
sets the bound (default 60; 0 does not wait).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = float(os.environ.get("FLOWER_WAIT_FOR_WORKER_SECONDS") or 60)
    parser.add_argument("--timeout", type=float, default=default)
    args = parser.parse_args()
    if args.timeout <= 0:
        return 0

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from project.celery import app

    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if app.control.ping(timeout=1.0):
            return 0
    print(
        f"no Celery worker answered a ping in {args.timeout:.0f} s; starting Flower anyway", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
