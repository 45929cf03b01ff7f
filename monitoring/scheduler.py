"""The scheduler's one monitoring hook: `after_pass` receives `schedules.signals.scheduler_pass_done`,
sent once per pass by schedules/beat.py (connected in monitoring/apps.py; the scheduler never imports us).

Import-light and never raising: metrics bookkeeping and alert evaluation must not break dispatch, so
every failure here is logged and dropped.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def after_pass(*, claimant: str, claimed: int, interval: float, **kwargs: object) -> None:
    """Count the pass and the claims in Redis, mark this instance alive, evaluate alerts when due."""
    try:
        from monitoring.metrics import record_scheduler_pass

        # Alive until two loop intervals (plus room for a slow pass) from now.
        record_scheduler_pass(claimant=claimant, claimed=claimed, alive_for=2 * interval + 30)
    except Exception as exc:
        logger.warning("scheduler metrics not recorded", extra={"error": type(exc).__name__})
    try:
        from monitoring.alerts import evaluate_if_due

        evaluate_if_due()
    except Exception as exc:  # evaluate_if_due catches its own; this is the import or a bug
        logger.warning("alert evaluation skipped", extra={"error": type(exc).__name__})
