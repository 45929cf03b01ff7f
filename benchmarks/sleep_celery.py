"""The incumbent's worker for the realistic mix (benchmarks/mix.py): a Celery task that sleeps, its result
stored by django-celery-results in the django-celery-beat database.

    DJANGO_SETTINGS_MODULE=benchmarks.dcb_settings celery -A benchmarks.sleep_celery worker -c 4 -Q bench.mix

`bench.sleep(seconds, index)` sleeps, then returns `index` (the harness's number for the schedule that
sent it). The app is configured from Django's settings (the CELERY_ namespace: broker, `django-db` result
backend, extended results), as a django-celery-beat + django-celery-results user's would be. What shapes
delivery is set as ours sets it (project/celery.py: the same prefetch multiplier, late acks, task events,
JSON), plus `task_track_started`, so that django-celery-results stores when each task started
(`date_started`): one database write at the start, as ours writes `started_at`.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from benchmarks.common import celery_delivery_conf

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.dcb_settings")

QUEUE = "bench.mix"

app = Celery("bench_sleep")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(celery_delivery_conf(task_track_started=True, task_default_queue=QUEUE))


@app.task(name="bench.sleep")
def sleep(seconds: float, index: int) -> int:
    time.sleep(seconds)
    return index
