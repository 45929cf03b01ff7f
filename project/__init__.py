# The Celery app is project/celery.py: `celery -A project` finds it there, and the code that uses it
# imports it from there. Not imported here: `import project` comes with the settings into every process,
# the task template (orchestrator/template.py) included, where Celery, kombu and redis-py would add about
# 8 MB that every task process's fork and exit copy and tear down again (docs/BENCHMARKS.md).
