"""Signals the scheduler sends, so that apps built on it (monitoring) hear of it without `schedules`
importing them: the dependency points one way."""

from __future__ import annotations

from django.dispatch import Signal

# Sent once per scheduler pass, after the sweeps, with `claimant` (this instance), `claimed` (schedules
# claimed by the pass) and `interval` (the loop's longest sleep, seconds). Sent with `send_robust`: a
# receiver that raises is logged by Django and never breaks dispatch.
scheduler_pass_done = Signal()
