"""Observability: metrics, alerts, the dashboard, read-only viewers, the run log context."""

from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Every process that sets Django up (web, scheduler, worker) gets the run log context; in a
        # worker the task signals bind it for the run a pool process executes.
        from monitoring import logcontext

        logcontext.connect_task_signals()
