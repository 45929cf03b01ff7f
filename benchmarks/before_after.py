"""No-op runs before and after, in the same run (issue 30): benchmarks/e2e.py's no-op scenario from a git
worktree of an earlier commit and from this tree, one after the other, on the same machine and venv.

    .venv/bin/python -m benchmarks.before_after                                  # 5f9284c, 1,000 runs
    .venv/bin/python -m benchmarks.before_after --baseline-rev 5f9284c --noop-runs 50   # a smoke run
    .venv/bin/python -m benchmarks.before_after --repeat 3    # before, now, before, now, ...: medians

The earlier commit is checked out with `git worktree add --detach` under a temporary directory (removed
at the end) and its own benchmarks/e2e.py is run from there (`--only noop`), so each side runs its own
code and its own harness; both use this interpreter (the requirements of 5f9284c are installed here).
Each e2e run also times bare Celery no-op tasks on the same worker concurrency, which gives a yardstick
for the machine's load at that moment: the table shows runs/s, the yardstick and ours / bare for each
side, then now / before both raw and as the ratio of the two ours / bare figures. Issue 30's limit: the
simplification may cost at most 25 % of no-op throughput (now / before >= 0.75).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import PYTHON, ROOT

BASELINE_REV = "5f9284c"
LIMIT = 0.75


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def worktree(rev: str):
    """A detached worktree of `rev` in a temporary directory; removed (and pruned) on exit."""
    parent = Path(tempfile.mkdtemp(prefix="cb-baseline-"))
    tree = parent / "tree"
    _git("worktree", "add", "--detach", "--quiet", str(tree), rev)
    try:
        yield tree
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "remove", "--force", str(tree))
        shutil.rmtree(parent, ignore_errors=True)
        with contextlib.suppress(subprocess.CalledProcessError):
            _git("worktree", "prune")


def run_noop(tree: Path, runs: int, concurrency: int, redis_url: str | None, timeout: float) -> dict:
    """benchmarks/e2e.py --only noop from `tree`, with `tree` first on the path; its JSON figures."""
    out = Path(tempfile.mkstemp(prefix="cb-noop-", suffix=".json")[1])
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [PYTHON, "-m", "benchmarks.e2e", "--only", "noop", "--noop-runs", str(runs),
            "--concurrency", str(concurrency), "--json", str(out), "--no-report"]  # fmt: skip
    if redis_url:
        argv += ["--redis-url", redis_url]
    try:
        subprocess.run(argv, cwd=tree, env=env, check=True, timeout=timeout)
        results = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    noop, bare = results["noop"], results["bare"]
    return {
        "commit": results["meta"]["commit"],
        "runs": noop["runs"],
        "finished": noop["finished"],
        "done": noop["done"],
        "runs_per_s": noop["per_second"],
        "bare_tasks_per_s": bare["per_second"],
        "ours_over_bare": round(noop["per_second"] / bare["per_second"], 4) if bare["per_second"] else None,
        "cpu_ms_per_run": results.get("noop_cost", {}).get("per_run", {}).get("cpu_ms"),
    }


def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(before: list[dict], now: list[dict], rev: str) -> str:
    lines = [
        f"### No-op runs before ({rev}) and now, in the same run",
        "",
        "| tree | commit | runs/s | bare Celery tasks/s | ours / bare | CPU per run (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for label, rows in (("before", before), ("now", now)):
        for r in rows:
            flag = "" if r["done"] else f" (not finished: {r['finished']}/{r['runs']})"
            lines.append(
                f"| {label} | {r['commit']} | {r['runs_per_s']:.2f}{flag} | {r['bare_tasks_per_s']:.1f} | "
                f"{r['ours_over_bare']} | {r['cpu_ms_per_run']} |"
            )
    b, n = _median(before, "runs_per_s"), _median(now, "runs_per_s")
    bn, nn = _median(before, "ours_over_bare"), _median(now, "ours_over_bare")
    lines += ["", "| figure | value |", "|---|---|"]
    if b and n:
        ratio = n / b
        verdict = "within" if ratio >= LIMIT else "beyond"
        change = f"cost {100 * (1 - ratio):.1f} %" if ratio < 1 else f"gain {100 * (ratio - 1):.1f} %"
        lines.append(
            f"| now / before, runs/s{' (medians)' if len(before) > 1 else ''} | **{ratio:.3f}** "
            f"({change}, {verdict} the 25 % limit) |"
        )
    if bn and nn:
        lines.append(f"| now / before, each against bare Celery at its time | {nn / bn:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline-rev", default=BASELINE_REV, help=f"the commit before (default {BASELINE_REV})"
    )
    parser.add_argument("--noop-runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=2, help="pool processes of the worker (as e2e)")
    parser.add_argument("--repeat", type=int, default=1, help="alternate before and now this many times")
    parser.add_argument("--redis-url", help="passed to e2e (default: its private redis-server)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds each e2e run may take")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rev = _git("rev-parse", "--short", args.baseline_rev)
    before: list[dict] = []
    now: list[dict] = []
    with worktree(rev) as tree:
        for _ in range(max(1, args.repeat)):
            for rows, where in ((before, tree), (now, ROOT)):
                rows.append(run_noop(where, args.noop_runs, args.concurrency, args.redis_url, args.timeout))
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(report(before, now, rev))
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline_rev": rev, "before": before, "now": now}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
