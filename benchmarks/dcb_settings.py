"""Settings for running django-celery-beat (the incumbent) in the benchmark, on its own database."""

import os

os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")

from project.settings import *  # noqa: F403
from project.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "django_celery_beat"]
DATABASES["default"]["NAME"] = os.environ.get("BENCH_DCB_DB", "cb_bench_dcb")
DJANGO_CELERY_BEAT_TZ_AWARE = True

from benchmarks.statement_counter import install  # noqa: E402

install()
