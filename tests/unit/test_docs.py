"""Issue 31.6: README and docs/ stand on their own: no reference to a file outside the repository or to
the sections of one, and every relative link points at a file (and heading) that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A design document outside the repository, its section numbers, or the shared folder it lived in.
EXTERNAL = re.compile(
    r"\bDESIGN(?:\.md)?\b|\bSTYLE\.md\b|shared/|\bseed/|phase2-scheduler|the seed's|"
    r"\.\./(?!samples/|docs/|README\.md)"  # a relative path climbing out of the repository
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        [
            "git",
            "ls-files",
            "*.py",
            "*.sh",
            "*.md",
            "*.yml",
            "*.toml",
            "Makefile",
            "Procfile",
            ".env.example",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [
        ROOT / name
        for name in listed
        if "-runs/" not in name and name != Path(__file__).relative_to(ROOT).as_posix()
    ]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_cite_no_file_outside_the_repository(path):
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if EXTERNAL.search(line)
    ]
    assert not found, "\n".join(found)


def test_code_comments_cite_no_design_file_outside_the_repository():
    pattern = re.compile(r"\bDESIGN(?:\.md)?\b|\bSTYLE\.md\b|shared/(?:DESIGN|STYLE|seed)")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
            continue
        if not linked.is_relative_to(ROOT):
            broken.append(f"{target}: outside the repository")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, "\n".join(broken)
