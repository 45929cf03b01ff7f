"""A second sleep-like job for the caps test, imported by the test's worker (`celery --include`).

Two jobs are needed to show the global cap binding across jobs while each job's own cap holds. It reuses
the sleep job's module-level tasks, which the per-task child process imports by name.
"""

from orchestrator.jobs import sleep
from orchestrator.jobs.registry import JobSpec, all_job_specs, register

all_job_specs()  # load the builtins first

SLEEP_B = register(
    JobSpec(
        key="sleep_b",
        name="Sleep (second job, tests only)",
        description="The sleep job under a second key, for cap tests.",
        tasks=sleep.JOB.tasks,
        timeout_seconds=600,
    )
)
