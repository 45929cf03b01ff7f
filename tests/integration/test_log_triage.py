"""log_triage end to end through OrchestratorService.execute: collect, triage, respond.

Each run's tasks run in child processes against the test database (transaction=True).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from orchestrator.models import Finding, Job, LogCursor, Run
from orchestrator.services import OrchestratorService

pytestmark = pytest.mark.django_db(transaction=True)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "logs"
SAMPLE_LINES = 199

# (rule, subject, count, file) for every finding the samples produce.
EXPECTED = {
    ("ssh_brute_force", "203.0.113.45", 11, "auth.log"),
    ("ssh_brute_force", "198.51.100.23", 6, "auth.log"),
    ("ssh_failed_login", "192.0.2.10", 2, "auth.log"),
    ("ssh_invalid_user", "203.0.113.45", 8, "auth.log"),
    ("sudo_auth_failure", "bob", 3, "auth.log"),
    ("sudo_not_in_sudoers", "mallory", 1, "auth.log"),
    ("http_path_scan", "203.0.113.77", 15, "access.log"),
    ("http_4xx_burst", "198.51.100.88", 25, "access.log"),
    ("http_5xx_burst", "/api/orders", 8, "access.log"),
    ("app_error", "app.payments", 3, "app.log"),
    ("app_error", "app.db", 1, "app.log"),
    ("app_error", "app.api", 1, "app.log"),
    ("app_error", "app.worker", 1, "app.log"),
    ("app_traceback", "KeyError", 2, "app.log"),
    ("app_traceback", "psycopg2.OperationalError", 1, "app.log"),
    ("app_traceback", "ValueError", 1, "app.log"),
    ("app_traceback", "RuntimeError", 1, "app.log"),
    ("oom_kill", "java", 1, "kern.log"),
    ("oom_kill", "python3", 1, "kern.log"),
}


@pytest.fixture
def dirs(tmp_path, settings):
    logs = tmp_path / "logs"
    uploads = tmp_path / "uploads"
    shutil.copytree(SAMPLES, logs)
    uploads.mkdir()
    settings.CYBER_BRAIN_LOGS = logs
    settings.UPLOADS_DIR = uploads
    settings.LLM_ENDPOINT = ""
    return logs, uploads


def triage_run(scope: str = "all") -> tuple[Run, dict]:
    run = OrchestratorService.launch(job=Job.objects.get(key="log_triage"), task3_scope=scope)
    stats = OrchestratorService.execute(run)
    run.refresh_from_db()
    return run, stats


def findings_of(run: Run) -> set[tuple[str, str, int, str]]:
    return {(f.rule, f.subject, f.count, Path(f.source_file).name) for f in run.findings.all()}


def lines_read(stats: dict) -> int:
    return stats["tasks"]["collect"]["lines"]


def auth_line(n: int, ip: str = "203.0.113.99") -> str:
    return (
        f"Nov 28 05:0{n % 10}:00 web01 sshd[9{n}]: Failed password for root from {ip} port {40000 + n} ssh2\n"
    )


def test_first_run_finds_the_sample_signals_and_a_second_reads_nothing(dirs):
    _logs, uploads = dirs

    run, stats = triage_run()

    assert findings_of(run) == EXPECTED
    assert lines_read(stats) == SAMPLE_LINES
    assert stats["tasks"]["triage"]["findings"] == 19
    assert stats["tasks"]["collect"]["files_read"] == 4
    report = json.loads((uploads / "reports" / f"{run.pk}.json").read_text())
    assert run.report_path == str(uploads / "reports" / f"{run.pk}.md")
    assert Path(run.report_path).read_text().startswith(f"# Log triage report, run {run.pk}")
    assert report["findings_total"] == 19
    assert report["below_threshold"] == 4  # the low ones: one ssh_failed_login, three app_error
    assert report["reported"] == 15
    assert report["left_out_by_scope"] == 0
    assert stats["tasks"]["respond"]["reported"] == 15

    again, stats2 = triage_run()

    assert lines_read(stats2) == 0
    assert again.findings.count() == 0
    assert LogCursor.objects.count() == 4


def test_appended_lines_are_the_only_ones_read_next_time(dirs):
    logs, _ = dirs
    triage_run()
    with open(logs / "auth.log", "a") as fh:
        fh.writelines(auth_line(n) for n in range(6))
        fh.write(
            "Nov 28 05:09:00 web01 sshd[1]: Failed password for root from 203.0.113.99 port 1"
        )  # partial

    run, stats = triage_run()

    assert lines_read(stats) == 6
    assert findings_of(run) == {("ssh_brute_force", "203.0.113.99", 6, "auth.log")}

    with open(logs / "auth.log", "a") as fh:
        fh.write(" ssh2\n")
    run, stats = triage_run()
    assert lines_read(stats) == 1
    assert findings_of(run) == {("ssh_failed_login", "203.0.113.99", 1, "auth.log")}


def test_rotated_file_is_finished_and_its_compressed_copy_not_reread(dirs):
    logs, _ = dirs
    triage_run()
    with open(logs / "auth.log", "a") as fh:
        fh.writelines(auth_line(n) for n in range(2))
    os.rename(logs / "auth.log", logs / "auth.log.1")  # logrotate: rename, then a fresh file
    (logs / "auth.log").write_text("".join(auth_line(n, "198.51.100.7") for n in range(3)))

    run, stats = triage_run()

    assert lines_read(stats) == 5
    assert stats["tasks"]["collect"]["rotated"] == 1
    assert stats["tasks"]["collect"]["continued"] == 1
    assert findings_of(run) == {
        ("ssh_failed_login", "203.0.113.99", 2, "auth.log.1"),
        ("ssh_failed_login", "198.51.100.7", 3, "auth.log"),
    }

    # Next rotation compresses the old file under a new name (a new inode): same content, read already.
    with gzip.open(logs / "auth.log.2.gz", "wb") as gz:
        gz.write((logs / "auth.log.1").read_bytes())
    (logs / "auth.log.1").unlink()
    run, stats = triage_run()
    assert lines_read(stats) == 0
    assert run.findings.count() == 0


def test_truncated_file_is_read_from_the_start(dirs):
    logs, _ = dirs
    triage_run()
    with open(logs / "auth.log", "r+") as fh:  # copytruncate: same inode, size drops to zero
        fh.truncate(0)
        fh.writelines(auth_line(n) for n in range(2))

    run, stats = triage_run()

    assert stats["tasks"]["collect"]["truncated"] == 1
    assert lines_read(stats) == 2
    assert findings_of(run) == {("ssh_failed_login", "203.0.113.99", 2, "auth.log")}


def test_uploads_gzip_and_links_are_read_within_the_folders_only(dirs, tmp_path):
    logs, uploads = dirs
    for name in ("auth.log", "access.log", "app.log", "kern.log"):
        (logs / name).unlink()
    (uploads / "host2").mkdir()
    with gzip.open(uploads / "host2" / "auth.log.3.gz", "wt") as gz:
        gz.writelines(auth_line(n, "192.0.2.200") for n in range(5))
    outside = tmp_path / "outside.log"
    outside.write_text("".join(auth_line(n, "192.0.2.66") for n in range(9)))
    (logs / "escape.log").symlink_to(outside)
    (logs / "escape-dir").symlink_to(tmp_path)
    (logs / "alias.log").symlink_to(uploads / "host2" / "auth.log.3.gz")  # inside: same file, read once
    (uploads / "reports").mkdir()
    (uploads / "reports" / "old.md").write_text("".join(auth_line(n, "192.0.2.77") for n in range(9)))
    (logs / "core.bin").write_bytes(b"\x7fELF\x00\x00" * 100)

    run, stats = triage_run()

    assert findings_of(run) == {("ssh_brute_force", "192.0.2.200", 5, "auth.log.3.gz")}
    assert lines_read(stats) == 5
    assert stats["tasks"]["collect"]["links_outside"] == 2
    assert stats["tasks"]["collect"]["binary_skipped"] == 1


def test_reads_are_bounded_per_run_and_per_line(dirs, settings):
    logs, _ = dirs
    for name in ("access.log", "app.log", "kern.log"):
        (logs / name).unlink()
    settings.LOG_TRIAGE_MAX_BYTES_PER_RUN = 4000
    settings.LOG_TRIAGE_MAX_LINE_BYTES = 200
    size = (logs / "auth.log").stat().st_size
    with open(logs / "auth.log", "a") as fh:
        fh.write("Nov 28 05:00:00 web01 app: " + "x" * 5000 + "\n")

    total_lines = total_bytes = runs = 0
    while True:
        _run, stats = triage_run()
        runs += 1
        if lines_read(stats) == 0:
            break
        assert stats["tasks"]["collect"]["bytes"] <= 4000 + 5100
        total_lines += lines_read(stats)
        total_bytes += stats["tasks"]["collect"]["bytes"]
        assert runs < 20

    assert total_lines == 70 + 1
    assert total_bytes == size + 5028
    assert runs >= 3  # at least two reading runs, then one that finds nothing new
    # Split across runs, the brute force is still found, counted in pieces.
    assert sum(f.count for f in Finding.objects.filter(rule__startswith="ssh_", subject="203.0.113.45")) == 19


def test_allowlist_scope_reports_only_matching_subjects(dirs):
    _, uploads = dirs
    Job.objects.filter(key="log_triage").update(
        task3_allowlist=["203.0.113.0/24", "mallory", "/api/*", "192.0.2.10"]
    )

    run, stats = triage_run(scope="allowlist")

    report = json.loads((uploads / "reports" / f"{run.pk}.json").read_text())
    assert {(f["rule"], f["subject"]) for f in report["findings"]} == {
        ("ssh_brute_force", "203.0.113.45"),
        ("ssh_invalid_user", "203.0.113.45"),
        ("http_path_scan", "203.0.113.77"),
        ("sudo_not_in_sudoers", "mallory"),
        ("http_5xx_burst", "/api/orders"),
    }  # 192.0.2.10 matches, but its finding is below the severity threshold
    assert report["left_out_by_scope"] == 10
    assert stats["tasks"]["respond"]["left_out_by_scope"] == 10
    assert "left out by the scope: 10" in Path(run.report_path).read_text()
    assert run.findings.count() == 19  # the scope limits what is acted on, not what is found


def test_allowlist_scope_with_empty_allowlist_reports_nothing(dirs):
    _run, stats = triage_run(scope="allowlist")

    assert stats["tasks"]["respond"]["reported"] == 0
    assert stats["tasks"]["respond"]["left_out_by_scope"] == 15


def test_findings_endpoint_lists_a_runs_findings(dirs, api, anon):
    run, _ = triage_run()

    response = api.get(f"/api/runs/{run.pk}/findings")
    slash = api.get(f"/api/runs/{run.pk}/findings/?severity=high")

    assert response.status_code == 200
    assert response.json()["count"] == 19
    first = response.json()["results"][0]
    assert first["severity"] == "high"
    assert first["rule"] == "ssh_brute_force"
    assert set(first) >= {"rule", "severity", "subject", "count", "first_seen", "last_seen", "source_file"}
    assert slash.status_code == 200
    assert slash.json()["count"] == 7
    assert api.get("/api/runs/999999/findings").status_code == 404
    assert anon.get(f"/api/runs/{run.pk}/findings").status_code == 401


def test_overlapping_runs_triage_each_line_once(dirs, tmp_path):
    """Two runs collect the same new lines; the first to commit triages them, the other finds them taken."""
    from orchestrator.jobs.log_triage.collect import collect
    from orchestrator.jobs.log_triage.triage import triage
    from orchestrator.jobs.registry import TaskContext

    job = Job.objects.get(key="log_triage")
    contexts = []
    for name in ("a", "b"):
        run = OrchestratorService.launch(job=job, task3_scope="all")
        (tmp_path / name).mkdir()
        ctx = TaskContext(run.pk, "log_triage", "", "all", work_dir=str(tmp_path / name))
        assert collect(ctx)["lines"] == SAMPLE_LINES
        contexts.append(ctx)

    first, second = (triage(ctx) for ctx in contexts)

    assert first["findings"] == 19
    assert first["files_raced"] == 0
    assert second["findings"] == 0
    assert second["files_raced"] == 4
    assert Finding.objects.count() == 19


def test_params__files_and_min_severity_choose_what_is_read_and_stored(dirs):
    """log_triage's params (issue 32.6): `files` narrows what is read, and a file left out keeps its
    cursor for a later run; `min_severity` drops lower findings before they are stored or reported."""
    job = Job.objects.get(key="log_triage")
    run = OrchestratorService.launch(
        job=job, task3_scope="all", params={"files": ["auth.log"], "min_severity": "medium"}
    )
    stats = OrchestratorService.execute(run)
    run.refresh_from_db()

    auth = {finding for finding in EXPECTED if finding[3] == "auth.log"}
    stored = findings_of(run)
    assert stored == auth - {("ssh_failed_login", "192.0.2.10", 2, "auth.log")}  # the low one dropped
    assert {f.severity for f in run.findings.all()} <= {"medium", "high", "critical"}
    assert stats["tasks"]["collect"]["files_read"] == 1
    assert stats["tasks"]["collect"]["not_selected"] == 3
    assert stats["tasks"]["respond"]["reported"] == len(stored)

    rest, stats2 = triage_run()  # no params: every file, every severity
    assert findings_of(rest) == EXPECTED - auth  # auth.log was read; the others from their start
    assert stats2["tasks"]["collect"]["not_selected"] == 0
    assert lines_read(stats) + lines_read(stats2) == SAMPLE_LINES
