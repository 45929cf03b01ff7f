"""The Celery app, configured from Django settings (the CELERY_ namespace) plus the choices below.

Each worker setting is chosen on purpose; the reason is on its line. The run task itself (worker/tasks.py)
sets acks_late and reject_on_worker_lost explicitly too, so a setting change here cannot weaken it.
"""

from __future__ import annotations

import os

from celery import Celery

from project.env import env_int

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")


# Seconds; must exceed the longest Job.timeout_seconds + WORKER_HARD_LIMIT_GRACE_SECONDS.
BROKER_VISIBILITY_TIMEOUT = env_int("BROKER_VISIBILITY_TIMEOUT", 4 * 3600)


# How many messages a worker holds at once, per pool process (Celery's `worker_prefetch_multiplier`).
# With late acks a message stays unacknowledged while its run executes, so with 1 a worker holds exactly
# as many runs as it has pool processes and never reserves one it cannot start: a run waits in the
# broker, where any worker with a free process takes it, not behind a busy worker while another sits
# idle (Celery's advice for long tasks; tests/acceptance/test_worker_prefetch.py). Celery's
# `worker_disable_prefetch` gives the same with Redis only; this works with any broker. What 1 costs: a
# pool process that finishes a run waits for its worker to fetch the next message, a noticeable share of
# a no-op run's time but nothing next to a job of seconds (docs/BENCHMARKS.md). Raise it only for many
# short runs on one worker; a run reserved by a busy worker then waits up to a run's length per message.
WORKER_PREFETCH_MULTIPLIER = env_int("WORKER_PREFETCH_MULTIPLIER", 1)
# Celery's Django fix-up closes the database connection before and after every task unless this is set
# (celery/fixups/django.py): a new PostgreSQL backend per run, the pool process's largest single cost.
# Django's CONN_MAX_AGE and health checks (project/settings.py) retire connections instead; the fix-up
# still closes them every 2 x this many tasks.
DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)

app.conf.update(
    CELERY_DB_REUSE_MAX=DB_REUSE_MAX,
    worker_prefetch_multiplier=WORKER_PREFETCH_MULTIPLIER,
    # Acknowledge after the run ends: if a whole worker dies mid-run or before starting, the message
    # is redelivered rather than lost; at-most-once is the database's start gate, not the ack.
    task_acks_late=True,
    # A pool child killed mid-run is a failed run ("worker lost"), not a re-run: at most once.
    task_reject_on_worker_lost=False,
    # A failed or timed-out run is finished in the database; its message must not come back.
    task_acks_on_failure_or_timeout=True,
    # A Redis blip must not cancel runs in progress; their outcome is written to PostgreSQL anyway.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # Keep retrying the broker at startup (containers start in any order).
    broker_connection_retry_on_startup=True,
    # Task events are what Flower shows: received, started, retried, succeeded, failed.
    worker_send_task_events=True,
    # No `sent` event from publishers: it doubles the scheduler's cost per message (a second publish to
    # the event exchange), and Flower already lists each task from the worker's `received` event.
    task_send_sent_event=False,
    # No STARTED result: a late duplicate delivery would overwrite the real run's SUCCESS with it. Flower
    # shows started from task events, and ScheduledRun/Run show `running` from the database.
    task_track_started=False,
    # A run message without an explicit queue still lands on its job's queue.
    task_routes=("worker.routing.route_run",),
    # `-Q jobs.<key>` declares a job's queue on the fly; no static list to keep in sync with Job rows.
    task_create_missing_queues=True,
    # Logs go through project.logging's structured formatter, not Celery's own root handler.
    worker_hijack_root_logger=False,
    # Results are small dicts of counts (never LLM text); JSON only.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


def broker_is_redis(url: str | None = None) -> bool:
    """Whether the broker (`url`, default the app's) goes through kombu's Redis transport.

    Only a Redis broker has a visibility timeout and can lose its data on a restart without anybody
    noticing; any other broker (RabbitMQ: `amqp://`) is used through Celery's public API alone. Asked
    of kombu (the transport's `driver_type`), so every Redis URL form counts (`rediss://`,
    `sentinel://`, `redis+socket://`). Builds no connection.
    """
    from kombu import Connection

    with Connection(url or app.conf.broker_url) as conn:
        return conn.transport.driver_type == "redis"


@app.on_after_configure.connect
def _redis_transport_options(sender: Celery, source, **kwargs) -> None:
    # Redis redelivers unacked messages after the visibility timeout; it must exceed the longest hard
    # time limit (Job.timeout_seconds + grace) or a still-running run's message comes back mid-run.
    # RabbitMQ has no such option (its consumer_timeout is the server's: docs/OPERATIONS.md).
    if broker_is_redis(source.broker_url):
        source.broker_transport_options = {
            "visibility_timeout": BROKER_VISIBILITY_TIMEOUT,
            **(source.broker_transport_options or {}),
        }


app.autodiscover_tasks()
