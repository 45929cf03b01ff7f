"""Django settings, read from the environment (docs/OPERATIONS.md, "Settings").

Defaults serve a local run against PostgreSQL and Redis on 127.0.0.1. Nothing secret has a usable
default: with DEBUG off the process refuses to start without SECRET_KEY.
"""

from __future__ import annotations

from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from project.env import (
    database_from_parts,
    database_from_url,
    env_bool,
    env_int,
    env_list,
    env_str,
)
from project.redisconn import sentinel_broker_url

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

_INSECURE_KEY = "insecure-development-key-do-not-use-in-production"
# Values that are public knowledge: Django's startproject prefix, and placeholders people paste from docs.
_PLACEHOLDER_KEYS = {
    "change-me",
    "changeme",
    "change_me",
    "secret",
    "secret-key",
    "secret_key",
    "your-secret-key",
}
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY.strip():
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY in the environment (DEBUG=1 allows a development key)."
        )
    SECRET_KEY = _INSECURE_KEY
elif not DEBUG and (
    SECRET_KEY == _INSECURE_KEY
    or SECRET_KEY.startswith("django-insecure-")
    or SECRET_KEY.strip().lower() in _PLACEHOLDER_KEYS
):
    raise ImproperlyConfigured(
        "SECRET_KEY is a known insecure or placeholder value. Set a long random SECRET_KEY, e.g. "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(50))'."
    )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "orchestrator",
    "schedules",
    "worker",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files (admin, API docs) straight from gunicorn: no separate web server to run.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_database_url = env_str("DATABASE_URL", "")
DATABASES = {"default": database_from_url(_database_url) if _database_url else database_from_parts()}
# Keep connections between requests and ticks; health checks drop dead ones (a PostgreSQL restart).
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", 5)

# --- Behind PgBouncer (docs/OPERATIONS.md "Behind PgBouncer") ----------------------------------------
# DB_TRANSACTION_POOLING=1: the database URL goes through a transaction pool (PgBouncer
# pool_mode=transaction), where a server connection is lent per transaction. Then no server-side
# cursors (Django's `.iterator()` would DECLARE a cursor that outlives the transaction), and the
# scheduler's and workers' lock/statement timeouts go with each statement as SET LOCAL
# (project/dbsession.py) instead of a session setting, which would land on a shared server connection.
# psycopg2 binds parameters client-side: no prepared statements to lose between transactions.
DB_TRANSACTION_POOLING = env_bool("DB_TRANSACTION_POOLING", False)
if DB_TRANSACTION_POOLING:
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
else:
    # Every process's sessions (web, scheduler, workers): a client host cut off or frozen mid-transaction
    # sends no reset, so PostgreSQL would keep its session and row locks for 15 min (its reply
    # unacknowledged) to 2 h (keepalive), and every scheduler skips a schedule's row so held (SKIP
    # LOCKED). A peer silent for ~30 s is dropped instead (issue 18). PgBouncer refuses `options`.
    _options = DATABASES["default"]["OPTIONS"]
    _options["options"] = (
        f"{_options.get('options', '')} -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5"
        " -c tcp_keepalives_count=3 -c tcp_user_timeout=30000"
    ).strip()
# The scheduler's LISTEN for schedule changes needs one session that stays its own, which a
# transaction pool cannot give: a direct postgres:// URL to the same database (default: the main
# database settings). Without one behind a transaction pool, or when a probe NOTIFY does not come
# back, the scheduler says so once and sleeps its --interval instead (schedules/beat.py WakeListener).
SCHEDULER_LISTEN_DATABASE_URL = env_str("SCHEDULER_LISTEN_DATABASE_URL", "")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# DRF: 10 MB request bodies are refused before parsing (DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MB).
REST_FRAMEWORK = {
    "EXCEPTION_HANDLER": "project.api.exception_handler",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Authenticated, and users in the `viewers` group read only (every write is a 403).
    "DEFAULT_PERMISSION_CLASSES": ["monitoring.permissions.IsAuthenticatedViewerReadOnly"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Cyber Brain scheduler API",
    "DESCRIPTION": "Interval and cron schedules for orchestrator jobs; runs, history and health.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # One tag per resource (project.api.AutoSchema.get_tags), described here, in the order Swagger shows.
    "TAGS": [
        {
            "name": "schedules",
            "description": "Interval and cron schedules: create, preview, run now, backfill, history.",
        },
        {
            "name": "calendars",
            "description": "Named sets of days (holidays, business days, windows) that schedules exclude or"
            " keep to: create, list the days, import an iCalendar file.",
        },
        {"name": "runs", "description": "Runs of jobs, however launched: list, read, launch by hand."},
        {
            "name": "jobs",
            "description": "The kinds of work the system can run, with their caps and timeouts.",
        },
        {"name": "directives", "description": "Reusable instructions for a job."},
        {"name": "alerts", "description": "Missed, failing and overdue schedules, open and resolved."},
        {"name": "health", "description": "Database and Redis reachability; no authentication."},
    ],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI from drf-spectacular-sidecar's static files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
}

# --- Redis and Celery -------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# Redis Sentinel (project/redisconn.py): a comma-separated host:port list of sentinels and the name of
# the master they watch. Set, every client asks them where the master is (REDIS_URL then gives only the
# database number and the password), and the broker defaults to kombu's sentinel:// transport.
REDIS_SENTINELS = env_str("REDIS_SENTINELS", "")
REDIS_SENTINEL_MASTER = env_str("REDIS_SENTINEL_MASTER", "mymaster")
# Unset or empty: REDIS_URL's Redis (or its master, through the sentinels).
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or (
    sentinel_broker_url(REDIS_URL, REDIS_SENTINELS) if REDIS_SENTINELS else REDIS_URL
)
if CELERY_BROKER_URL.startswith("sentinel://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {"master_name": REDIS_SENTINEL_MASTER}
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TIMEZONE = "UTC"
CELERY_ENABLE_UTC = True

# --- Scheduler and workers --------------------------------------------------------------------------
# Default global cap on running runs when neither the schedule nor the job sets one (None = no cap).
SCHEDULER_MAX_GLOBAL = env_int("SCHEDULER_MAX_GLOBAL", 10)
# How long a statement of the scheduler (run_scheduler, Celery beat) may wait for a lock, and run, in
# ms (0 = no limit); project/dbsession.py. Its claims and dispatch skip locked rows, so a wait is
# someone holding a table or a row it must write (a migration, a session left open): after this the
# pass fails, backs off and retries instead of stalling every schedule behind it. Both stay well under
# the claim TTL (120 s), so a stuck statement never outlives the claims it works on.
SCHEDULER_LOCK_TIMEOUT_MS = env_int("SCHEDULER_LOCK_TIMEOUT_MS", 5000)
SCHEDULER_STATEMENT_TIMEOUT_MS = env_int("SCHEDULER_STATEMENT_TIMEOUT_MS", 30000)
# A scheduler transaction idle this long (ms; 0 = no limit) ends its session, releasing its row locks:
# a scheduler frozen or cut off mid-dispatch cannot hold its schedules past the claim TTL. Its dispatch
# transactions are short (a few statements, no waiting on anything outside the database).
SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS = env_int("SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS", 10000)

# Retention (schedules/retention.py): finished history older than this many days is pruned by the
# schedulers (ScheduledRun, Run, Finding, TaskResult), each schedule keeping at least its newest
# `history_keep` runs; 0 keeps everything. Slot dedup does not depend on history (last_run_at).
HISTORY_KEEP_DAYS = float(env_str("HISTORY_KEEP_DAYS", "30"))

# --- Workers (worker/) -----------------------------------------------------------------------------
# Lease TTL of a running run's semaphore slots and liveness key; its heartbeat renews them every quarter
# lease. A run whose lease expired is reaped as "worker lost", so a dead worker's slot frees within it.
WORKER_LEASE_SECONDS = float(env_str("WORKER_LEASE_SECONDS", "60"))
# How often each worker process and each scheduler runs the reaper (workers: also the lost-message check).
WORKER_REAPER_INTERVAL_SECONDS = float(env_str("WORKER_REAPER_INTERVAL_SECONDS", "15"))
# Backoff of a throttled run between attempts (jittered; grows with the number of runs waiting ahead).
WORKER_THROTTLE_BASE_SECONDS = float(env_str("WORKER_THROTTLE_BASE_SECONDS", "1"))
WORKER_THROTTLE_MAX_SECONDS = float(env_str("WORKER_THROTTLE_MAX_SECONDS", "30"))
# Hard time limit = Job.timeout_seconds (the soft limit) + this grace.
WORKER_HARD_LIMIT_GRACE_SECONDS = env_int("WORKER_HARD_LIMIT_GRACE_SECONDS", 30)
# How long a pool process retries writing a finished run's outcome while PostgreSQL is away, holding its
# leases, before it leaves the outcome (kept in Redis) to the reapers, which write it when it returns.
WORKER_FINISH_RETRY_SECONDS = float(env_str("WORKER_FINISH_RETRY_SECONDS", str(WORKER_LEASE_SECONDS)))
# How long the worker's parent retries ending the run of a pool process that died or hit its hard limit.
WORKER_PARENT_WRITE_RETRY_SECONDS = float(env_str("WORKER_PARENT_WRITE_RETRY_SECONDS", "3600"))
# Graceful drain (worker/drain.py): after SIGTERM a worker takes no new message and gives its running runs
# this long to finish; a run still executing then is ended `failed` ("worker drained"). Keep it below the
# time the platform waits before SIGKILL (Kubernetes terminationGracePeriodSeconds, compose
# stop_grace_period), with room for the ending itself (a few seconds).
WORKER_DRAIN_SECONDS = float(env_str("WORKER_DRAIN_SECONDS", "240"))
# The same limits for the worker's statements (ms, 0 = no limit): a run's transitions are single-row
# writes that never need to wait long; a lock held longer is someone else's stuck session, and the
# worker's retries of a failed write (as for PostgreSQL away) apply instead of a silent stall.
WORKER_LOCK_TIMEOUT_MS = env_int("WORKER_LOCK_TIMEOUT_MS", 5000)
WORKER_STATEMENT_TIMEOUT_MS = env_int("WORKER_STATEMENT_TIMEOUT_MS", 30000)
# A cancelled run's task processes get SIGTERM, then SIGKILL this many seconds later unless they ended
# (POST /api/runs/{id}/cancel may give its own `cancel_grace_seconds`; the overlap policy cancel_other
# uses this one, terminate_other none).
CANCEL_GRACE_SECONDS = float(env_str("CANCEL_GRACE_SECONDS", "10"))

# --- Jobs -------------------------------------------------------------------------------------------
CYBER_BRAIN_LOGS = Path(env_str("CYBER_BRAIN_LOGS", str(BASE_DIR / "logs")))
UPLOADS_DIR = Path(env_str("UPLOADS_DIR", str(BASE_DIR / "uploads")))
LLM_ENDPOINT = env_str("LLM_ENDPOINT", "")
LLM_MODEL = env_str("LLM_MODEL", "")
LLM_ALLOWED_HOSTS = env_list("LLM_ALLOWED_HOSTS", [])

FLOWER_BASIC_AUTH = env_str("FLOWER_BASIC_AUTH", "")

# --- Observability (monitoring/, issue 17) ---------------------------------------------------------
# GET /metrics: "user:password" for Prometheus' basic_auth (API tokens and sessions work too). Unset, the
# endpoint is open only with DEBUG on; otherwise it needs credentials.
METRICS_BASIC_AUTH = env_str("METRICS_BASIC_AUTH", "")
# Scrapes are served from an exposition built at most this many seconds ago (rebuilt in the background;
# monitoring/metrics.py says why). 0: build it on every scrape.
METRICS_MAX_AGE_SECONDS = float(env_str("METRICS_MAX_AGE_SECONDS", "10"))
# Which schedules get per-schedule series: `top:N` (the N latest by next run, the default 1000), `all`
# or `none`. Bounded by default: 100,000 schedules would be 200,000 series (docs/OBSERVABILITY.md).
METRICS_PER_SCHEDULE = env_str("METRICS_PER_SCHEDULE", "top:1000")
# Where alert notifications go (comma-separated webhook URLs; Slack-compatible JSON). A schedule's
# alert_webhook_url replaces them for that schedule. Empty: alerts are recorded, not sent.
ALERT_WEBHOOK_URLS = env_list("ALERT_WEBHOOK_URLS", [])
# Webhooks (these and each schedule's) may reach public addresses only; a host named here (exact name
# or IP, comma-separated) may also resolve to loopback, private, link-local, multicast or reserved ones.
ALERT_WEBHOOK_ALLOWED_HOSTS = env_list("ALERT_WEBHOOK_ALLOWED_HOSTS", [])
# How often a scheduler evaluates alerts (seconds; every instance may, the SQL makes that safe).
ALERT_EVALUATE_EVERY_SECONDS = float(env_str("ALERT_EVALUATE_EVERY_SECONDS", "15"))
# A slot that has not started this long after it was due opens a `missed` alert (a schedule's
# catchup_window_seconds replaces it; its jitter_seconds is added).
ALERT_MISSED_GRACE_SECONDS = float(env_str("ALERT_MISSED_GRACE_SECONDS", "300"))
# Webhook delivery: per-request timeout, and the backoff between attempts of one notification.
ALERT_WEBHOOK_TIMEOUT_SECONDS = float(env_str("ALERT_WEBHOOK_TIMEOUT_SECONDS", "5"))
ALERT_RETRY_BASE_SECONDS = float(env_str("ALERT_RETRY_BASE_SECONDS", "5"))
ALERT_RETRY_MAX_SECONDS = float(env_str("ALERT_RETRY_MAX_SECONDS", "300"))
# Flower, for links from the dashboard and the admin to a run's task.
FLOWER_URL = env_str("FLOWER_URL", "http://127.0.0.1:5555").rstrip("/")
# Where the scheduler and the worker stamp each round of their loops for `manage.py health` (the
# Kubernetes probes; project/health.py). Empty: a directory of this user's under the temporary directory.
HEALTH_DIR = env_str("HEALTH_DIR", "")
# `text` (default): one readable line with key=value fields; `json`: one JSON object per line.
LOG_FORMAT = env_str("LOG_FORMAT", "text")
LOGIN_URL = "/admin/login/"

LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "structured": {"()": "project.logging.StructuredFormatter"},
        "json": {"()": "project.logging.JsonFormatter"},
    },
    "filters": {
        # Adds run_id, scheduled_run_id, schedule_id, job, task_id to every line about a run.
        "run_context": {"()": "project.logging.RunContextFilter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "structured",
            "filters": ["run_context"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
    },
}
