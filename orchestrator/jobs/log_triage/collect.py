"""Task 1, collect: copy the log lines added since the last run into the run's work directory.

Files: every regular, non-hidden, non-binary file under `CYBER_BRAIN_LOGS` and `UPLOADS_DIR`
(recursively; plain or gzip), except `UPLOADS_DIR/reports/`. Links are resolved and must stay inside
one of those folders; each real file is read once even when reachable by several names.

Where to start in each file comes from its `LogCursor`, checked against what is on disk:
- same path, same inode, the first bytes unchanged, not shorter than the offset: continue there;
- otherwise the file was rotated, truncated or rewritten; then a cursor of another path with the same
  inode, or with the same first 1 KiB (a renamed or compressed rotation of a file already read),
  gives the offset to continue from, and anything else is read from the start.
Offsets count decompressed bytes for .gz files. A plain file's unterminated last line is left for the
next run (it is still being written).

Cursors are not moved here: task 2 moves them in the transaction that stores the findings, after
checking that nobody moved them since this plan, so each line is triaged once even if a run fails.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from django.conf import settings

from orchestrator.jobs.registry import TaskContext

HEAD_BYTES = 1024
DEFAULT_MAX_BYTES_PER_RUN = 64 * 1024 * 1024
DEFAULT_MAX_LINE_BYTES = 8 * 1024
MANIFEST = "collect.json"
SPOOL_DIR = "spool"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Entry:
    """One file's planned read: what to triage and where its cursor moves if the plan still holds."""

    path: str
    spool: str
    inode: int
    size: int
    start: int
    end: int
    head_hash: str
    head_len: int
    lines: int
    # The cursor row as the plan saw it ([inode, offset, head_hash]), or None when there was none.
    expected: list[Any] | None


@dataclass
class CollectStats:
    files: int = 0
    files_read: int = 0
    lines: int = 0
    bytes: int = 0
    rotated: int = 0
    truncated: int = 0
    continued: int = 0
    links_outside: int = 0
    binary_skipped: int = 0
    unreadable: int = 0
    long_lines: int = 0
    budget_exhausted: int = 0
    not_selected: int = 0  # left out by the run's `files` params


@dataclass
class Manifest:
    entries: list[Entry] = field(default_factory=list)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def log_roots() -> list[Path]:
    return [Path(settings.CYBER_BRAIN_LOGS), Path(settings.UPLOADS_DIR)]


def selected(path: str, roots: list[Path], patterns: list[str]) -> bool:
    """Whether the run's `files` patterns take `path` (a real path under one of `roots`): a pattern
    without `/` matches the file's name, one with `/` its path relative to the root; none takes all."""
    if not patterns:
        return True
    relative = [os.path.relpath(path, real) for real in map(os.path.realpath, roots) if _within(path, real)]
    name = os.path.basename(path)
    return any(
        fnmatch.fnmatchcase(name, pattern)
        if "/" not in pattern
        else any(fnmatch.fnmatchcase(rel, pattern.lstrip("/")) for rel in relative)
        for pattern in patterns
    )


def iter_log_files(roots: list[Path], skip: list[Path], stats: CollectStats) -> Iterator[str]:
    """Real paths of the regular files under `roots`, sorted, each once, never outside the roots."""
    real_roots = [os.path.realpath(root) for root in roots if os.path.isdir(root)]
    real_skip = [os.path.realpath(path) for path in skip]
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()
    stack = sorted(set(real_roots), reverse=True)
    while stack:
        directory = stack.pop()
        if directory in seen_dirs:
            continue
        seen_dirs.add(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            stats.unreadable += 1
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            real = os.path.realpath(entry.path)
            if not any(_within(real, root) for root in real_roots):
                stats.links_outside += 1
                continue
            if any(_within(real, path) for path in real_skip):
                continue
            try:
                mode = os.stat(real).st_mode
            except OSError:
                stats.unreadable += 1
                continue
            if stat.S_ISDIR(mode):
                subdirs.append(real)
            elif stat.S_ISREG(mode) and real not in seen_files:
                seen_files.add(real)
                yield real
        stack.extend(reversed(subdirs))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(path: str) -> tuple[IO[bytes], os.stat_result, bool]:
    """Open without following a link swapped in after the walk; returns (stream, stat, is_gzip)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    raw = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raw.close()
        raise OSError("not a regular file")
    is_gzip = raw.read(2) == _GZIP_MAGIC
    raw.seek(0)
    if is_gzip:
        return _GzipReader(raw), st, True
    return raw, st, False


class _GzipReader(gzip.GzipFile):
    """A GzipFile that closes the file it reads from (GzipFile leaves a passed-in `fileobj` open)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def read_lines(
    stream: IO[bytes], *, budget: int, max_line: int, complete_tail: bool
) -> Iterator[tuple[bytes, int, bool]]:
    """Yield (line without newline, bytes consumed, was cut) until EOF or `budget` bytes consumed.

    A line longer than `max_line` is cut to `max_line` bytes and the rest skipped. An unterminated last
    line is yielded only with `complete_tail` (a finished .gz file), else left for the next run.
    """
    consumed = 0
    while consumed < budget:
        chunk = stream.readline(max_line + 1)
        if not chunk:
            return
        if chunk.endswith(b"\n"):
            consumed += len(chunk)
            yield chunk[:-1].rstrip(b"\r"), len(chunk), False
            continue
        if len(chunk) <= max_line:
            if complete_tail:
                consumed += len(chunk)
                yield chunk, len(chunk), False
            return
        size = len(chunk)
        ended = False
        while size < budget:
            more = stream.readline(64 * 1024)
            size += len(more)
            if not more or more.endswith(b"\n"):
                ended = bool(more) or complete_tail
                break
        else:
            ended = True  # a line longer than the whole budget: give up on it rather than stall forever
        if not ended:
            return
        consumed += size
        yield chunk[:max_line], size, True


def _plan_start(
    path: str, st: os.stat_result, head: bytes, is_gzip: bool, cursors: dict[str, Any], stats: CollectStats
) -> tuple[int, list[Any] | None]:
    from orchestrator.models import LogCursor

    cursor = cursors.get(path)
    expected = [cursor.inode, cursor.offset, cursor.head_hash] if cursor else None
    if cursor is not None and cursor.inode == st.st_ino:
        same_head = len(head) >= cursor.head_len and _sha(head[: cursor.head_len]) == cursor.head_hash
        if same_head and (is_gzip or st.st_size >= cursor.offset):
            return cursor.offset, expected
        stats.truncated += 1
    elif cursor is not None:
        stats.rotated += 1
    # Another name for content already read: the file rotated away (same inode) or compressed (same head).
    candidates = LogCursor.objects.exclude(path=path).filter(inode=st.st_ino)
    offsets = [
        c.offset for c in candidates if len(head) >= c.head_len and _sha(head[: c.head_len]) == c.head_hash
    ]
    if head:
        # Same first bytes, as many as the other cursor fingerprinted: 1 KiB, or the whole of a small file.
        offsets += (
            LogCursor.objects.exclude(path=path)
            .filter(head_len=len(head), head_hash=_sha(head))
            .values_list("offset", flat=True)
        )
    if offsets:
        stats.continued += 1
        return max(offsets), expected
    return 0, expected


def collect_files(
    *, work_dir: str, max_bytes: int, max_line: int, patterns: list[str] | None = None
) -> tuple[Manifest, CollectStats]:
    from orchestrator.models import LogCursor

    stats = CollectStats()
    manifest = Manifest()
    spool_dir = Path(work_dir) / SPOOL_DIR
    spool_dir.mkdir(parents=True, exist_ok=True)
    roots = log_roots()
    files = []
    for path in iter_log_files(roots, [Path(settings.UPLOADS_DIR) / "reports"], stats):
        if selected(path, roots, patterns or []):
            files.append(path)
        else:
            stats.not_selected += 1
    cursors = {c.path: c for c in LogCursor.objects.filter(path__in=files)}
    budget = max_bytes
    for index, path in enumerate(files):
        stats.files += 1
        if budget <= 0:
            stats.budget_exhausted = 1
            break
        try:
            entry = _collect_one(path, index, spool_dir, cursors, budget, max_line, stats)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
            # Unreadable now (permissions, a .gz still being written): no cursor move, retried next run.
            stats.unreadable += 1
            continue
        if entry is None:
            continue
        manifest.entries.append(entry)
        consumed = entry.end - entry.start
        budget -= consumed
        stats.bytes += consumed
        stats.lines += entry.lines
        stats.files_read += int(entry.lines > 0)
    if budget <= 0:
        stats.budget_exhausted = 1
    return manifest, stats


def _collect_one(
    path: str,
    index: int,
    spool_dir: Path,
    cursors: dict[str, Any],
    budget: int,
    max_line: int,
    stats: CollectStats,
) -> Entry | None:
    stream, st, is_gzip = _open(path)
    with stream:
        head = stream.read(HEAD_BYTES)
        if b"\x00" in head:
            stats.binary_skipped += 1
            return None
        start, expected = _plan_start(path, st, head, is_gzip, cursors, stats)
        cursor = cursors.get(path)
        if (
            cursor is not None
            and is_gzip
            and expected is not None
            and cursor.inode == st.st_ino
            and cursor.size == st.st_size
            and start == cursor.offset
        ):
            return None  # an unchanged .gz: nothing new, and no need to decompress it again
        stream.seek(start)
        spool_name = f"{index}.log"
        lines = consumed = 0
        with open(spool_dir / spool_name, "w", encoding="utf-8") as spool:
            for line, size, was_cut in read_lines(
                stream, budget=budget, max_line=max_line, complete_tail=is_gzip
            ):
                spool.write(line.decode("utf-8", errors="replace").replace("\n", " ") + "\n")
                lines += 1
                consumed += size
                stats.long_lines += int(was_cut)
    head_len = len(head)
    entry = Entry(
        path=path,
        spool=spool_name,
        inode=st.st_ino,
        size=st.st_size,
        start=start,
        end=start + consumed,
        head_hash=_sha(head),
        head_len=head_len,
        lines=lines,
        expected=expected,
    )
    if (
        expected is not None
        and expected == [entry.inode, entry.end, entry.head_hash]
        and cursor.size == st.st_size
    ):
        return None  # nothing changed
    return entry


def write_manifest(work_dir: str, manifest: Manifest) -> None:
    with open(Path(work_dir) / MANIFEST, "w", encoding="utf-8") as fh:
        json.dump([asdict(entry) for entry in manifest.entries], fh)


def read_manifest(work_dir: str) -> list[Entry]:
    with open(Path(work_dir) / MANIFEST, encoding="utf-8") as fh:
        return [Entry(**item) for item in json.load(fh)]


def collect(ctx: TaskContext) -> dict[str, Any]:
    manifest, stats = collect_files(
        work_dir=ctx.work_dir,
        max_bytes=int(getattr(settings, "LOG_TRIAGE_MAX_BYTES_PER_RUN", DEFAULT_MAX_BYTES_PER_RUN)),
        max_line=int(getattr(settings, "LOG_TRIAGE_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES)),
        patterns=ctx.params.get("files"),
    )
    write_manifest(ctx.work_dir, manifest)
    return asdict(stats)
