"""Observability: metrics, alerts, the dashboard, read-only viewers, the run log context."""

from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Every process that sets Django up (web, scheduler, worker) gets the run log context; in a
        # worker the task signals bind it for the run a pool process executes.
        from celery.signals import heartbeat_sent, worker_shutting_down
        from django.core import checks

        from monitoring import logcontext
        from monitoring.alerts import check_webhook_settings
        from monitoring.scheduler import after_pass
        from project import health
        from schedules.signals import scheduler_pass_done

        logcontext.connect_task_signals()
        checks.register(check_webhook_settings)
        # The scheduler's passes (metrics counters, alert evaluation), heard without it importing us.
        scheduler_pass_done.connect(after_pass, dispatch_uid="monitoring.after_pass")
        # `manage.py health --worker`: the worker's event loop stamps each heartbeat (project/health.py).
        heartbeat_sent.connect(health.worker_heartbeat, dispatch_uid="health.worker_heartbeat")
        worker_shutting_down.connect(health.worker_draining, dispatch_uid="health.worker_draining")
