import os

# The Celery app is loaded with Django (Celery's documented layout), except in the task template
# (orchestrator/template.py): it imports Django and the job modules only, which never use the app,
# and the app's imports (Celery, kombu, redis-py: about 13 MB, a third of the template) would make every
# task process's fork and exit copy and free their page tables.
if os.environ.get("CYBER_BRAIN_TASK_TEMPLATE") != "1":
    from project.celery import app as celery_app

    __all__ = ("celery_app",)
