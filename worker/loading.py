"""The delivery's first read: the run with its job and directive (and its scheduled run with its
schedule), and the lease floor (runstate.LEASE_FLOOR_SQL) as an annotation, in one ORM query; for a
`buffer_all` schedule also whether an earlier slot of it has not tried its caps yet (`earlier_queued`)."""

from __future__ import annotations

from django.db.models import BooleanField, Case, Exists, OuterRef, Value, When
from django.db.models.expressions import RawSQL

from orchestrator.models import Run
from schedules import runstate
from schedules.models import OverlapPolicy, ScheduledRun


def load_delivery(run_id: int, scheduled_run_id: int | None) -> tuple[Run | None, ScheduledRun | None, int]:
    """The run (its job and directive loaded), its scheduled run (its schedule loaded; None when the
    message names none, or one that is not this run's) and the lease floor."""
    floor = RawSQL(runstate.LEASE_FLOOR_SQL, ())
    if scheduled_run_id is not None:
        scheduled = (
            ScheduledRun.objects.select_related("schedule", "run__job", "run__directive")
            .annotate(lease_floor=floor, earlier_queued=_earlier_queued())
            .filter(pk=scheduled_run_id, run_id=run_id)
            .first()
        )
        if scheduled is not None:
            return scheduled.run, scheduled, scheduled.lease_floor
    run = Run.objects.select_related("job", "directive").annotate(lease_floor=floor).filter(pk=run_id).first()
    if run is None:
        return None, None, 0
    return run, None, run.lease_floor


def _earlier_queued() -> Case:
    earlier = ScheduledRun.objects.filter(
        schedule_id=OuterRef("schedule_id"), status="queued", scheduled_for__lt=OuterRef("scheduled_for")
    )
    when = When(schedule__overlap_policy=OverlapPolicy.BUFFER_ALL, then=Exists(earlier))
    return Case(when, default=Value(False), output_field=BooleanField())
