"""Alert webhooks cannot be turned against the network they run in (issue 31.3).

A webhook URL may reach public addresses only, unless its host is in ALERT_WEBHOOK_ALLOWED_HOSTS:
checked when it is saved (API, admin, sync_schedules, the ALERT_WEBHOOK_URLS setting at startup) and
again when an alert is sent, connecting to the address that was checked. No redirect is followed; the
time and the answer are bounded; the answer is never shown or logged.

The listeners are real HTTP servers on 127.0.0.1. Host names answer from a table that replaces
`socket.getaddrinfo` (the resolver project/outbound.py calls): the checks and connections are the real
code, only the DNS answers are ours.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError

from monitoring import alerts
from orchestrator.models import Job
from project import outbound
from schedules import services
from schedules.models import Alert, Schedule
from tests.support import admin_schedule_form, process_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cr3t-T0KEN-in-the-path"
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
PUBLIC_IP = "8.8.8.8"
BODY = {
    "name": "guarded",
    "job_key": "log_triage",
    "schedule_type": "interval",
    "interval_minutes": 10,
    "timezone": "UTC",
}


class Listener:
    """A real HTTP server on 127.0.0.1 that records each request and answers `status` (+ headers, body)."""

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self.requests: list[dict] = []
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                listener.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "host": self.headers.get("Host"),
                        "body": self.rfile.read(length) if length else b"",
                    }
                )
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = answer

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listen():
    made: list[Listener] = []

    def make(**kwargs) -> Listener:
        made.append(Listener(**kwargs))
        return made[-1]

    yield make
    for listener in made:
        listener.close()


class RawListener:
    """A TCP server on 127.0.0.1 whose one connection is served by `serve(conn)` (a misbehaving
    webhook: one that drips its answer, one that never ends its headers)."""

    def __init__(self, serve) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/{TOKEN}"
        self.sent = 0
        self.done = threading.Event()

        def run() -> None:
            conn, _ = self.sock.accept()
            try:
                conn.recv(65536)
                serve(self, conn)
            except OSError:
                pass  # the client shut the connection: what we wait for
            finally:
                conn.close()
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)


@pytest.fixture
def dns(monkeypatch):
    """Host names answered from `dns.table` (a list of addresses, or a function of the lookup count);
    `dns.lookups[host]` counts the lookups. Other names go to the real resolver."""

    class Dns:
        table: dict = {}
        lookups: dict[str, int] = {}

    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in Dns.table:
            return real(host, port, *args, **kwargs)
        Dns.lookups[host] = Dns.lookups.get(host, 0) + 1
        answer = Dns.table[host]
        addresses = answer(Dns.lookups[host]) if callable(answer) else answer
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0))
            if ":" in a
            else (socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    Dns.table, Dns.lookups = {}, {}
    monkeypatch.setattr(outbound.socket, "getaddrinfo", getaddrinfo)
    return Dns


@pytest.fixture(autouse=True)
def no_allowed_hosts(settings):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = []
    settings.ALERT_WEBHOOK_URLS = []
    settings.ALERT_WEBHOOK_TIMEOUT_SECONDS = 2


# --- at save time: the API, the admin, sync_schedules, the setting ---------------------------------------


@pytest.mark.django_db
def test_api__the_metadata_address_is_400_naming_the_field_and_nothing_written(api):
    response = api.post("/api/schedules/", {**BODY, "alert_webhook_url": METADATA}, format="json")
    assert response.status_code == 400, response.content
    message = " ".join(response.json()["alert_webhook_url"])
    assert "169.254.169.254" in message
    assert "ALERT_WEBHOOK_ALLOWED_HOSTS" in message
    assert "security-credentials" not in message, "the URL's path is not echoed"
    assert not Schedule.objects.filter(name=BODY["name"]).exists()

    created = api.post("/api/schedules/", BODY, format="json")
    assert created.status_code == 201, created.content
    pk = created.json()["id"]
    response = api.patch(f"/api/schedules/{pk}/", {"alert_webhook_url": METADATA}, format="json")
    assert response.status_code == 400, response.content
    assert "alert_webhook_url" in response.json()
    assert Schedule.objects.get(pk=pk).alert_webhook_url == ""


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "answer"),
    [
        ("http://127.0.0.1:8000/hook", None),
        ("http://[::1]/hook", None),
        ("http://10.0.0.7/hook", None),
        ("https://100.64.1.1/hook", None),
        ("http://0.0.0.0:5432/", None),
        ("http://[::ffff:169.254.169.254]/latest", None),
        ("http://intranet.example.test/hook", ["192.168.1.20"]),
        # Every address the name resolves to: one private among public ones is enough.
        ("https://mixed.example.test/hook", [PUBLIC_IP, "10.9.8.7"]),
        ("ftp://files.example.test/hook", [PUBLIC_IP]),
    ],
)
def test_api__internal_destinations_and_other_schemes_are_400(api, dns, url, answer):
    if answer:
        dns.table[url.split("/")[2]] = answer
    response = api.post("/api/schedules/", {**BODY, "alert_webhook_url": url}, format="json")
    assert response.status_code == 400, response.content
    assert "alert_webhook_url" in response.json()
    assert not Schedule.objects.filter(name=BODY["name"]).exists()


@pytest.mark.django_db
def test_api__a_public_name_and_an_allowed_internal_host_are_accepted(api, dns, settings):
    dns.table["hooks.example.test"] = [PUBLIC_IP, "2606:4700:4700::1111"]
    response = api.post(
        "/api/schedules/", {**BODY, "alert_webhook_url": "https://hooks.example.test/x"}, format="json"
    )
    assert response.status_code == 201, response.content

    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    response = api.post(
        "/api/schedules/",
        {**BODY, "name": "allowed", "alert_webhook_url": "http://127.0.0.1:9/x"},
        format="json",
    )
    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_admin__refuses_the_metadata_address(staff):
    response = staff.post(
        "/admin/schedules/schedule/add/",
        admin_schedule_form(name="admin-guarded", alert_webhook_url=METADATA),
    )
    assert response.status_code == 200  # the form again, with the error
    assert "169.254.169.254" in response.content.decode()
    assert not Schedule.objects.filter(name="admin-guarded").exists()


@pytest.mark.django_db
def test_admin__the_webhook_is_masked_and_other_edits_keep_it(staff, dns):
    dns.table["hooks.example.test"] = [PUBLIC_IP]
    hook = f"https://hooks.example.test/services/{TOKEN}"
    response = staff.post(
        "/admin/schedules/schedule/add/", admin_schedule_form(name="admin-guarded", alert_webhook_url=hook)
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule = Schedule.objects.get(name="admin-guarded")
    assert schedule.alert_webhook_url == hook
    change = f"/admin/schedules/schedule/{schedule.pk}/change/"

    page = staff.get(change).content.decode()
    assert TOKEN not in page, "the stored URL never reaches the browser"
    assert 'type="password"' in page
    assert "(set)" in page

    # Another field edited, the webhook left blank: kept.
    response = staff.post(change, admin_schedule_form(name="admin-guarded", interval_minutes="20"))
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule.refresh_from_db()
    assert (schedule.interval_minutes, schedule.alert_webhook_url) == (20, hook)

    # A new one typed: replaced (and checked).
    response = staff.post(
        change, admin_schedule_form(name="admin-guarded", interval_minutes="20", alert_webhook_url=METADATA)
    )
    assert response.status_code == 200
    schedule.refresh_from_db()
    assert schedule.alert_webhook_url == hook
    other = "https://hooks.example.test/other"
    response = staff.post(
        change, admin_schedule_form(name="admin-guarded", interval_minutes="20", alert_webhook_url=other)
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule.refresh_from_db()
    assert schedule.alert_webhook_url == other

    # Removed with the checkbox.
    response = staff.post(
        change, admin_schedule_form(name="admin-guarded", interval_minutes="20", alert_webhook_clear="on")
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    schedule.refresh_from_db()
    assert schedule.alert_webhook_url == ""


@pytest.mark.django_db
def test_admin__a_managed_schedules_webhook_is_masked_too(staff, dns):
    dns.table["hooks.example.test"] = [PUBLIC_IP]
    schedule = services.create_schedule(
        name="managed-hook",
        job=Job.objects.get(key="log_triage"),
        schedule_type="interval",
        interval_minutes=10,
        alert_webhook_url=f"https://hooks.example.test/{TOKEN}",
        managed=True,
    )
    page = staff.get(f"/admin/schedules/schedule/{schedule.pk}/change/").content.decode()
    assert TOKEN not in page
    assert "(set)" in page


@pytest.mark.django_db
def test_sync_schedules__refuses_the_metadata_address(tmp_path):
    path = tmp_path / "schedules.toml"
    path.write_text(
        '[[schedules]]\nname = "synced"\njob_key = "log_triage"\nschedule_type = "interval"\n'
        f'interval_minutes = 10\nalert_webhook_url = "{METADATA}"\n'
    )
    with pytest.raises(CommandError, match=r"alert_webhook_url: Refused: 169\.254\.169\.254 resolves"):
        call_command("sync_schedules", str(path))
    assert not Schedule.objects.filter(name="synced").exists()


def test_setting__manage_py_check_refuses_internal_alert_webhook_urls(settings, dns):
    settings.ALERT_WEBHOOK_URLS = [METADATA]
    with pytest.raises(SystemCheckError, match=r"monitoring\.E001"):
        call_command("check")
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["169.254.169.254"]
    call_command("check")
    dns.table["hooks.example.test"] = [PUBLIC_IP]
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = []
    settings.ALERT_WEBHOOK_URLS = ["https://hooks.example.test/x"]
    call_command("check")


@pytest.mark.django_db
def test_setting__the_scheduler_does_not_start_with_an_internal_webhook():
    done = subprocess.run(
        [sys.executable, "manage.py", "run_scheduler", "--interval", "1"],
        cwd=ROOT,
        env=process_env(
            ALERT_WEBHOOK_URLS=f"http://127.0.0.1:9/hooks/{TOKEN}", ALERT_WEBHOOK_ALLOWED_HOSTS=""
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "monitoring.E001" in done.stderr
    assert "127.0.0.1" in done.stderr
    assert TOKEN not in done.stderr + done.stdout


# --- at send time -----------------------------------------------------------------------------------------


def test_send__a_loopback_listener_is_never_called_unless_allowed(listen, settings):
    listener = listen()
    with pytest.raises(outbound.Refused, match=r"127\.0\.0\.1 resolves to 127\.0\.0\.1"):
        alerts.post_json(listener.url, {"text": "hi"})
    assert listener.requests == []

    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    alerts.post_json(listener.url, {"text": "hi"})
    assert len(listener.requests) == 1
    request = listener.requests[0]
    assert (request["method"], request["path"]) == ("POST", f"/hooks/{TOKEN}")
    assert request["host"] == f"127.0.0.1:{listener.port}"
    assert json.loads(request["body"]) == {"text": "hi"}


@pytest.mark.django_db(transaction=True)
def test_send__a_name_that_resolved_public_at_save_and_private_at_send_is_refused(
    api, dns, listen, settings, caplog
):
    settings.ALERT_RETRY_BASE_SECONDS = 0.01
    settings.ALERT_RETRY_MAX_SECONDS = 0.05
    listener = listen()
    hook = f"http://hooks.example.test:{listener.port}/hooks/{TOKEN}"
    dns.table["hooks.example.test"] = [PUBLIC_IP]
    response = api.post("/api/schedules/", {**BODY, "alert_webhook_url": hook}, format="json")
    assert response.status_code == 201, response.content
    schedule = Schedule.objects.get(pk=response.json()["id"])

    dns.table["hooks.example.test"] = ["127.0.0.1"]  # the DNS changes after the save
    alert = Alert.objects.create(schedule=schedule, kind="missed", details={})
    assert alerts.claim_notifications() == 1
    assert alerts.sender().drain(60)
    alert.refresh_from_db()
    assert alert.notified_open_at is None, "not delivered: the claim was given back"
    assert listener.requests == []
    refused = [r for r in caplog.records if r.getMessage() == "alert webhook failed"]
    assert refused
    assert all("resolves to 127.0.0.1" in r.reason for r in refused)
    assert TOKEN not in caplog.text

    # The same path delivers once the host is allowed: the name resolves (through the same table) to
    # the listener, and the request carries the name as its Host.
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["hooks.example.test"]
    assert alerts.claim_notifications() == 1
    assert alerts.sender().drain(60)
    alert.refresh_from_db()
    assert alert.notified_open_at is not None
    assert len(listener.requests) == 1
    assert listener.requests[0]["host"] == f"hooks.example.test:{listener.port}"
    assert json.loads(listener.requests[0]["body"])["alert"]["schedule"] == "guarded"


def test_send__one_lookup_and_the_connection_goes_to_the_address_checked(listen, dns, settings):
    """DNS rebinding: the first answer is public, every later one the listener on loopback."""
    settings.ALERT_WEBHOOK_TIMEOUT_SECONDS = 0.5
    listener = listen()
    dns.table["rebind.example.test"] = lambda n: [PUBLIC_IP] if n == 1 else ["127.0.0.1"]
    thread, outcome = _in_thread(
        lambda: alerts.post_json(f"http://rebind.example.test:{listener.port}/hooks/{TOKEN}", {"text": "x"})
    )
    thread.join(30)
    # To 8.8.8.8 on the listener's port: refused, unreachable or timed out, whatever this network does.
    assert isinstance(outcome[0], OSError), outcome
    assert dns.lookups["rebind.example.test"] == 1
    assert listener.requests == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_send__redirects_are_not_followed(listen, settings, status):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]  # both listeners could be called
    second = listen()
    first = listen(status=status, headers={"Location": second.url})
    with pytest.raises(alerts.WebhookAnswered) as info:
        alerts.post_json(first.url, {"text": "x"})
    assert info.value.status == status
    assert len(first.requests) == 1
    assert second.requests == []


def _in_thread(func) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(func())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_send__an_answer_dripped_byte_by_byte_is_cut_at_the_timeout(settings):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.ALERT_WEBHOOK_TIMEOUT_SECONDS = 1

    def drip(raw: RawListener, conn: socket.socket) -> None:
        raw.send(conn, b"HTTP/1.1 200 OK\r\nX-Drip: ")
        while True:  # each byte well within the timeout; the whole answer never
            raw.send(conn, b"a")
            time.sleep(0.1)

    raw = RawListener(drip)
    thread, outcome = _in_thread(lambda: alerts.post_json(raw.url, {"text": "x"}))
    thread.join(30)
    assert not thread.is_alive(), "post_json still waiting for a dripped answer after 30 s"
    assert isinstance(outcome[0], TimeoutError), outcome
    wait_for(raw.done.is_set, timeout=10, what="the listener sees the connection shut")


def test_send__an_endless_body_is_not_read(settings):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]

    def flood(raw: RawListener, conn: socket.socket) -> None:
        raw.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        while True:
            raw.send(conn, b"x" * 65536)

    raw = RawListener(flood)
    thread, outcome = _in_thread(lambda: alerts.post_json(raw.url, {"text": "x"}))
    thread.join(30)
    assert not thread.is_alive()
    assert outcome == [None], "a 2xx is a delivery; its body is not read"
    wait_for(raw.done.is_set, timeout=10, what="the listener sees the connection closed")
    assert raw.sent < 64 * 1024 * 1024, raw.sent


def test_send__endless_headers_are_refused(settings):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]

    def headers(raw: RawListener, conn: socket.socket) -> None:
        raw.send(conn, b"HTTP/1.1 200 OK\r\n")
        while True:
            raw.send(conn, b"X-Many: yes\r\n" * 100)

    raw = RawListener(headers)
    thread, outcome = _in_thread(lambda: alerts.post_json(raw.url, {"text": "x"}))
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome[0], Exception), outcome


def test_send__the_answer_is_never_logged(listen, settings, caplog):
    settings.ALERT_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    listener = listen(status=500, headers={"X-Leak": "HEADER-SECRET"}, body=b"BODY-SECRET internal detail")
    failed = alerts.Sender.post_to([listener.url], {"text": "x"}, alert_id=1, attempt=1)
    assert failed == [listener.url]
    assert len(listener.requests) == 1
    records = [r for r in caplog.records if r.getMessage() == "alert webhook failed"]
    assert [(r.host, r.status) for r in records] == [("127.0.0.1", 500)]
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "SECRET" not in logged
    assert TOKEN not in logged
