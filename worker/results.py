"""The run task's Celery result, stored by the finish statement instead of by Celery's result backend.

`worker.execute_run` has `ignore_result` set (errors and retries are still stored by Celery:
`store_errors_even_if_ignored`): the SUCCESS row of a run that ended here is written by
`runstate.run_finish` in the same statement and commit as the run's own outcome, which saves the
backend's get-or-create (four round trips and a commit) after every run, and means a TaskResult never
says SUCCESS for a finish that was not written. The row holds exactly what django-celery-results'
`DatabaseBackend` stores for the request (with `result_extended`): the result and the meta encoded by
the backend's own `encode_content`, the task's name, argument reprs, worker and periodic task name.

A delivery that did not write its finish (the run was no longer ours, or the database stayed away) has
its result stored through the backend as before (`store_result`).
"""

from __future__ import annotations

from typing import Any

from celery import states


def task_result_row(task: Any, result: dict[str, Any]) -> dict[str, Any]:
    """The TaskResult columns django-celery-results would write for `task`'s current request."""
    backend = task.backend
    request = task.request
    content_type, content_encoding, encoded = backend.encode_content(result)
    # The backend's meta: what the request carries plus its children (a run task starts none).
    meta = {**(getattr(request, "meta", None) or {}), "children": []}
    row: dict[str, Any] = {
        "task_id": request.id,
        "status": states.SUCCESS,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "result": encoded,
        "meta": backend.encode_content(meta)[2],
        "task_name": None,
        "task_args": None,
        "task_kwargs": None,
        "worker": None,
        "periodic_task_name": None,
    }
    if task.app.conf.find_value_for_key("extended", "result"):
        args = request.argsrepr if getattr(request, "argsrepr", None) is not None else request.args
        kwargs = request.kwargsrepr if getattr(request, "kwargsrepr", None) is not None else request.kwargs
        row.update(
            task_name=request.task,
            task_args=backend.encode_content(args)[2] if args is not None else None,
            task_kwargs=backend.encode_content(kwargs)[2] if kwargs is not None else None,
            worker=request.hostname,
            periodic_task_name=getattr(request, "periodic_task_name", None),
        )
    return row
