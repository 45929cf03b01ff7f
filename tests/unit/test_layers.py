"""Dependencies point one way (docs/ARCHITECTURE.md, "Code layout"): `orchestrator` <- `schedules` <-
`worker`, and `monitoring`
(which reads all three) is imported by none of them: the scheduler reaches it through a signal
(schedules/signals.py). Read from the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MAY_NOT_IMPORT = {
    "orchestrator": {"schedules", "worker", "monitoring"},
    "schedules": {"worker", "monitoring"},
    "worker": {"monitoring"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("app", sorted(MAY_NOT_IMPORT))
def test_layers__an_app_imports_nothing_above_it(app):
    banned = MAY_NOT_IMPORT[app]
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / app).rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] in banned
    ]
    assert wrong == []
