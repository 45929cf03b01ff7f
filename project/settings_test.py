"""Settings for the test suite: the real settings with a test-only key and a separate Redis database.

Tests talk to the real PostgreSQL and Redis; pytest-django creates the `test_<POSTGRES_DB>` database.
Processes that tests start (schedulers, workers) get this module and the test database's name.
"""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key-not-for-any-deployment")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
# Never the settings of a developer's `make run` (.run/local.env, project/env.py): tests choose their own.
os.environ.setdefault("CB_LOCAL_ENV_FILE", "")

from project.settings import *  # noqa: F403
