"""Jobs for worker tests, imported by the test's worker (`celery --include`): a second sleep-like
job for the caps test, and `spawner` for the tests that look for a run's survivors.


Two jobs are needed to show the global cap binding across jobs while each job's own cap holds. It reuses
the sleep job's module-level tasks, which the per-task child process imports by name.
"""

from orchestrator.jobs import sleep
from orchestrator.jobs.registry import JobSpec, TaskSpec, all_job_specs, register

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


def spawn_prepare(ctx):
    return {}


def spawn_and_wait(ctx):
    """Start a grandchild (`sleep`) in the task's group, write both pids to the file the directive
    names, then wait: for the tests that kill the worker under a run and look for survivors."""
    import os
    import subprocess
    import time

    grandchild = subprocess.Popen(["sleep", "600"])
    path = ctx.directive_text.strip()
    with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {grandchild.pid}\n")
    os.replace(f"{path}.tmp", path)
    time.sleep(600)
    return {}


SPAWNER = register(
    JobSpec(
        key="spawner",
        name="Spawner (tests only)",
        description="Starts a grandchild process and waits; its directive is a pid file path.",
        tasks=(
            TaskSpec("prepare", spawn_prepare),
            TaskSpec("spawn", spawn_and_wait),
            sleep.JOB.tasks[2],
        ),
        timeout_seconds=900,
    )
)


def fail_with_a_secret(ctx):
    raise ValueError("a message that must not leave the run: hunter2")


FAILING = register(
    JobSpec(
        key="failing",
        name="Failing (tests only)",
        description="Its second task raises: a failed run, for the tests of its Celery result.",
        tasks=(sleep.JOB.tasks[0], TaskSpec("fail", fail_with_a_secret), sleep.JOB.tasks[2]),
        timeout_seconds=60,
    )
)


def fail_while_the_file_exists(ctx):
    import os

    if os.path.exists(ctx.directive_text.strip()):
        raise RuntimeError("the file says fail")
    return {}


FLAKY = register(
    JobSpec(
        key="flaky",
        name="Flaky (tests only)",
        description="Fails while the file its directive names exists: for pause and recovery tests.",
        tasks=(sleep.JOB.tasks[0], TaskSpec("check", fail_while_the_file_exists), sleep.JOB.tasks[2]),
        timeout_seconds=60,
    )
)


def record_context(ctx):
    """Append what this task received (params, slot, previous slot, attempt) as a JSON line to the file
    its `out` param names: for the test of run inputs (tests/acceptance/test_run_inputs.py)."""
    import json
    import os

    seen = {
        "run_id": ctx.run_id,
        "pid": os.getpid(),
        "params": ctx.params,
        "scheduled_for": ctx.scheduled_for.isoformat() if ctx.scheduled_for else None,
        "previous_scheduled_for": (
            ctx.previous_scheduled_for.isoformat() if ctx.previous_scheduled_for else None
        ),
        "attempt": ctx.attempt,
    }
    with open(ctx.params["out"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(seen) + "\n")
    return {}


CONTEXT_RECORDER = register(
    JobSpec(
        key="context_recorder",
        name="Context recorder (tests only)",
        description="Each task appends the TaskContext inputs it received to the file its `out` param names.",
        tasks=(
            TaskSpec("first", record_context),
            TaskSpec("second", record_context),
            TaskSpec("third", record_context),
        ),
        timeout_seconds=60,
        params_schema={
            "type": "object",
            "properties": {
                "out": {"type": "string", "minLength": 1},
                "label": {"enum": ["scheduled", "manual"]},
            },
            "required": ["out"],
            "additionalProperties": False,
        },
    )
)


def stamp_start(ctx):
    """Append this task process's start time as the kernel recorded it (/proc/self/stat, field 22, read
    by psutil) to the file the directive names: for the rate-limit test, which must not depend on
    sampling a process that lives for a few milliseconds."""
    import json
    import os

    import psutil

    line = json.dumps({"run_id": ctx.run_id, "pid": os.getpid(), "start": psutil.Process().create_time()})
    with open(ctx.directive_text.strip(), "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    return {}


def nothing(ctx):
    return {}


START_STAMP = register(
    JobSpec(
        key="start_stamp",
        name="Start stamp (tests only)",
        description="Near no-op: its first task appends its start time to the file its directive names.",
        tasks=(TaskSpec("stamp", stamp_start), TaskSpec("nothing", nothing), sleep.JOB.tasks[2]),
        timeout_seconds=60,
    )
)


def fail_until_attempt(ctx):
    """Append {run_id, attempt, pid, at} as a JSON line to the file the `out` param names, then fail
    while the run's attempt is at most `fail_times` (with `hang`, hang instead, for a test to kill the
    worker): for the retry tests (tests/acceptance/test_retries.py, tests/chaos/test_retry_faults.py).
    """
    import json
    import os
    import time

    with open(ctx.params["out"], "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps({"run_id": ctx.run_id, "attempt": ctx.attempt, "pid": os.getpid(), "at": time.time()})
        )
        fh.write("\n")
    if ctx.attempt <= ctx.params.get("fail_times", 0):
        if ctx.params.get("hang"):
            time.sleep(600)  # until the test kills its worker
        raise RuntimeError("failing on purpose")
    return {}


FAILS_THEN_SUCCEEDS = register(
    JobSpec(
        key="fails_then_succeeds",
        name="Fails then succeeds (tests only)",
        description="Records each attempt in the file its `out` param names; fails its first `fail_times`.",
        tasks=(sleep.JOB.tasks[0], TaskSpec("attempt", fail_until_attempt), sleep.JOB.tasks[2]),
        timeout_seconds=60,
        params_schema={
            "type": "object",
            "properties": {
                "out": {"type": "string", "minLength": 1},
                "fail_times": {"type": "integer", "minimum": 0},
                "hang": {"type": "boolean"},
            },
            "required": ["out"],
            "additionalProperties": False,
        },
    )
)


def ignore_sigterm_and_wait(ctx):
    """Ignore SIGTERM, then wait the seconds the directive names: only SIGKILL ends it early, for the
    test that a cancel's grace ends in SIGKILL (tests/acceptance/test_run_cancel.py)."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(sleep.parse_seconds(ctx.directive_text))
    return {}


STUBBORN = register(
    JobSpec(
        key="stubborn",
        name="Stubborn (tests only)",
        description="Ignores SIGTERM and sleeps the seconds its directive names.",
        tasks=(sleep.JOB.tasks[0], TaskSpec("wait", ignore_sigterm_and_wait), sleep.JOB.tasks[2]),
        timeout_seconds=600,
    )
)
