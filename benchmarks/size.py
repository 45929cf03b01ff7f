"""Size of the run path, now and at a git revision, and the private names of dependencies still used
(issue 30, "Size").

    .venv/bin/python -m benchmarks.size                       # against 5f9284c (before issue 30)
    .venv/bin/python -m benchmarks.size --rev HEAD~3 --json /tmp/size.json
    .venv/bin/python -m benchmarks.size --path orchestrator/forkserver.py   # one more file of the path

Lines, per file and in all, for the run path (`RUN_PATH`, plus `--path`): raw lines; code lines
(non-blank, not only a comment: what `tokenize` finds a token on, so a `#` inside a string is code); and
code lines without docstrings. The current tree is read from disk (uncommitted work included), the
revision with `git show REV:path`. A path missing on one side counts 0 there and is named.

Private names: an AST scan of the production code (every package of the project but tests/ and
benchmarks/, and manage.py) for names beginning with one underscore (dunders excluded) of Django,
Celery, kombu, django-celery-results or drf-spectacular:

- attributed: `pkg._name` / `x._name` where `x` was imported from one of them, `from pkg import _name`,
  and imports of a private module (`from celery.utils._x import y`);
- in subclasses of their classes: `super()._name(...)`, `self._name` that our code never defines, and
  `def _name` (an override of a private hook, when the base has one: check);
- candidates: `obj._name` on any other object, and `getattr(obj, "_name")`, where our own code never
  defines `_name` (no def, class, assignment or attribute of that name anywhere in production code):
  most are dependencies' attributes reached through a value (`connection.connection._x`), for a human
  to judge. Internal names without an underscore (e.g. SQL compiler methods) are not found by this scan.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import io
import json
import os
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT

RUN_PATH = (
    "worker/",
    "orchestrator/template.py",
    "orchestrator/taskrunner.py",
    "schedules/runstate.py",
    "schedules/runleases.py",
)
BASELINE_REV = "5f9284c"
PACKAGES = ("django", "celery", "kombu", "django_celery_results", "drf_spectacular")
NOT_PRODUCTION = ("tests", "benchmarks", "scripts", "docs", "samples", "requirements")


# --- lines ----------------------------------------------------------------------------------------


@dataclass
class Lines:
    raw: int = 0
    code: int = 0
    code_no_docstrings: int = 0

    def add(self, other: Lines) -> None:
        self.raw += other.raw
        self.code += other.code
        self.code_no_docstrings += other.code_no_docstrings


def count_lines(source: str) -> Lines:
    raw = len(source.splitlines())
    code: set[int] = set()
    skip = {
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENDMARKER,
    }
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type not in skip:
                code.update(range(tok.start[0], tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        code = {
            i + 1
            for i, line in enumerate(source.splitlines())
            if line.strip() and not line.strip().startswith("#")
        }
    docstrings: set[int] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    if isinstance(body[0].value.value, str):
                        docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return Lines(raw=raw, code=len(code), code_no_docstrings=len(code - docstrings))


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def files_now(paths: list[str]) -> dict[str, str]:
    out = {}
    for path in paths:
        target = ROOT / path
        if path.endswith("/") or target.is_dir():
            for file in sorted(target.rglob("*.py")):
                if "__pycache__" not in file.parts:
                    out[str(file.relative_to(ROOT))] = file.read_text()
        elif target.exists():
            out[path] = target.read_text()
    return out


def files_at(rev: str, paths: list[str]) -> dict[str, str]:
    listed = _git("ls-tree", "-r", "--name-only", rev, "--", *paths).split()
    return {name: _git("show", f"{rev}:{name}") for name in listed if name.endswith(".py")}


def size_report(rev: str, paths: list[str]) -> dict:
    now, then = files_now(paths), files_at(rev, paths)
    rows, totals = [], {"now": Lines(), "rev": Lines()}
    for name in sorted(set(now) | set(then)):
        a = count_lines(then[name]) if name in then else None
        b = count_lines(now[name]) if name in now else None
        if a:
            totals["rev"].add(a)
        if b:
            totals["now"].add(b)
        rows.append({"file": name, "rev": a.__dict__ if a else None, "now": b.__dict__ if b else None})
    t_rev, t_now = totals["rev"], totals["now"]

    def change(x: int, y: int) -> float | None:
        return round(100 * (y - x) / x, 1) if x else None

    return {
        "rev": rev,
        "rev_commit": _git("rev-parse", "--short", rev).strip(),
        "paths": paths,
        "files": rows,
        "total_rev": t_rev.__dict__,
        "total_now": t_now.__dict__,
        "change_pct": {
            "raw": change(t_rev.raw, t_now.raw),
            "code": change(t_rev.code, t_now.code),
            "code_no_docstrings": change(t_rev.code_no_docstrings, t_now.code_no_docstrings),
        },
    }


# --- private names of dependencies ---------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package(module: str | None) -> str | None:
    head = (module or "").split(".", 1)[0]
    return head if head in PACKAGES else None


def production_files() -> list[Path]:
    files = [ROOT / "manage.py"]
    for child in sorted(ROOT.iterdir()):
        if child.is_dir() and child.name not in NOT_PRODUCTION and (child / "__init__.py").exists():
            files += [f for f in sorted(child.rglob("*.py")) if "__pycache__" not in f.parts]
    return [f for f in files if f.exists()]


def _our_names(trees: dict[Path, ast.AST]) -> set[str]:
    """Every name our own code defines: functions, classes, assigned names and attributes, arguments."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
    return names


def _root_name(node: ast.AST) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    else:
        parts.append("...")
    return ".".join(reversed(parts))


def _resolve(dotted: str):
    """The object a dotted path names (importing what it needs), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # any failure to import: cannot tell
            continue
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def _base_defines(bases: list[str], name: str) -> bool | None:
    """Whether one of the (dependency) base classes has `name`; None when none could be imported."""
    found = [b for b in (_resolve(d) for d in bases) if b is not None]
    if not found:
        return None
    return any(hasattr(b, name) for b in found)


def private_uses() -> list[dict]:
    trees = {}
    for file in production_files():
        try:
            trees[file] = ast.parse(file.read_text(), filename=str(file))
        except SyntaxError:
            continue
    ours = _our_names(trees)
    hits = []

    def hit(file: Path, node: ast.AST, kind: str, package: str | None, text: str) -> None:
        where = f"{file.relative_to(ROOT)}:{node.lineno}"
        hits.append({"where": where, "kind": kind, "package": package, "use": text})

    for file, tree in trees.items():
        imported: dict[str, str] = {}  # local name -> package, for the packages above
        paths: dict[str, str] = {}  # local name -> dotted path, for the packages above
        other: set[str] = set()  # local names imported from anything else (the standard library, ours)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    pkg = _package(alias.name)
                    if pkg is None:
                        other.add(local)
                        continue
                    imported[local] = pkg
                    paths[local] = alias.name if alias.asname else local
                    if any(_private(p) for p in alias.name.split(".")):
                        hit(file, node, "private module", pkg, f"import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                pkg = _package(node.module)
                if pkg is None:
                    other.update(alias.asname or alias.name for alias in node.names)
                    continue
                if any(_private(p) for p in node.module.split(".")):
                    hit(file, node, "private module", pkg, f"from {node.module} import ...")
                for alias in node.names:
                    imported[alias.asname or alias.name] = pkg
                    paths[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                    if _private(alias.name):
                        hit(file, node, "import", pkg, f"from {node.module} import {alias.name}")
        # Classes of ours whose bases come from the packages: (package, dotted paths of those bases).
        subclass_of: dict[ast.ClassDef, tuple[str, list[str]]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    root = _root_name(base)
                    if root in imported:
                        dotted = _dotted(base)
                        full = paths[root] + dotted[len(root) :]
                        pkg, bases = subclass_of.get(node, (imported[root], []))
                        subclass_of[node] = (pkg, [*bases, full])
        in_subclass: dict[ast.AST, tuple[str, list[str]]] = {}
        for cls, (pkg, bases) in subclass_of.items():
            for child in ast.walk(cls):
                in_subclass[child] = (pkg, bases)
            for item in cls.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and _private(item.name):
                    defined = _base_defines(bases, item.name)
                    if defined is None:
                        hit(file, item, "override? (base not importable)", pkg, f"{cls.name}.{item.name}")
                    elif defined:
                        hit(file, item, "override of a private method", pkg, f"{cls.name}.{item.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.ctx, ast.Load):
                root = _root_name(node.value)
                value = node.value
                is_super = (
                    isinstance(value, ast.Call)
                    and isinstance(value.func, ast.Name)
                    and value.func.id == "super"
                )
                if is_super:
                    if node in in_subclass and _base_defines(in_subclass[node][1], node.attr) is not False:
                        hit(file, node, "super() in a subclass", in_subclass[node][0], f"super().{node.attr}")
                elif root in ("self", "cls") and isinstance(value, ast.Name):
                    if node in in_subclass and node.attr not in ours:
                        pkg, bases = in_subclass[node]
                        if _base_defines(bases, node.attr) is not False:
                            hit(file, node, "inherited private", pkg, f"{root}.{node.attr}")
                elif root in imported:
                    hit(file, node, "attribute", imported[root], _dotted(node))
                elif node.attr == "_meta":
                    hit(file, node, "documented (Django's Model _meta API)", "django", _dotted(node))
                elif root in other and isinstance(value, ast.Name):
                    continue  # a module or name of the standard library or of ours (os._exit)
                elif node.attr not in ours:
                    hit(file, node, "candidate", None, _dotted(node))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and node.args[1].value not in ours
            ):
                text = f"{node.func.id}({_dotted(node.args[0])}, {node.args[1].value!r})"
                hit(file, node, "candidate", None, text)

    def key(h: dict) -> tuple:
        rank = 2 if h["kind"] == "candidate" else 1 if h["kind"].startswith("documented") else 0
        file, line = h["where"].rsplit(":", 1)
        return (rank, file, int(line))

    return sorted(hits, key=key)


def _setup_django() -> None:
    """Django configured (project settings), so that the dependencies' base classes can be imported and
    asked whether they define a name; without it overrides are listed as unverified."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    os.environ.setdefault("SECRET_KEY", "benchmark-only-secret-key")
    try:
        import django

        django.setup()
    except Exception as exc:
        print(f"(Django not set up: {exc}; overrides are not checked against their bases)", file=sys.stderr)


# --- report ---------------------------------------------------------------------------------------


def report(size: dict, privates: list[dict]) -> str:
    rev, now = size["total_rev"], size["total_now"]
    pct = size["change_pct"]

    def p(x):
        return "n/a" if x is None else f"{x:+.1f} %"

    lines = [
        f"### Size of the run path: {size['rev']} ({size['rev_commit']}) and now",
        "",
        "Paths: " + ", ".join(f"`{x}`" for x in size["paths"]),
        "",
        "| lines | before | now | change |",
        "|---|---|---|---|",
        f"| raw | {rev['raw']:,} | {now['raw']:,} | {p(pct['raw'])} |",
        f"| code (non-blank, non-comment) | {rev['code']:,} | {now['code']:,} | {p(pct['code'])} |",
        f"| code without docstrings | {rev['code_no_docstrings']:,} | {now['code_no_docstrings']:,} "
        f"| {p(pct['code_no_docstrings'])} |",
        "",
        "| file | raw before | raw now | code before | code now |",
        "|---|---|---|---|---|",
    ]
    for row in size["files"]:
        a, b = row["rev"] or {}, row["now"] or {}
        lines.append(
            f"| {row['file']} | {a.get('raw', '-')} | {b.get('raw', '-')} | {a.get('code', '-')} "
            f"| {b.get('code', '-')} |"
        )
    attributed = [h for h in privates if h["kind"] != "candidate" and not h["kind"].startswith("documented")]
    documented = [h for h in privates if h["kind"].startswith("documented")]
    candidates = [h for h in privates if h["kind"] == "candidate"]
    lines += ["", f"### Private names of {', '.join(PACKAGES)} used in production code", ""]
    lines.append(f"Attributed to those packages: {len(attributed)}.")
    lines += [f"- `{h['where']}` {h['kind']} ({h['package']}): `{h['use']}`" for h in attributed]
    lines += ["", f"Documented public APIs despite the underscore: {len(documented)}."]
    lines += [f"- `{h['where']}`: `{h['use']}`" for h in documented]
    lines += [
        "",
        f"Candidates (on a value of unknown origin; our code never defines the name): {len(candidates)}.",
    ]
    lines += [f"- `{h['where']}`: `{h['use']}`" for h in candidates]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rev", default=BASELINE_REV, help=f"git revision to compare with (default {BASELINE_REV})"
    )
    parser.add_argument("--path", action="append", default=[], help="another file or folder of the run path")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    size = size_report(args.rev, [*RUN_PATH, *args.path])
    _setup_django()
    privates = private_uses()
    print(report(size, privates))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "private_names": privates}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
