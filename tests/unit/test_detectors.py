"""The log_triage detectors on the sample logs (exact counts), their thresholds, and the pure helpers."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.jobs.log_triage.collect import read_lines
from orchestrator.jobs.log_triage.detectors import Thresholds, Triage, at_or_above, parse_syslog_time
from orchestrator.jobs.log_triage.respond import subject_matches

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "logs"
NOW = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)


def triage_file(name: str, **thresholds: int) -> set[tuple[str, str, str, int]]:
    engine = Triage(now=NOW, thresholds=Thresholds(**thresholds))
    with open(SAMPLES / name, encoding="utf-8") as fh:
        for line in fh:
            engine.feed(name, line)
    return {(f.rule, f.severity, f.subject, f.count) for f in engine.findings()}


def triage_lines(lines: list[str], **thresholds: int):
    engine = Triage(now=NOW, thresholds=Thresholds(**thresholds))
    for line in lines:
        engine.feed("test.log", line)
    return engine.findings()


def test_auth_log__ssh_brute_force_invalid_users_and_sudo_failures():
    assert triage_file("auth.log") == {
        ("ssh_brute_force", "high", "203.0.113.45", 11),  # 8 failures + "message repeated 3 times"
        ("ssh_brute_force", "high", "198.51.100.23", 6),
        ("ssh_failed_login", "low", "192.0.2.10", 2),
        ("ssh_invalid_user", "medium", "203.0.113.45", 8),
        ("sudo_auth_failure", "medium", "bob", 3),
        ("sudo_not_in_sudoers", "high", "mallory", 1),
    }


def test_access_log__path_scan_4xx_burst_and_5xx_burst():
    assert triage_file("access.log") == {
        ("http_path_scan", "medium", "203.0.113.77", 15),
        ("http_4xx_burst", "medium", "198.51.100.88", 25),
        ("http_5xx_burst", "high", "/api/orders", 8),  # the query string is not part of the path
    }


def test_app_log__errors_by_logger_and_tracebacks_by_exception():
    assert triage_file("app.log") == {
        ("app_error", "low", "app.payments", 3),
        ("app_error", "low", "app.db", 1),
        ("app_error", "low", "app.api", 1),
        ("app_error", "high", "app.worker", 1),  # CRITICAL
        ("app_traceback", "medium", "KeyError", 2),
        ("app_traceback", "medium", "psycopg2.OperationalError", 1),
        ("app_traceback", "medium", "ValueError", 1),  # a chained traceback counts both exceptions
        ("app_traceback", "medium", "RuntimeError", 1),
    }


def test_kern_log__oom_kills_by_process_once_each():
    assert triage_file("kern.log") == {("oom_kill", "high", "java", 1), ("oom_kill", "high", "python3", 1)}


def test_sample_findings_carry_times_and_come_most_severe_first():
    engine = Triage(now=NOW)
    for name in ("auth.log", "access.log"):
        for line in (SAMPLES / name).read_text().splitlines():
            engine.feed(name, line)
    findings = engine.findings()
    assert [f.severity for f in findings] == sorted(
        (f.severity for f in findings), key=["critical", "high", "medium", "low", "info"].index
    )
    scan = next(f for f in findings if f.rule == "http_path_scan")
    assert scan.first_seen == datetime(2026, 11, 28, 3, 9, 50, tzinfo=UTC)
    assert scan.last_seen == datetime(2026, 11, 28, 3, 10, 18, tzinfo=UTC)
    assert scan.source_file == "access.log"


def ssh_failures(ip: str, n: int) -> list[str]:
    return [
        f"Nov 28 04:00:{i:02d} h sshd[1]: Failed password for root from {ip} port {i} ssh2" for i in range(n)
    ]


@pytest.mark.parametrize(("n", "rule"), [(4, "ssh_failed_login"), (5, "ssh_brute_force")])
def test_ssh_brute_force_threshold(n, rule):
    assert [(f.rule, f.count) for f in triage_lines(ssh_failures("192.0.2.1", n))] == [(rule, n)]


def test_thresholds_are_configurable():
    assert triage_lines(ssh_failures("192.0.2.1", 3), ssh_brute_force=3)[0].rule == "ssh_brute_force"


def test_5xx_spread_wider_than_the_window_is_not_a_burst():
    spread = [
        f'10.0.0.1 - - [28/Nov/2026:04:{i * 2:02d}:00 +0000] "GET /api/x HTTP/1.1" 503 10 "-" "ua"'
        for i in range(8)
    ]
    burst = [
        f'10.0.0.1 - - [28/Nov/2026:05:00:{i:02d} +0000] "GET /api/y HTTP/1.1" 500 10 "-" "ua"'
        for i in range(5)
    ]
    assert [(f.rule, f.subject) for f in triage_lines(spread + burst)] == [("http_5xx_burst", "/api/y")]


def test_iso_syslog_stamps_and_ipv6_sources():
    lines = [
        f"2026-11-28T04:00:{i:02d}.123456+00:00 h sshd[7]: "
        "Failed password for invalid user x from 2001:db8::7 port 22 ssh2"
        for i in range(5)
    ]
    (finding,) = triage_lines(lines)
    assert (finding.rule, finding.subject, finding.count) == ("ssh_brute_force", "2001:db8::7", 5)
    assert finding.first_seen == datetime(2026, 11, 28, 4, 0, 0, tzinfo=UTC)


def test_traceback_cut_off_at_the_end_counts_as_unknown():
    lines = ["2026-11-28 04:00:00 ERROR app.x: boom", "Traceback (most recent call last):", '  File "a.py"']
    assert {(f.rule, f.subject) for f in triage_lines(lines)} == {
        ("app_error", "app.x"),
        ("app_traceback", "unknown"),
    }


def test_syslog_year_is_the_one_that_is_not_in_the_future():
    january = datetime(2027, 1, 1, 0, 30, tzinfo=UTC)
    assert parse_syslog_time("Dec", "31", "23:59:00", now=january) == datetime(
        2026, 12, 31, 23, 59, tzinfo=UTC
    )
    assert parse_syslog_time("Jan", "1", "00:10:00", now=january) == datetime(2027, 1, 1, 0, 10, tzinfo=UTC)


def test_unrelated_lines_find_nothing():
    assert triage_lines(["hello", "", "Nov 28 04:00:00 h systemd[1]: Started Session 3.", "\x00\xff"]) == []


def test_severity_threshold_order():
    assert at_or_above("high", "medium")
    assert at_or_above("medium", "medium")
    assert not at_or_above("low", "medium")


@pytest.mark.parametrize(
    ("subject", "entries", "expected"),
    [
        ("203.0.113.45", ["203.0.113.45"], True),
        ("203.0.113.45", ["203.0.113.0/24"], True),
        ("198.51.100.1", ["203.0.113.0/24"], False),
        ("2001:db8::7", ["2001:db8::/32"], True),
        ("2001:db8::7", ["203.0.113.0/24"], False),
        ("mallory", ["mallory"], True),
        ("Mallory", ["mallory"], False),  # user names are case-sensitive
        ("db01.example.com", ["DB01.example.com"], True),  # host names are not
        ("web7.example.com", ["*.example.com"], True),
        ("/api/orders", ["/api/*"], True),
        ("/api/orders", ["/api/orders"], True),
        ("/admin/", ["/api/*"], False),
        ("anything", [], False),
        ("anything", ["", "  ", "not/a/cidr"], False),
    ],
)
def test_allowlist_matching(subject, entries, expected):
    assert subject_matches(subject, entries) is expected


def test_read_lines__bounded_per_line_and_leaves_a_partial_tail():
    data = b"short\n" + b"x" * 50 + b"\n" + b"tail without newline"
    lines = list(read_lines(io.BytesIO(data), budget=10_000, max_line=20, complete_tail=False))
    assert [(line, size, cut) for line, size, cut in lines] == [(b"short", 6, False), (b"x" * 20, 51, True)]
    with_tail = list(read_lines(io.BytesIO(data), budget=10_000, max_line=20, complete_tail=True))
    assert with_tail[-1] == (b"tail without newline", 20, False)


def test_read_lines__stops_at_the_budget_on_a_line_boundary():
    data = b"".join(b"line %02d\n" % i for i in range(10))  # 8 bytes each
    lines = list(read_lines(io.BytesIO(data), budget=20, max_line=100, complete_tail=False))
    assert [line for line, _, _ in lines] == [b"line 00", b"line 01", b"line 02"]
