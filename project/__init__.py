import os

# The Celery app is loaded with Django (Celery's documented layout), except in the task template
# (orchestrator/template.py): it imports Django and the job modules only, which do not need the app,
# and the app's imports (Celery, kombu, redis-py: about 13 MB, a third of the template) would make every
# task process's fork and exit copy and free their page tables. There, `project.celery_app` is loaded
# on first use instead.
if os.environ.get("CYBER_BRAIN_TASK_TEMPLATE") != "1":
    from project.celery import app as celery_app
else:

    def __getattr__(name: str):
        if name == "celery_app":
            from project.celery import app

            return app
        raise AttributeError(f"module 'project' has no attribute {name!r}")


__all__ = ("celery_app",)
