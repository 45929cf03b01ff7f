#!/usr/bin/env python3
"""Phase 2 smoke test against a running system (`make run` or `docker compose up`).

Creates a uniquely named `sleep` schedule, triggers `run-now`, waits until the schedule's history shows
that run `succeeded`, checks that Flower answers behind basic auth and shows the run's task with its job
key and run ids, deletes the schedule, prints one summary line and exits 0; any failure exits 1.

Standard library only, so `python3 scripts/smoke_phase2.py` works outside the virtualenv.

Settings (argument, else environment, else default):
  --base-url     CB_BASE_URL        http://127.0.0.1:9595
  --token        CB_TOKEN           contents of .run/api_token (written by `make run`)
  --flower-url   CB_FLOWER_URL      http://127.0.0.1:5555
  --flower-auth  FLOWER_BASIC_AUTH  contents of .run/flower_basic_auth (user:password)
  --timeout      CB_SMOKE_TIMEOUT   90 (seconds to wait for the run to succeed)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

RUN_DIR = Path(__file__).resolve().parent.parent / ".run"
FINAL_FAILURES = {"failed", "skipped"}


class SmokeFailure(Exception):
    pass


def from_run_dir(name: str) -> str:
    path = RUN_DIR / name
    return path.read_text().strip() if path.is_file() else ""


def request(
    method: str, url: str, *, headers: dict[str, str], body: dict | None = None, timeout: float = 10
) -> tuple[int, object]:
    """(status, decoded JSON or text); HTTP errors are returned, not raised. Network errors raise."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise SmokeFailure(f"{method} {url}: {getattr(exc, 'reason', exc)}") from exc
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text) if text else None
    except json.JSONDecodeError:
        return status, text


def expect(status: int, wanted: int, what: str, payload: object) -> None:
    if status != wanted:
        raise SmokeFailure(f"{what}: HTTP {status} (wanted {wanted}): {str(payload)[:300]}")


def wait_for_run(api: str, headers: dict, schedule_id: int, run_id: int, timeout: float) -> dict:
    """Poll the schedule's history until the run ends; return its entry."""
    deadline = time.monotonic() + timeout
    last_status = "absent"
    while time.monotonic() < deadline:
        status, page = request("GET", f"{api}/schedules/{schedule_id}/history", headers=headers)
        expect(status, 200, "history", page)
        entries = page.get("results", page) if isinstance(page, dict) else page
        entry = next((e for e in entries if e.get("id") == run_id), None)
        if entry:
            last_status = entry.get("status")
            if last_status == "succeeded":
                return entry
            if last_status in FINAL_FAILURES:
                raise SmokeFailure(f"run {run_id} ended {last_status}: {entry.get('error_summary') or ''}")
        time.sleep(0.5)
    raise SmokeFailure(
        f"run {run_id} not succeeded after {timeout:.0f}s (last status: {last_status}); "
        "are the worker and its queue up?"
    )


def check_flower(flower: str, auth: str, task_id: str | None, timeout: float = 20) -> str:
    """Flower answers, refuses anonymous access, and shows the task with its job key and run ids."""
    status, _ = request("GET", f"{flower}/", headers={})
    if status != 401:
        raise SmokeFailure(f"Flower at {flower} answered {status} without credentials (wanted 401)")
    if not auth:
        raise SmokeFailure("no Flower credentials: set FLOWER_BASIC_AUTH or --flower-auth")
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}
    status, _ = request("GET", f"{flower}/", headers=headers)
    expect(status, 200, "Flower with basic auth", "")
    if not task_id:
        return "flower ok"
    deadline = time.monotonic() + timeout
    info: object = None
    while time.monotonic() < deadline:
        status, info = request("GET", f"{flower}/api/task/info/{task_id}", headers=headers)
        if status == 200 and isinstance(info, dict) and info.get("kwargs"):
            kwargs = str(info.get("kwargs"))
            missing = [k for k in ("job_key", "run_id", "scheduled_run_id") if k not in kwargs]
            if missing:
                raise SmokeFailure(f"Flower shows task {task_id} without {missing}: {kwargs[:200]}")
            return f"flower ok (task {info.get('name')} {kwargs[:120]})"
        time.sleep(0.5)
    raise SmokeFailure(f"Flower does not show task {task_id} after {timeout:.0f}s: {str(info)[:200]}")


def delete_schedule(api: str, headers: dict, schedule_id: int | None, name: str) -> str:
    """Remove the smoke schedule; '' when done (or nothing to do), else a note for the summary line."""
    if schedule_id is None:
        return ""
    try:
        status, body = request("DELETE", f"{api}/schedules/{schedule_id}/", headers=headers)
    except SmokeFailure as exc:
        return f"deleting schedule {name} failed: {exc}"
    if status not in (204, 404):
        return f"deleting schedule {name} failed: HTTP {status} {str(body)[:200]}"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("CB_BASE_URL", "http://127.0.0.1:9595"))
    parser.add_argument("--token", default=os.environ.get("CB_TOKEN") or from_run_dir("api_token"))
    parser.add_argument("--flower-url", default=os.environ.get("CB_FLOWER_URL", "http://127.0.0.1:5555"))
    parser.add_argument(
        "--flower-auth",
        default=os.environ.get("FLOWER_BASIC_AUTH") or from_run_dir("flower_basic_auth"),
    )
    parser.add_argument("--timeout", type=float, default=float(os.environ.get("CB_SMOKE_TIMEOUT", "90")))
    args = parser.parse_args()

    api = args.base_url.rstrip("/") + "/api"
    headers = {"Authorization": f"Token {args.token}", "Accept": "application/json"}
    name = f"smoke-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    schedule_id = None
    try:
        if not args.token:
            raise SmokeFailure("no API token: pass --token or set CB_TOKEN (make run prints one)")
        status, health = request("GET", f"{api}/health/", headers={})
        expect(status, 200, "health", health)
        # Disabled, so the scheduler leaves it alone: run-now works on a disabled schedule
        # (docs/ARCHITECTURE.md, "API conventions")
        # and the run checked below is the only one.
        status, schedule = request(
            "POST",
            f"{api}/schedules/",
            headers=headers,
            body={
                "name": name,
                "job_key": "sleep",
                "custom_directive_text": "0.2",
                "enabled": False,
                "schedule_type": "interval",
                "interval_minutes": 60,
                "timezone": "UTC",
            },
        )
        expect(status, 201, "create schedule", schedule)
        schedule_id = schedule["id"]
        status, run = request("POST", f"{api}/schedules/{schedule_id}/run-now", headers=headers)
        expect(status, 202, "run-now", run)
        entry = wait_for_run(api, headers, schedule_id, run["id"], args.timeout)
        elapsed = time.monotonic() - started
        flower = check_flower(
            args.flower_url.rstrip("/"), args.flower_auth, entry.get("task_id") or run.get("task_id")
        )
    except SmokeFailure as exc:
        cleanup = delete_schedule(api, headers, schedule_id, name)
        print(f"smoke_phase2 FAILED: {exc}" + (f" (and {cleanup})" if cleanup else ""))
        return 1
    cleanup = delete_schedule(api, headers, schedule_id, name)
    if cleanup:
        print(f"smoke_phase2 FAILED: run {run['id']} succeeded, but {cleanup}")
        return 1
    print(
        f"smoke_phase2 OK: schedule {name} run {run['id']} succeeded in {elapsed:.1f}s "
        f"(worker {entry.get('worker') or '?'}); {flower}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
