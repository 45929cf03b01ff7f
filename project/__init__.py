# The Celery app is loaded with Django (Celery's documented layout).
from project.celery import app as celery_app

__all__ = ("celery_app",)
