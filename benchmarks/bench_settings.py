"""Settings for running our scheduler in the benchmark, on its own database, with statement counting."""

import os

os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")

from project.settings import *  # noqa: F403
from project.settings import DATABASES

DATABASES["default"]["NAME"] = os.environ.get("BENCH_DB", "cb_bench")

from benchmarks.statement_counter import install  # noqa: E402

install()
