"""docker-compose.yml, Dockerfile and .env.example: valid, with the processes of docs/ARCHITECTURE.md and the
settings of docs/OPERATIONS.md, as issue 6 asks.

The compose file is validated against the Compose Specification schema vendored in check-jsonschema
(`vendor.compose-spec`), which needs no network; `docker compose config` runs too where the compose
plugin is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("web", "scheduler", "worker", "flower")
DOCUMENTED_SETTINGS = (
    "DATABASE_URL",
    "POSTGRES_DB",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "CYBER_BRAIN_LOGS",
    "UPLOADS_DIR",
    "LLM_ENDPOINT",
    "LLM_MODEL",
    "LLM_ALLOWED_HOSTS",
    "SCHEDULER_MAX_GLOBAL",
    "FLOWER_BASIC_AUTH",
    "ALERT_WEBHOOK_URLS",
    "ALERT_WEBHOOK_ALLOWED_HOSTS",
)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def command_text(service: dict) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else " ".join(command.split())


def test_compose_file__validates_against_the_compose_spec_schema():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file__has_every_process_and_its_backing_services(compose):
    assert set(compose["services"]) >= {"db", "redis", *APP_SERVICES}


def test_compose_file__restarts_every_service_unless_stopped(compose):
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name


def test_compose_file__mounts_no_docker_socket(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    assert "docker.sock" not in text
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume if isinstance(volume, str) else str(volume.get("source", ""))
            assert "docker.sock" not in source, name


def test_compose_file__publishes_the_api_on_9595_and_flower_on_5555(compose):
    def container_ports(service: dict) -> set[str]:
        return {str(port).rsplit(":", 1)[-1] for port in service.get("ports", [])}

    assert container_ports(compose["services"]["web"]) == {"9595"}
    assert container_ports(compose["services"]["flower"]) == {"5555"}
    assert "gunicorn project.wsgi --bind 0.0.0.0:9595" in command_text(compose["services"]["web"])
    assert "--port=5555" in command_text(compose["services"]["flower"])


def test_compose_file__backing_services_have_health_checks_the_app_waits_for(compose):
    services = compose["services"]
    assert services["db"]["image"].startswith("postgres:15")
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("db", "redis", "web"):
        assert services[name].get("healthcheck", {}).get("test"), name
    for name in ("web", "scheduler", "worker"):
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy", name
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_file__web_migrates_then_serves_and_scheduler_has_the_seed_shape(compose):
    web = command_text(compose["services"]["web"])
    assert web.index("manage.py migrate") < web.index("gunicorn")
    scheduler = command_text(compose["services"]["scheduler"])
    assert re.search(
        r"sh -c \"/opt/venv/bin/python manage.py migrate && "
        r"/opt/venv/bin/python manage.py run_scheduler --interval=30\"",
        scheduler,
    ), scheduler
    assert "run_worker" in command_text(compose["services"]["worker"])


def test_compose_file__shell_commands_are_one_line(compose):
    # A more-indented line in a folded (>) block keeps its newline, and `sh -c` would end the command
    # there: the arguments on the next line (e.g. Flower's --basic-auth) would never reach the process.
    for name, service in compose["services"].items():
        command = service.get("command", "")
        if isinstance(command, str):
            assert "\n" not in command.strip(), name


def test_compose_file__flower_requires_basic_auth_and_keeps_it_out_of_argv(compose):
    flower = command_text(compose["services"]["flower"])
    # Flower reads FLOWER_BASIC_AUTH from its environment; on its command line `ps` would show it.
    assert "--basic-auth" not in flower
    assert 'test -n "$${FLOWER_BASIC_AUTH}"' in flower


def test_compose_file__app_services_share_env_logs_and_uploads(compose):
    for name in APP_SERVICES:
        service = compose["services"][name]
        env = service["environment"]
        assert env["CYBER_BRAIN_LOGS"] == "/logs", name
        assert env["UPLOADS_DIR"] == "/uploads", name
        assert env["POSTGRES_HOST"] == "db", name
        assert env["REDIS_URL"].startswith("redis://redis:6379"), name
        assert "${CYBER_BRAIN_LOGS:-./logs}:/logs" in service["volumes"], name
        assert "${UPLOADS_DIR:-./uploads}:/uploads" in service["volumes"], name
        assert service["env_file"] == [{"path": ".env", "required": False}], name


def test_env_example__names_every_design_setting_and_holds_no_secret():
    text = (ROOT / ".env.example").read_text()
    names = dict(
        line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    missing = [name for name in DOCUMENTED_SETTINGS if name not in names and name not in text]
    assert not missing
    assert names["SECRET_KEY"] == ""
    assert names["FLOWER_BASIC_AUTH"] == ""


def test_operations_doc__lists_every_setting_that_settings_py_reads():
    settings_source = (ROOT / "project" / "settings.py").read_text()
    read = set(re.findall(r"env_(?:str|bool|int|list)\(\s*\"([A-Z0-9_]+)\"", settings_source))
    assert read, "no env_* calls found in project/settings.py"
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    undocumented = sorted(name for name in read | set(DOCUMENTED_SETTINGS) if f"`{name}`" not in doc)
    assert not undocumented, f"add these settings to docs/OPERATIONS.md: {undocumented}"


def test_dockerfile__slim_python_311_venv_non_root_and_no_baked_secret():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"python:3\.11(\.\d+)?-slim", text)
    assert "/opt/venv" in text
    assert "requirements/base.txt" in text
    assert "requirements/dev.txt" not in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users, "no USER instruction"
    assert users[-1] not in {"root", "0"}
    assert not re.search(r"^(ENV|ARG)\s+.*SECRET_KEY", text, flags=re.MULTILINE)
    assert "collectstatic" in text
