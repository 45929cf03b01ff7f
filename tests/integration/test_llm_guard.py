"""The LLM step of log_triage and its guardrails (docs/ARCHITECTURE.md, "Guardrails"), against a real HTTP
server on 127.0.0.1.

- Only scores and counters are stored: after a scored run, no table, log line or task result holds any
  of the prompt or response text.
- The endpoint guard refuses non-local addresses before connecting (literal public IPs: no DNS, no
  traffic), and a run configured with one fails with a clear error.
- An unreachable or redirecting endpoint degrades the run to rule-only triage with a note.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from orchestrator import llm
from orchestrator.jobs.log_triage.scoring import parse_scores
from orchestrator.models import Finding, Job, LogCursor, Run
from orchestrator.services import OrchestratorService, TaskFailed
from orchestrator.template import stop_task_template
from tests.support import dump_all_tables, rendered_logs

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "logs"
RESPONSE_MARKER = "RESPONSE-TEXT-5b9e1f: the brute force against root is the priority"
DIRECTIVE = "Score as a SOC analyst for a small web shop. DIRECTIVE-c41d"


class FakeLLM:
    """An OpenAI-compatible /v1/chat/completions that scores finding id % 11 and records requests."""

    def __init__(self, mode: str = "score") -> None:
        self.mode = mode
        self.requests: list[dict] = []
        self.responses: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body})
                if fake.mode == "redirect":
                    self.send_response(307)
                    self.send_header("Location", "http://8.8.8.8/v1/chat/completions")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                ids = [row["id"] for row in json.loads(body["messages"][1]["content"])["findings"]]
                content = json.dumps(
                    {"scores": [{"id": i, "score": i % 11} for i in ids], "rationale": RESPONSE_MARKER}
                )
                fake.responses.append(content)
                payload = json.dumps(
                    {
                        "id": "chatcmpl-1",
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 100 + len(ids), "completion_tokens": 7},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:  # keep the test output free of request lines
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeLLM:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def dirs(tmp_path, settings):
    shutil.copytree(SAMPLES, tmp_path / "logs")
    (tmp_path / "uploads").mkdir()
    settings.CYBER_BRAIN_LOGS = tmp_path / "logs"
    settings.UPLOADS_DIR = tmp_path / "uploads"
    settings.LLM_ALLOWED_HOSTS = []
    settings.LLM_MODEL = "local-test"
    return tmp_path


def launch() -> Run:
    return OrchestratorService.launch(
        job=Job.objects.get(key="log_triage"), custom_directive_text=DIRECTIVE, task3_scope="all"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_scores_are_stored_and_no_prompt_or_response_text_is(dirs, settings, caplog, capfd):
    settings.LOG_TRIAGE_LLM_BATCH = 8
    caplog.set_level("DEBUG")
    # The task processes write to their template's stderr: one started by an earlier test would write
    # to that test's capture, not to capfd's.
    stop_task_template()
    with FakeLLM() as fake:
        settings.LLM_ENDPOINT = fake.url
        run = launch()
        stats = OrchestratorService.execute(run)

    run.refresh_from_db()
    assert len(fake.requests) == 3  # 19 findings in batches of 8
    assert fake.requests[0]["path"] == "/v1/chat/completions"
    assert fake.requests[0]["body"]["model"] == "local-test"
    assert run.llm_calls == 3
    assert stats["llm"]["calls"] == 3
    assert run.llm_prompt_tokens == 3 * 100 + 19
    assert run.llm_completion_tokens == 3 * 7
    assert stats["tasks"]["triage"]["llm_scored"] == 19
    scores = dict(Finding.objects.filter(run=run).values_list("id", "risk_score"))
    assert scores == {finding_id: finding_id % 11 for finding_id in scores}

    texts = [RESPONSE_MARKER, *fake.responses]
    for request in fake.requests:
        texts += [message["content"] for message in request["body"]["messages"]]
    texts.append("You rate findings of an automated security log triage")
    out, err = capfd.readouterr()
    places = {
        "database": dump_all_tables(),
        "logs": caplog.text + rendered_logs(caplog.records) + out + err,
        "results": json.dumps(stats) + json.dumps(run.stats),
        "report": Path(run.report_path).read_text() + Path(run.report_path).with_suffix(".json").read_text(),
    }
    assert DIRECTIVE in places["database"]  # the run's own directive is stored, by design
    for place, content in places.items():
        for text in texts:
            assert text not in content, f"LLM text found in {place}"
    assert "llm scoring done" in places["logs"]  # the logs were captured, children's included


@pytest.mark.django_db(transaction=True)
def test_public_endpoint_fails_the_run_with_a_clear_error_before_storing_anything(dirs, settings):
    settings.LLM_ENDPOINT = "http://8.8.8.8:8080/v1"

    with pytest.raises(TaskFailed) as info:
        OrchestratorService.execute(launch())

    assert str(info.value).startswith("task triage failed: LLM endpoint refused:")
    assert "8.8.8.8" in str(info.value)
    assert "LLM_ALLOWED_HOSTS" in str(info.value)
    assert len(str(info.value)) <= 500
    # Nothing was triaged, so nothing is lost: the cursors did not move.
    assert Finding.objects.count() == 0
    assert LogCursor.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_unreachable_endpoint_degrades_to_rule_only_triage(dirs, settings):
    settings.LLM_ENDPOINT = f"http://127.0.0.1:{free_port()}/v1"
    run = launch()

    stats = OrchestratorService.execute(run)

    run.refresh_from_db()
    assert "llm_unavailable" in stats["notes"]
    assert run.llm_calls == 0
    assert Finding.objects.filter(run=run).count() == 19
    assert not Finding.objects.filter(run=run, risk_score__isnull=False).exists()


@pytest.mark.django_db(transaction=True)
def test_redirect_is_not_followed(dirs, settings):
    with FakeLLM(mode="redirect") as fake:
        settings.LLM_ENDPOINT = fake.url
        run = launch()
        stats = OrchestratorService.execute(run)

    assert len(fake.requests) == 1
    assert "llm_unavailable" in stats["notes"]
    assert Finding.objects.filter(run=run).count() == 19


# --- the guard itself: no database, no traffic ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/v1",
        "https://1.1.1.1:8443/v1",
        "http://[2001:4860:4860::8888]/v1",
        "http://[::ffff:8.8.8.8]/v1",
        "http://0.0.0.0:8080/v1",
        "http://100.64.0.1/v1",
    ],
)
def test_guard_refuses_non_local_addresses(url):
    with pytest.raises(llm.LLMRefused, match="non-local address"):
        llm.resolve_endpoint(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/v1",
        "http://localhost:11434/v1",
        "http://10.1.2.3/v1",
        "http://172.16.0.9/v1",
        "http://192.168.1.20:8000",
        "http://169.254.10.10/v1",
        "http://[::1]:8080/v1",
        "http://[fd00::5]/v1",
    ],
)
def test_guard_allows_loopback_private_and_link_local(url):
    endpoint = llm.resolve_endpoint(url)
    assert endpoint.path.endswith("/chat/completions")


def test_guard_allows_a_public_host_named_in_llm_allowed_hosts():
    endpoint = llm.resolve_endpoint("https://8.8.8.8/v1", allowed_hosts=["8.8.8.8"])
    assert endpoint.address == "8.8.8.8"
    assert endpoint.port == 443


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/v1", "file:///etc/passwd", "http://user:pw@127.0.0.1/v1"])
def test_guard_refuses_other_schemes_and_credentials(url):
    with pytest.raises(llm.LLMRefused):
        llm.resolve_endpoint(url)


def test_parse_scores_keeps_only_asked_ids_and_clamps():
    content = 'Sure! {"scores": [{"id": 1, "score": 7}, {"id": 2, "score": 14}, {"id": 9, "score": 3}]}'
    assert parse_scores(content, {1, 2}) == {1: 7, 2: 10}
    assert parse_scores("no json here", {1}) == {}
