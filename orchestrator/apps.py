from django.apps import AppConfig
from django.db.models.signals import post_migrate


class OrchestratorConfig(AppConfig):
    name = "orchestrator"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from orchestrator.jobs.registry import sync_jobs_after_migrate

        post_migrate.connect(sync_jobs_after_migrate, sender=self)
