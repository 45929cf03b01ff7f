"""Detectors: the security signals a SOC analyst looks for first, as pure functions over log lines.

`Triage` is fed lines one at a time (`feed(source_file, line)`) and returns aggregated findings
(`findings()`); it does no I/O and takes the clock as an argument, so every rule is testable exactly.

Formats understood: syslog (`Nov 28 03:12:01 host prog[pid]: msg`, and the RFC 3339 stamp rsyslog
writes), nginx/Apache combined and common access logs, and Python-logging style application logs
(`2026-11-28 03:12:01,123 ERROR app.payments: msg`) with their tracebacks. Times without a zone are
read as UTC; syslog's year-less stamps take the year that puts them no later than `now` (plus a day).

Rules (subject in brackets):
  ssh_brute_force [source IP]     failed SSH logins from one IP >= ssh_brute_force            high
  ssh_failed_login [source IP]    the same below the threshold                                low
  ssh_invalid_user [source IP]    logins attempted for users that do not exist               medium
  sudo_auth_failure [user]        wrong sudo passwords (the "N incorrect password attempts")  medium
  sudo_not_in_sudoers [user]      sudo by a user not in sudoers                               high
  http_path_scan [client IP]      >= http_scan_paths distinct paths answered 400/403/404/405/410  medium
  http_4xx_burst [client IP]      >= http_4xx_burst 4xx within the window (not already a scan)    medium
  http_5xx_burst [request path]   >= http_5xx_burst 5xx on one path within the window         high
  app_error [logger]              ERROR lines (CRITICAL/FATAL: high; >= app_error_burst: medium) low
  app_traceback [exception type]  Python tracebacks, by the exception that ended them         medium
  oom_kill [process name]         processes the kernel's OOM killer killed                     high
Counts are per (rule, subject, source file).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

SEVERITIES = ("info", "low", "medium", "high", "critical")
SEVERITY_RANK = {name: rank for rank, name in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Thresholds:
    ssh_brute_force: int = 5
    http_scan_paths: int = 10
    http_4xx_burst: int = 20
    http_5xx_burst: int = 5
    http_window_seconds: int = 60
    app_error_burst: int = 10


@dataclass(frozen=True)
class FindingData:
    rule: str
    severity: str
    subject: str
    count: int
    first_seen: datetime | None
    last_seen: datetime | None
    source_file: str


@dataclass
class _Tally:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None
    flags: set[str] = field(default_factory=set)

    def add(self, when: datetime | None, n: int = 1) -> None:
        self.count += n
        if when is not None:
            self.first = when if self.first is None else min(self.first, when)
            self.last = when if self.last is None else max(self.last, when)


@dataclass
class _FileState:
    last_time: datetime | None = None
    in_traceback: bool = False
    traceback_time: datetime | None = None


_MONTHS = {m: i for i, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)}

_SYSLOG = re.compile(
    r"^(?P<mon>[A-Z][a-z]{2}) {1,2}(?P<day>\d{1,2}) (?P<hms>\d{2}:\d{2}:\d{2}) (?P<host>\S+) "
    r"(?P<prog>[^\s\[:]+)(?:\[\d+\])?: (?P<msg>.*)$"
)
_SYSLOG_ISO = re.compile(
    r"^(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.\d+)?(?P<tz>Z|[+-]\d{2}:\d{2})? (?P<host>\S+) "
    r"(?P<prog>[^\s\[:]+)(?:\[\d+\])?: (?P<msg>.*)$"
)
_APP = re.compile(
    r"^(?P<ts>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?\s+"
    r"\[?(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\]?\s+(?P<logger>[\w.\-]+)"
)
_ACCESS = re.compile(
    r'^(?P<ip>[0-9A-Fa-f:.]+) \S+ \S+ \[(?P<ts>[^\]]+)\] "(?P<method>[A-Z]{3,10}) (?P<path>\S+)'
    r'(?: [^"]*)?" (?P<status>\d{3}) '
)

_SSH_FAILED = re.compile(
    r"^Failed (?:password|publickey|none|keyboard-interactive/pam) for (?:invalid user )?.*? "
    r"from (?P<ip>[0-9A-Fa-f:.]+) port \d+"
)
_SSH_INVALID = re.compile(r"^Invalid user .*? from (?P<ip>[0-9A-Fa-f:.]+)(?: port \d+)?\s*$")
_REPEATED = re.compile(r"^message repeated (?P<n>\d+) times: \[ ?(?P<msg>.*?) ?\]$")
_SUDO_WRONG = re.compile(r"^\s*(?P<user>\S+) : (?P<n>\d+) incorrect password attempts?\b")
_SUDO_NOT_ALLOWED = re.compile(r"^\s*(?P<user>\S+) : user NOT in sudoers\b")
_OOM = re.compile(r"(?:Out of memory|Memory cgroup out of memory): Killed process \d+ \((?P<name>[^)]*)\)")
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^(?P<exc>[A-Za-z_][\w.]*)(?::\s|:?\s*$)")
_CHAIN_LINES = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
_PROBE_STATUSES = frozenset({400, 403, 404, 405, 410})


def parse_syslog_time(mon: str, day: str, hms: str, *, now: datetime) -> datetime | None:
    month = _MONTHS.get(mon)
    if month is None:
        return None
    hour, minute, second = (int(part) for part in hms.split(":"))
    try:
        stamp = datetime(now.year, month, int(day), hour, minute, second, tzinfo=UTC)
    except ValueError:
        return None
    # Syslog has no year: a stamp more than a day ahead of now belongs to last year (a January run
    # reading December's lines).
    if stamp > now + timedelta(days=1):
        stamp = stamp.replace(year=now.year - 1)
    return stamp


def _iso_time(text: str, tz: str | None = None) -> datetime | None:
    try:
        stamp = datetime.fromisoformat(text.replace(" ", "T") + (tz or ""))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.astimezone(UTC)


def _access_time(text: str) -> datetime | None:
    try:
        return datetime.strptime(text, "%d/%b/%Y:%H:%M:%S %z").astimezone(UTC)
    except ValueError:
        return None


def _max_in_window(times: list[datetime], window: timedelta) -> int:
    """The largest number of events inside any window of the given length (two pointers)."""
    ordered = sorted(times)
    best = start = 0
    for end, stamp in enumerate(ordered):
        while stamp - ordered[start] > window:
            start += 1
        best = max(best, end - start + 1)
    return best


class Triage:
    """Feeds lines through every detector; `findings()` returns them, most severe first."""

    def __init__(self, *, now: datetime, thresholds: Thresholds | None = None) -> None:
        self.now = now
        self.thresholds = thresholds or Thresholds()
        self.lines = 0
        self._tallies: dict[tuple[str, str, str], _Tally] = defaultdict(_Tally)
        self._files: dict[str, _FileState] = defaultdict(_FileState)
        # HTTP events are judged at the end, over all of a client's (or path's) requests.
        self._http_by_ip: dict[tuple[str, str], list[tuple[datetime | None, int, str]]] = defaultdict(list)
        self._ssh_failed: dict[tuple[str, str], _Tally] = defaultdict(_Tally)

    # --- feeding -----------------------------------------------------------------------------------

    def feed(self, source_file: str, line: str) -> None:
        self.lines += 1
        line = line.rstrip("\r\n")
        state = self._files[source_file]
        if state.in_traceback and self._traceback_line(source_file, state, line):
            return
        if line.startswith(_TRACEBACK):
            state.in_traceback = True
            state.traceback_time = state.last_time
            return
        match = _APP.match(line)
        if match:
            self._app_line(source_file, state, match)
            return
        match = _SYSLOG.match(line)
        if match:
            when = parse_syslog_time(match["mon"], match["day"], match["hms"], now=self.now)
            state.last_time = when or state.last_time
            self._syslog_message(source_file, match["prog"], match["msg"], when)
            return
        match = _SYSLOG_ISO.match(line)
        if match:
            when = _iso_time(match["ts"], match["tz"])
            state.last_time = when or state.last_time
            self._syslog_message(source_file, match["prog"], match["msg"], when)
            return
        match = _ACCESS.match(line)
        if match:
            when = _access_time(match["ts"])
            state.last_time = when or state.last_time
            path = match["path"].split("?", 1)[0]
            self._http_by_ip[(source_file, match["ip"])].append((when, int(match["status"]), path))

    def _traceback_line(self, source_file: str, state: _FileState, line: str) -> bool:
        """Consume a line inside a traceback; False when the line ends it and is an ordinary line."""
        if not line.strip() or line[:1].isspace() or line in _CHAIN_LINES:
            return True
        state.in_traceback = False
        match = _EXCEPTION_LINE.match(line)
        if match and not _APP.match(line):
            self._add("app_traceback", match["exc"], source_file, state.traceback_time)
            return True
        # The traceback was cut off (a truncated log): count it, under an unknown exception.
        self._add("app_traceback", "unknown", source_file, state.traceback_time)
        return False

    def _app_line(self, source_file: str, state: _FileState, match: re.Match[str]) -> None:
        when = _iso_time(match["ts"])
        state.last_time = when or state.last_time
        level = match["level"]
        if level in ("ERROR", "CRITICAL", "FATAL"):
            tally = self._add("app_error", match["logger"], source_file, when)
            if level != "ERROR":
                tally.flags.add("critical")

    def _syslog_message(
        self, source_file: str, prog: str, msg: str, when: datetime | None, n: int = 1
    ) -> None:
        repeated = _REPEATED.match(msg)
        if repeated:
            self._syslog_message(source_file, prog, repeated["msg"], when, n * int(repeated["n"]))
            return
        if prog == "sshd":
            match = _SSH_FAILED.match(msg)
            if match:
                self._ssh_failed[(source_file, match["ip"])].add(when, n)
                return
            match = _SSH_INVALID.match(msg)
            if match:
                self._add("ssh_invalid_user", match["ip"], source_file, when, n)
        elif prog == "sudo":
            match = _SUDO_WRONG.match(msg)
            if match:
                self._add("sudo_auth_failure", match["user"], source_file, when, n * int(match["n"]))
                return
            match = _SUDO_NOT_ALLOWED.match(msg)
            if match:
                self._add("sudo_not_in_sudoers", match["user"], source_file, when, n)
        elif prog == "kernel":
            match = _OOM.search(msg)
            if match:
                self._add("oom_kill", match["name"], source_file, when, n)

    def _add(self, rule: str, subject: str, source_file: str, when: datetime | None, n: int = 1) -> _Tally:
        tally = self._tallies[(rule, subject, source_file)]
        tally.add(when, n)
        return tally

    # --- results -----------------------------------------------------------------------------------

    def findings(self) -> list[FindingData]:
        out: list[FindingData] = []
        limits = self.thresholds
        for state_file, state in self._files.items():
            if state.in_traceback:
                # A traceback still open at the end of the batch: count it now, it will not resume.
                self._add("app_traceback", "unknown", state_file, state.traceback_time)
                state.in_traceback = False
        for (source_file, ip), tally in self._ssh_failed.items():
            rule = "ssh_brute_force" if tally.count >= limits.ssh_brute_force else "ssh_failed_login"
            out.append(self._finding(rule, ip, source_file, tally))
        self._judge_http(out)
        for (rule, subject, source_file), tally in self._tallies.items():
            out.append(self._finding(rule, subject, source_file, tally))
        out.sort(key=lambda f: (-SEVERITY_RANK[f.severity], -f.count, f.rule, f.subject, f.source_file))
        return out

    def _judge_http(self, out: list[FindingData]) -> None:
        limits = self.thresholds
        window = timedelta(seconds=limits.http_window_seconds)
        by_path: dict[tuple[str, str], list[datetime | None]] = defaultdict(list)
        for (source_file, ip), events in self._http_by_ip.items():
            probes = [(when, path) for when, status, path in events if status in _PROBE_STATUSES]
            client_errors = [when for when, status, _ in events if 400 <= status < 500]
            for when, status, path in events:
                if status >= 500:
                    by_path[(source_file, path)].append(when)
            if len({path for _, path in probes}) >= limits.http_scan_paths:
                out.append(self._finding("http_path_scan", ip, source_file, _tally_of(w for w, _ in probes)))
            elif _max_in_window([w for w in client_errors if w], window) >= limits.http_4xx_burst:
                out.append(self._finding("http_4xx_burst", ip, source_file, _tally_of(client_errors)))
        for (source_file, path), times in by_path.items():
            if _max_in_window([w for w in times if w], window) >= limits.http_5xx_burst:
                out.append(self._finding("http_5xx_burst", path, source_file, _tally_of(times)))

    def _finding(self, rule: str, subject: str, source_file: str, tally: _Tally) -> FindingData:
        return FindingData(
            rule=rule,
            severity=_severity(rule, tally, self.thresholds),
            subject=subject[:512],
            count=tally.count,
            first_seen=tally.first,
            last_seen=tally.last,
            source_file=source_file,
        )


def _tally_of(times) -> _Tally:
    tally = _Tally()
    for when in times:
        tally.add(when)
    return tally


_FIXED_SEVERITY = {
    "ssh_brute_force": "high",
    "ssh_failed_login": "low",
    "ssh_invalid_user": "medium",
    "sudo_auth_failure": "medium",
    "sudo_not_in_sudoers": "high",
    "http_path_scan": "medium",
    "http_4xx_burst": "medium",
    "http_5xx_burst": "high",
    "app_traceback": "medium",
    "oom_kill": "high",
}


def _severity(rule: str, tally: _Tally, limits: Thresholds) -> str:
    if rule == "app_error":
        if "critical" in tally.flags:
            return "high"
        return "medium" if tally.count >= limits.app_error_burst else "low"
    return _FIXED_SEVERITY[rule]


def at_or_above(severity: str, threshold: str) -> bool:
    return SEVERITY_RANK.get(severity, 0) >= SEVERITY_RANK.get(threshold, 0)
