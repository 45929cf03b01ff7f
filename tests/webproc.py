"""The web/API as a real process (gunicorn, as the Procfile runs it) and a tiny JSON client for it.

For tests whose web side must use other settings than the test process's own (another broker,
PostgreSQL through PgBouncer): the request is served, and its messages published, by that process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.scheduler_support import REPO, free_port
from tests.support import wait_for

GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


@dataclass
class WebProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    token: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """One API request with the token; (status, decoded JSON or None)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Token {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


def start_web(env: dict[str, str], tmp_path: Path, *, token: str = "", name: str = "web") -> WebProcess:
    """gunicorn on a free port with `env`; returns once /api/health/ answers."""
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [GUNICORN, "project.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--timeout", "60"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    web = WebProcess(proc=proc, url=f"http://127.0.0.1:{port}", log_path=log_path, token=token)

    def answers() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"web exited ({proc.returncode}):\n{web.log()[-3000:]}")
        try:
            return web.call("GET", "/api/health/")[0] in {200, 503}
        except OSError:
            return False

    try:
        wait_for(answers, timeout=60, interval=0.2, what=f"{name} answering")
    except BaseException:
        web.stop()
        raise
    return web


def api_token(username: str = "api-user") -> str:
    """A user with a DRF token in the test database (committed: the web process reads it)."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    user, _ = get_user_model().objects.get_or_create(username=username)
    token, _ = Token.objects.get_or_create(user=user)
    return token.key
