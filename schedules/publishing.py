"""Handing run messages to the broker, by task name (schedules never imports worker).

The message for a run is published only after the transaction that created the run commits, and
always with the run's own task id, so a re-publish (the outbox sweep) is recognisably the same run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from project.celery import app

logger = logging.getLogger(__name__)

# The worker registers its task under this name; see worker/tasks.py.
RUN_TASK_NAME = "worker.execute_run"


@dataclass(frozen=True)
class RunMessage:
    task_id: str
    run_id: int
    scheduled_run_id: int | None
    job_key: str
    queue: str


def publish_messages(messages: list[RunMessage]) -> list[RunMessage]:
    """Publish each message on one broker connection; return the ones that were handed over."""
    if not messages:
        return []
    published: list[RunMessage] = []
    with app.producer_or_acquire() as producer:
        for message in messages:
            app.send_task(
                RUN_TASK_NAME,
                kwargs={
                    "run_id": message.run_id,
                    "scheduled_run_id": message.scheduled_run_id,
                    "job_key": message.job_key,
                },
                task_id=message.task_id,
                queue=message.queue,
                routing_key=message.queue,
                producer=producer,
            )
            published.append(message)
    _stamp_published(published)
    return published


def _stamp_published(messages: list[RunMessage]) -> None:
    from orchestrator.models import Run
    from schedules.models import ScheduledRun

    now = timezone.now()
    run_ids = [m.run_id for m in messages]
    scheduled_ids = [m.scheduled_run_id for m in messages if m.scheduled_run_id is not None]
    Run.objects.filter(pk__in=run_ids).update(published_at=now)
    if scheduled_ids:
        ScheduledRun.objects.filter(pk__in=scheduled_ids).update(published_at=now)


def publish_on_commit(messages: list[RunMessage]) -> None:
    """Publish once the current transaction commits; a failed publish is left to the outbox sweep."""

    def _publish() -> None:
        try:
            publish_messages(messages)
        except Exception:
            # The runs stay `queued` with no published_at: the scheduler's outbox sweep re-publishes them.
            logger.exception("publish failed; left for the outbox sweep", extra={"count": len(messages)})

    transaction.on_commit(_publish)
