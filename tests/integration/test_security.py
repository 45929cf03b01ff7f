"""Security checks (docs/ARCHITECTURE.md, "API conventions" and "Guardrails", and docs/OPERATIONS.md,
"Settings"), each one failing if its protection were taken away.

1. API authentication: every URL pattern Django knows (walked from the resolver, so a new endpoint is
   covered the day it is added), every method its view allows, answers 401 without a token, with a bad
   token and with an inactive user's token, and writes nothing; the public set is exactly health,
   schema and docs.
2. The Django admin needs staff and permissions, for every registered model.
3. Flower needs its basic auth in both setups (docker compose, Procfile/`make run`), checked by running
   the real command lines, and a real Flower refuses a request without it.
4. Settings: DEBUG off by default; no SECRET_KEY, or a known insecure one, and the process refuses to
   start; a 404 with DEBUG off shows no debug page.
5. The LLM endpoint guard decides on resolved addresses (host names included), not on the URL's text.
6. An API token never reaches a log record or any stored field but DRF's own token table. (LLM prompt
   and response text: tests/integration/test_llm_guard.py, which dumps every table and log.)
"""

from __future__ import annotations

import base64
import logging
import os
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from django.apps import apps
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import URLResolver, get_resolver, reverse
from django.utils.regex_helper import normalize
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from orchestrator import llm
from orchestrator.models import Directive, Job, Run
from schedules import services
from schedules.models import Calendar, Schedule, ScheduledRun
from tests.scheduler_support import free_port
from tests.support import dump_all_tables, process_env, rendered_logs, wait_for

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable

# The only endpoints anyone may call without credentials (docs/ARCHITECTURE.md, "API conventions"). Keep this
# list short on purpose.
PUBLIC = frozenset({"health", "schema", "docs"})
METHODS = ("get", "post", "put", "patch", "delete")


# --- 1. every endpoint needs credentials ----------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    name: str | None
    namespaces: tuple[str, ...]
    regex: str
    callback: Callable

    @property
    def methods(self) -> list[str]:
        """The HTTP methods the view answers: a viewset's action map, else the handlers it defines."""
        actions = getattr(self.callback, "actions", None)
        if actions:
            return [method for method in METHODS if method in actions]
        view_class = getattr(self.callback, "cls", None) or getattr(self.callback, "view_class", None)
        if view_class is None:  # a plain function view: it may answer anything
            return list(METHODS)
        return [method for method in METHODS if hasattr(view_class, method)]

    def path(self, values: dict[str, str]) -> str:
        """A concrete path: the pattern with each parameter replaced by an existing object's id."""
        template, params = normalize(self.regex)[0]
        resource = template.split("/")[1] if template.startswith("api/") else ""
        return "/" + template % {name: values.get(resource, "1") for name in params}


def endpoints() -> Iterator[Endpoint]:
    def walk(patterns, prefix: str, namespaces: tuple[str, ...]) -> Iterator[Endpoint]:
        for pattern in patterns:
            regex = pattern.pattern.regex.pattern
            full = prefix + (regex[1:] if prefix and regex.startswith("^") else regex)
            if isinstance(pattern, URLResolver):
                inner = (*namespaces, pattern.namespace) if pattern.namespace else namespaces
                yield from walk(pattern.url_patterns, full, inner)
            else:
                yield Endpoint(pattern.name, namespaces, full, pattern.callback)

    yield from walk(get_resolver().url_patterns, "", ())


def api_endpoints() -> list[Endpoint]:
    """Everything but the admin and the dashboard, which have their own (session) login: section 2
    below, and tests/integration/test_viewers.py."""
    return [
        endpoint
        for endpoint in endpoints()
        if "admin" not in endpoint.namespaces and "dashboard" not in endpoint.namespaces
    ]


def protected_endpoints() -> list[Endpoint]:
    return [endpoint for endpoint in api_endpoints() if endpoint.name not in PUBLIC]


@pytest.fixture
def path_values(user) -> dict[str, str]:
    """Existing objects for the path parameters, by the resource the path names after /api/."""
    job = Job.objects.get(key="log_triage")
    schedule = services.create_schedule(
        name="sec-every-10", job=job, schedule_type="interval", interval_minutes=10
    )
    run = Run.objects.create(job=job)
    ScheduledRun.objects.create(schedule=schedule, trigger="manual", scheduled_for=schedule.next_run_at)
    directive = Directive.objects.create(key="sec", name="Sec", text="Look at SSH.", job=job)
    calendar = Calendar.objects.create(name="sec-weekends", rules=[{"weekdays": ["sat", "sun"]}])
    return {
        "schedules": str(schedule.pk),
        "calendars": str(calendar.pk),
        "runs": str(run.pk),
        "directives": str(directive.pk),
        "jobs": job.key,
    }


def row_counts() -> dict[str, int]:
    return {model._meta.label: model.objects.count() for model in apps.get_models()}


def call(client: APIClient, method: str, path: str):
    if method in ("post", "put", "patch"):
        return getattr(client, method)(path, {"name": "x", "enabled": False}, format="json")
    return getattr(client, method)(path)


def credentials_refused(client: APIClient, values: dict[str, str]) -> list[str]:
    """Every protected endpoint and method through `client`; the ones that did not answer 401."""
    wrong = []
    for endpoint in protected_endpoints():
        path = endpoint.path(values)
        for method in endpoint.methods:
            response = call(client, method, path)
            if response.status_code != 401 or not response.get("WWW-Authenticate", "").startswith("Token"):
                wrong.append(f"{method.upper()} {path} -> {response.status_code}")
    return wrong


def test_the_walk_finds_every_documented_endpoint_with_its_methods():
    found = {endpoint.name: endpoint for endpoint in api_endpoints()}
    documented = {
        "schedule-list": ["get", "post"],
        "schedule-detail": ["get", "put", "patch", "delete"],
        "schedule-run-now": ["post"],
        "schedule-enable": ["post"],
        "schedule-disable": ["post"],
        "schedule-history": ["get"],
        "job-list": ["get"],
        "job-detail": ["get", "put", "patch"],
        "directive-list": ["get", "post"],
        "directive-detail": ["get", "put", "patch", "delete"],
        "run-list": ["get", "post"],
        "run-detail": ["get"],
        "run-findings": ["get"],
    }
    for name, methods in documented.items():
        assert name in found, f"{name} not found by the resolver walk"
        assert found[name].methods == methods, name


@pytest.mark.django_db
def test_the_public_allowlist_is_exactly_health_schema_and_docs(anon):
    assert frozenset({"health", "schema", "docs"}) == PUBLIC
    names = {endpoint.name for endpoint in api_endpoints()}
    assert names >= PUBLIC, "an allowlisted endpoint no longer exists"
    for name in sorted(PUBLIC):
        path = reverse(name)
        if name == "health":
            # Needs the database and Redis; 200 or 503, never a login.
            assert anon.get(path).status_code in (200, 503)
        else:
            assert anon.get(path).status_code == 200, path
        for method in ("post", "put", "patch", "delete"):
            assert call(anon, method, path).status_code in (401, 403, 405), f"{method} {path}"


@pytest.mark.django_db
def test_every_other_endpoint_and_method_answers_401_without_credentials(anon, path_values, redis_client):
    before = row_counts()
    assert len(protected_endpoints()) >= 13

    wrong = credentials_refused(anon, path_values)

    assert not wrong, "answered without credentials:\n" + "\n".join(wrong)
    assert row_counts() == before, "an unauthenticated request wrote to the database"
    assert redis_client.dbsize() == 0, "an unauthenticated request queued something"


@pytest.mark.django_db
def test_an_invalid_token_or_an_inactive_users_token_answers_401(path_values, user, django_user_model):
    before = row_counts()
    forged = APIClient()
    forged.credentials(HTTP_AUTHORIZATION=f"Token {secrets.token_hex(20)}")
    assert not credentials_refused(forged, path_values)
    assert row_counts() == before

    former = django_user_model.objects.create_user(username="former", password="pw-former-123")
    token = Token.objects.create(user=former)
    former.is_active = False
    former.save()
    inactive = APIClient()
    inactive.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    before = row_counts()
    assert not credentials_refused(inactive, path_values)
    assert row_counts() == before


@pytest.mark.django_db
def test_the_same_paths_answer_with_a_valid_token(api, path_values):
    """The 401s above come from authentication, not from a path that does not route."""
    for endpoint in protected_endpoints():
        if "get" in endpoint.methods:
            path = endpoint.path(path_values)
            assert api.get(path).status_code == 200, path


# --- 2. the admin needs staff -----------------------------------------------------------------------------


def changelists() -> list[str]:
    return [
        reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        for model in admin.site._registry
    ]


def test_the_admin_registry_holds_the_app_models():
    assert {Job, Directive, Run, Schedule, ScheduledRun} <= set(admin.site._registry)


@pytest.mark.django_db
def test_admin_anonymous_and_non_staff_are_sent_to_the_login(django_user_model):
    member = Client()
    member.force_login(django_user_model.objects.create_user(username="pleb", password="pw-pleb-123"))
    for client in (Client(), member):
        for url in ["/admin/", *changelists()]:
            response = client.get(url)
            assert response.status_code == 302, url
            assert response["Location"].startswith("/admin/login/"), url


@pytest.mark.django_db
def test_admin_staff_needs_permissions_per_model(django_user_model):
    user = django_user_model.objects.create_user(username="ops", password="pw-ops-123", is_staff=True)
    client = Client()
    client.force_login(user)
    for url in changelists():
        assert client.get(url).status_code == 403, url

    user.user_permissions.set(Permission.objects.all())
    client.force_login(django_user_model.objects.get(pk=user.pk))  # fresh permission cache
    for url in changelists():
        assert client.get(url).status_code == 200, url


# --- 3. Flower needs basic auth -----------------------------------------------------------------------


def compose_flower_script() -> str:
    """The flower service's `sh -c` script as the container's shell sees it ($$ is compose's escape)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    argv = shlex.split(compose["services"]["flower"]["command"])
    assert argv[:2] == ["sh", "-c"], argv
    return argv[2].replace("$$", "$")


def procfile_flower_command() -> str:
    lines = dict(
        re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line).groups()
        for line in (ROOT / "Procfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return lines["flower"]


def run_clean(argv: list[str], cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """`argv` with nothing in its environment but PATH and `env`, and no local env file: a `make run`
    before the tests writes .run/local.env (project/env.py), which would give it a SECRET_KEY."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CB_LOCAL_ENV_FILE": "", **env}
    return subprocess.run(argv, cwd=cwd, env=clean, capture_output=True, text=True, timeout=60, check=False)


def run_sh(script: str, **env: str) -> subprocess.CompletedProcess:
    return run_clean(["sh", "-c", script], **env)


@pytest.mark.parametrize(
    ("source", "celery"),
    [(compose_flower_script, "exec /opt/venv/bin/celery"), (procfile_flower_command, "exec celery")],
)
def test_flower_command_refuses_to_start_without_basic_auth_and_passes_it(source, celery):
    script = source()
    assert celery in script
    stubbed = script.replace(celery, "exec echo celery")  # what would be started, not started

    for unset in ({}, {"FLOWER_BASIC_AUTH": ""}):
        result = run_sh(stubbed, **unset)
        assert result.returncode == 1
        assert "FLOWER_BASIC_AUTH" in result.stderr
        assert "celery" not in result.stdout

    result = run_sh(stubbed, FLOWER_BASIC_AUTH="ops:s3cret")
    assert result.returncode == 0, result.stderr
    assert "flower" in result.stdout
    # Flower reads FLOWER_BASIC_AUTH from its environment: the password is never in its argv (`ps`).
    assert "s3cret" not in result.stdout


def test_run_local_generates_keeps_and_exports_flower_basic_auth(tmp_path):
    """scripts/run_local.sh's own lines: a random user:password, kept 0600 in .run/, exported."""
    text = (ROOT / "scripts" / "run_local.sh").read_text()
    helper = re.search(r"^keep_secret\(\) \{\n.*?^\}\n", text, flags=re.MULTILINE | re.DOTALL)
    block = re.search(
        r'^if \[\[ -z "\$\{FLOWER_BASIC_AUTH:-\}" \]\]; then\n.*?^fi\n', text, flags=re.MULTILINE | re.DOTALL
    )
    assert helper, "run_local.sh no longer has keep_secret()"
    assert block, "run_local.sh no longer has its FLOWER_BASIC_AUTH block"
    script = "\n".join(
        [
            "set -euo pipefail",
            "RUN_DIR=.run",
            "mkdir -p .run",
            helper.group(0),
            block.group(0),
            "sh -c 'echo $FLOWER_BASIC_AUTH'",
        ]
    )

    def run(**env: str) -> str:
        path = f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        result = run_clean(["bash", "-c", script], cwd=tmp_path, **{"PATH": path, **env})
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()  # as a child process sees it: exported

    first = run()
    user, _, password = first.partition(":")
    assert user == "admin"
    assert len(password) >= 16
    kept = tmp_path / ".run" / "flower_basic_auth"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert run() == first  # kept between runs
    assert run(FLOWER_BASIC_AUTH="ops:given") == "ops:given"  # the environment's wins


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
@pytest.mark.django_db
def test_a_real_flower_from_the_procfile_refuses_requests_without_its_basic_auth():
    port = free_port()
    auth = f"ops:{secrets.token_urlsafe(12)}"
    env = process_env(
        FLOWER_BASIC_AUTH=auth,
        FLOWER_ADDRESS="127.0.0.1",
        FLOWER_PORT=str(port),
        FLOWER_WAIT_FOR_WORKER_SECONDS="0",  # no worker in this test
        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    )
    proc = subprocess.Popen(
        ["sh", "-c", procfile_flower_command()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None, f"flower exited: {proc.stderr.read().decode()[-2000:]}"
        try:
            return http_status(url) > 0
        except OSError:
            return False

    try:
        wait_for(up, timeout=60, interval=0.2, what="flower listening")
        assert http_status(url) == 401
        assert http_status(url, "ops:wrong-password") == 401
        assert http_status(url + "api/workers") == 401
        assert http_status(url, auth) == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        proc.stderr.close()


# --- 4. settings: DEBUG off, a real SECRET_KEY, no debug pages -----------------------------------------

REAL_KEY = "k" + secrets.token_urlsafe(50)
SHOW = "import django; django.setup(); from django.conf import settings; print('DEBUG', settings.DEBUG)"
NOT_FOUND = (
    "import django; django.setup(); from django.test import Client; "
    "response = Client().get('/api/no-such-endpoint/', HTTP_HOST='localhost'); "
    "print(response.status_code); print(response.content.decode())"
)


def settings_process(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with nothing in its environment but PATH, project.settings and `env`."""
    return run_clean([PYTHON, "-c", code], DJANGO_SETTINGS_MODULE="project.settings", **env)


def env_example_secret_key() -> str:
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.startswith("SECRET_KEY="):
            return line.split("=", 1)[1]
    raise AssertionError(".env.example has no SECRET_KEY line")


def test_no_secret_key_and_no_debug_refuses_to_start():
    result = settings_process(SHOW)
    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set" in result.stderr


@pytest.mark.parametrize(
    "key",
    [
        "",
        "   ",
        env_example_secret_key(),
        "insecure-development-key-do-not-use-in-production",
        "django-insecure-" + "x" * 50,
        "change-me",
        "CHANGEME",
    ],
)
def test_a_known_insecure_secret_key_with_debug_off_refuses_to_start(key):
    result = settings_process(SHOW, SECRET_KEY=key)
    assert result.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY" in result.stderr
    assert "DEBUG" not in result.stdout


def test_debug_is_off_by_default_and_on_only_when_asked():
    assert settings_process(SHOW, SECRET_KEY=REAL_KEY).stdout.split() == ["DEBUG", "False"]
    for value in ("0", "false", "off", ""):
        assert settings_process(SHOW, SECRET_KEY=REAL_KEY, DEBUG=value).stdout.split() == ["DEBUG", "False"]
    assert settings_process(SHOW, DEBUG="1").stdout.split() == ["DEBUG", "True"]  # dev key stands in
    assert settings_process(SHOW, SECRET_KEY=REAL_KEY, DEBUG="maybe").returncode != 0


def test_check_deploy_finds_no_debug_and_no_weak_key_with_a_real_key():
    """Django's own deployment checks. The TLS ones (HSTS, SSL redirect, secure cookies: W004, W008,
    W012, W016) are left to whoever puts TLS in front; DEBUG (W018) and the key (W009) are ours."""
    argv = [PYTHON, "manage.py", "check", "--deploy"]
    found = run_clean(argv, DJANGO_SETTINGS_MODULE="project.settings", SECRET_KEY=REAL_KEY)
    assert "security.W018" not in found.stdout + found.stderr
    assert "security.W009" not in found.stdout + found.stderr
    assert "security.W004" in found.stdout + found.stderr  # the checks did run

    debug = run_clean(argv, DJANGO_SETTINGS_MODULE="project.settings", SECRET_KEY=REAL_KEY, DEBUG="1")
    assert "security.W018" in debug.stdout + debug.stderr


def test_a_404_with_debug_off_shows_no_debug_page():
    result = settings_process(NOT_FOUND, SECRET_KEY=REAL_KEY)
    assert result.returncode == 0, result.stderr
    status, body = result.stdout.split("\n", 1)
    assert status == "404"
    for leak in ("Django tried these URL patterns", "URLconf", "DEBUG = True", "api/schedules", "Traceback"):
        assert leak not in body

    # The same request with DEBUG on does show the debug page: the check above can see a leak.
    debug = settings_process(NOT_FOUND, SECRET_KEY=REAL_KEY, DEBUG="1")
    assert "Django tried these URL patterns" in debug.stdout


# --- 5. the LLM endpoint guard decides on resolved addresses --------------------------------------------

PUBLIC_IP = "93.184.216.34"


@pytest.fixture
def fake_dns(monkeypatch) -> dict[str, list[str]]:
    """socket.getaddrinfo answering from a table: host names without any real DNS."""
    table: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            return real(host, port, *args, **kwargs)
        infos = []
        for address in table[host]:
            if ":" in address:
                infos.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return infos

    monkeypatch.setattr(llm.socket, "getaddrinfo", getaddrinfo)
    return table


def test_guard_refuses_a_host_name_that_resolves_to_a_public_address(fake_dns):
    fake_dns["llm.example.test"] = [PUBLIC_IP]
    with pytest.raises(
        llm.LLMRefused, match=rf"llm\.example\.test resolves to non-local address {PUBLIC_IP}"
    ):
        llm.resolve_endpoint("http://llm.example.test:8080/v1")


@pytest.mark.parametrize(
    "addresses",
    [["10.0.0.5", PUBLIC_IP], [PUBLIC_IP, "10.0.0.5"], ["127.0.0.1", "2606:2800:220:1::1"]],
)
def test_guard_refuses_a_host_name_that_resolves_to_private_and_public_addresses(fake_dns, addresses):
    fake_dns["mixed.example.test"] = addresses
    with pytest.raises(llm.LLMRefused, match="non-local address"):
        llm.resolve_endpoint("http://mixed.example.test/v1")


@pytest.mark.parametrize(
    "addresses", [["127.0.0.1"], ["192.168.1.7", "10.0.0.2"], ["fe80::1%eth0"], ["169.254.3.4", "::1"]]
)
def test_guard_accepts_a_host_name_that_resolves_only_to_local_addresses(fake_dns, addresses):
    fake_dns["llm.lan"] = addresses
    endpoint = llm.resolve_endpoint("http://llm.lan:11434/v1")
    assert endpoint.address in addresses  # the connection goes to a vetted address, not a new lookup
    assert endpoint.host == "llm.lan"


def test_guard_accepts_a_public_host_named_in_llm_allowed_hosts_and_only_that_one(fake_dns):
    fake_dns["llm.example.test"] = [PUBLIC_IP]
    fake_dns["other.example.test"] = [PUBLIC_IP]
    endpoint = llm.resolve_endpoint("https://LLM.example.test/v1", allowed_hosts=["llm.EXAMPLE.test"])
    assert (endpoint.host, endpoint.address, endpoint.port) == ("llm.example.test", PUBLIC_IP, 443)
    with pytest.raises(llm.LLMRefused):
        llm.resolve_endpoint("https://other.example.test/v1", allowed_hosts=["llm.example.test"])
    with pytest.raises(llm.LLMRefused):  # allowing an address by name does not allow the name
        llm.resolve_endpoint("https://llm.example.test/v1", allowed_hosts=[PUBLIC_IP])


@pytest.mark.parametrize(
    "url",
    [
        "http://134744072/v1",  # 8.8.8.8 written as one number
        "http://0x08080808/v1",
        "http://[64:ff9b::808:808]/v1",  # NAT64
        "http://[2002:808:808::1]/v1",  # 6to4
        "http://224.0.0.1/v1",  # multicast
    ],
)
def test_guard_refuses_public_addresses_in_other_spellings(url):
    with pytest.raises(llm.LLMRefused, match="non-local address"):
        llm.resolve_endpoint(url)


# --- 6. an API token is never logged or stored elsewhere ----------------------------------------------


@pytest.mark.django_db
def test_an_api_token_is_never_logged_nor_stored_outside_the_token_table(
    api, user, path_values, caplog, redis_client
):
    caplog.set_level(logging.DEBUG)
    token = Token.objects.get(user=user).key
    schedule = path_values["schedules"]
    assert api.get("/api/schedules/").status_code == 200
    created = api.post(
        "/api/schedules/",
        {"name": "sec-new", "job_key": "log_triage", "schedule_type": "interval", "interval_minutes": 5},
        format="json",
    )
    assert created.status_code == 201
    assert api.patch(f"/api/schedules/{schedule}/", {"max_per_job": 2}, format="json").status_code == 200
    assert api.post(f"/api/schedules/{schedule}/run-now").status_code == 202
    assert api.post("/api/schedules/", {"name": ""}, format="json").status_code == 400
    assert api.get("/api/schedules/999999999/").status_code == 404
    assert api.delete(f"/api/directives/{path_values['directives']}/").status_code == 204
    wrong = secrets.token_hex(20)
    assert APIClient().get("/api/jobs/", HTTP_AUTHORIZATION=f"Token {wrong}").status_code == 401

    logged = caplog.text + rendered_logs(caplog.records)
    assert "Bad Request" in logged  # django.request's warnings were captured: the check can see
    assert "/api/schedules/999999999/" in logged
    assert token not in logged
    assert wrong not in logged

    # DRF's authtoken keeps the key in plain text in authtoken_token.key: the one place it may be, by
    # DRF's design (the lookup is by key). Everything else, every column of every table, must not hold it.
    assert token in dump_all_tables()
    assert token not in dump_all_tables(exclude=[("authtoken_token", "key")])
