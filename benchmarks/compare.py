"""`make bench`: ours and django-celery-beat side by side, the raw limits, and the ratios, in one run.

    .venv/bin/python -m benchmarks.compare              # the full run (about 15 minutes here)
    .venv/bin/python -m benchmarks.compare --quick      # 1,000 schedules only, for a smoke check
    .venv/bin/python -m benchmarks.compare --skip-e2e   # dispatch only (the execution figures take longest)
    .venv/bin/python -m benchmarks.compare --only mix,before-after,size   # issue 30's figures only
    .venv/bin/python -m benchmarks.compare --only pages --pages-runs 1000000   # issue 31.5's, at 1M runs

Issue 30's figures follow: the realistic mix (benchmarks/mix.py, about 50 minutes at full size), no-op
runs before and after against `--baseline-rev` (benchmarks/before_after.py) and the run path's size
(benchmarks/size.py). `--quick` scales the mix down to 40 + 20 schedules over 30 s of 1 to 5 s sleeps
and the no-op runs to 200. Last, every page timed at production size (benchmarks/pages.py: 100,000 schedules
and `--pages-runs`, default 10,000,000 runs, about 40 minutes to seed here; `--quick`: 2,000 and 100,000).

Prints Markdown tables (docs/BENCHMARKS.md holds the last run's) and writes every figure as JSON to
`.run/bench/` for later reading. Each side has its own database; both publish to the same Redis.
Then the execution figures, end to end (benchmarks/e2e.py, `--quick` there too), on their own Redis.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import before_after, e2e, mix, pages, size
from benchmarks import celery_beat_baseline as dcb
from benchmarks.common import PYTHON, ROOT


def _ours(sizes: str, idle_sizes: str, redis_url: str, out: Path) -> list[dict]:
    subprocess.run(
        [PYTHON, "-m", "benchmarks.dispatch", "--sizes", sizes, "--instances", "1,2", "--idle-sizes", idle_sizes,
         "--redis-url", redis_url, "--json", str(out)],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return json.loads(out.read_text())


def _raw(redis_url: str, runs: int) -> list[dict]:
    done = subprocess.run(
        [PYTHON, "-m", "benchmarks.raw_limits", "all", "--redis-url", redis_url, "--runs", str(runs)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _e2e(quick: bool, out: Path) -> dict:
    subprocess.run(
        [PYTHON, "-m", "benchmarks.e2e", *(["--quick"] if quick else []), "--json", str(out), "--no-report"],
        cwd=ROOT, check=True,
    )  # fmt: skip
    return json.loads(out.read_text())


def _mix(quick: bool, out: Path) -> dict:
    scale = ["--schedules", "40", "--window", "30", "--burst", "20", "--max-sleep", "5"] if quick else []
    subprocess.run(
        [PYTHON, "-m", "benchmarks.mix", *scale, "--json", str(out), "--no-report"], cwd=ROOT, check=True
    )
    return json.loads(out.read_text())


def _before_after(quick: bool, rev: str, out: Path) -> dict:
    runs = "200" if quick else "1000"
    subprocess.run(
        [PYTHON, "-m", "benchmarks.before_after", "--baseline-rev", rev, "--noop-runs", runs, "--json", str(out)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


def _size(rev: str, out: Path) -> dict:
    subprocess.run(
        [PYTHON, "-m", "benchmarks.size", "--rev", rev, "--json", str(out)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


def _pages(quick: bool, runs: int, out: Path) -> dict:
    scale = ["--schedules", "2000", "--runs", "100000"] if quick else ["--runs", str(runs)]
    subprocess.run(
        [PYTHON, "-m", "benchmarks.pages", *scale, "--json", str(out)],
        cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


PARTS = ("dispatch", "e2e", "mix", "before-after", "size", "pages")


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f}"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def _dispatch(args: argparse.Namespace, sizes: list[int], idle: list[int], out_dir: Path) -> None:
    """The dispatch and idle-tick figures, ours and django-celery-beat's, and the raw limits."""
    ours = _ours(",".join(map(str, sizes)), ",".join(map(str, idle)), args.redis_url, out_dir / "ours.json")
    theirs = []
    dcb.prepare(args.redis_url)
    for n in sizes:
        for instances in (1, 2):
            theirs.append(dcb.run_dispatch(n, instances, args.redis_url))
    theirs_idle = [dcb.run_idle(n, args.redis_url) for n in idle]
    raw = _raw(args.redis_url, runs=10 if args.quick else 20)
    (out_dir / "theirs.json").write_text(json.dumps(theirs + theirs_idle, indent=2))
    (out_dir / "raw.json").write_text(json.dumps(raw, indent=2))

    publish = next(r for r in raw if r.get("limit") == "celery publish")
    print("### Dispatch: N schedules due at the same instant\n")
    print("| N | instances | scheduler | all published (s) | lag p50 (s) | lag p99 (s) | CPU (s) | peak RSS (MB) "
          "| statements/slot | duplicates |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["n"], r["instances"]): r for r in theirs}
    for r in (x for x in ours if x["kind"] == "dispatch"):
        t = by_key.get((r["n"], r["instances"]), {})
        print(
            f"| {r['n']} | {r['instances']} | ours | {_fmt(r['all_published_s'])} | {_fmt(r['lag_p50_s'])} | "
            f"{_fmt(r['lag_p99_s'])} | {_fmt(r['cpu_seconds'])} | {_fmt(r['peak_rss_mb'])} | "
            f"{_fmt(r['statements_per_slot'])} | {r['duplicate_slots']} slots, {r['broker_duplicates']} msgs |"
        )
        print(
            f"| {r['n']} | {r['instances']} | django-celery-beat | {_fmt(t.get('seconds_to_all'))} | "
            f"{_fmt(t.get('lag_p50'))} | {_fmt(t.get('lag_p99'))} | {_fmt(t.get('cpu_seconds'))} | "
            f"{_fmt(t.get('peak_rss_mb'))} | {_fmt(t.get('statements_per_slot'))} | {t.get('duplicates')} msgs |"
        )
    print("\n### Idle tick: nothing due\n")
    print("| schedules | ours (ms) | ours statements | ours RSS (MB) | django-celery-beat (ms) | its statements "
          "| its RSS (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    their_idle = {r["n"]: r for r in theirs_idle}
    for r in (x for x in ours if x["kind"] == "idle"):
        t = their_idle.get(r["schedules"], {})
        print(
            f"| {r['schedules']} | {_fmt(r['idle_tick_ms_median'])} | {_fmt(r['statements_per_tick'])} | "
            f"{_fmt(r['peak_rss_mb'])} | {_fmt(t.get('tick_ms'))} | {_fmt(t.get('statements_per_tick'))} | "
            f"{_fmt(t.get('peak_rss_mb'))} |"
        )
    print("\n### Raw limits and worker figures\n")
    for r in raw:
        print(f"- {json.dumps(r)}")
    print("\n### Ratios\n")
    print("| figure | ratio |")
    print("|---|---|")
    for r in (x for x in ours if x["kind"] == "dispatch"):
        t = by_key.get((r["n"], r["instances"]), {})
        print(
            f"| {r['n']} due, {r['instances']} instance(s): django-celery-beat time / ours | "
            f"{_ratio(t.get('seconds_to_all'), r['all_published_s'])} |"
        )
        raw_seconds = r["n"] / publish["per_second"]
        print(
            f"| {r['n']} due, {r['instances']} instance(s): ours / raw publish time | "
            f"{_ratio(r['all_published_s'], raw_seconds)} |"
        )
    idle_rows = {r["schedules"]: r for r in ours if r["kind"] == "idle"}
    if max(idle) in idle_rows and min(idle) in idle_rows:
        hi, lo = idle_rows[max(idle)], idle_rows[min(idle)]
        print(
            f"| idle tick time {max(idle)} / {min(idle)} (ours) | "
            f"{_ratio(hi['idle_tick_ms_median'], lo['idle_tick_ms_median'])} |"
        )
        print(
            f"| idle tick statements {max(idle)} / {min(idle)} (ours) | "
            f"{_ratio(hi['statements_per_tick'], lo['statements_per_tick'])} |"
        )
        print(
            f"| idle RSS {max(idle)} / {min(idle)} (ours) | {_ratio(hi['peak_rss_mb'], lo['peak_rss_mb'])} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--skip-e2e", action="store_true", help="leave out the execution figures")
    parser.add_argument(
        "--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}"
    )
    parser.add_argument(
        "--baseline-rev", default=before_after.BASELINE_REV, help="the commit before issue 30 (no-op, size)"
    )
    parser.add_argument(
        "--pages-runs", type=int, default=10_000_000, help="runs over 100,000 schedules for the pages part"
    )
    args = parser.parse_args(argv)
    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    if parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    if args.skip_e2e:
        parts.discard("e2e")
    sizes = [1000] if args.quick else [1000, 10000]
    idle = [1000] if args.quick else [1000, 10000, 100000]
    out_dir = ROOT / ".run" / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    print(f"\n## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} on {platform.node()}")
    print(f"python {platform.python_version()}, {platform.machine()}\n", flush=True)
    if "dispatch" in parts:
        _dispatch(args, sizes, idle, out_dir)
    execution = _e2e(args.quick, out_dir / "e2e.json") if "e2e" in parts else None
    if execution is not None:
        print()
        print(e2e.report(execution), flush=True)
    if "mix" in parts:
        print()
        print(mix.report(_mix(args.quick, out_dir / "mix.json")), flush=True)
    if "before-after" in parts:
        result = _before_after(args.quick, args.baseline_rev, out_dir / "before_after.json")
        print()
        print(before_after.report(result["before"], result["now"], result["baseline_rev"]), flush=True)
    if "size" in parts:
        result = _size(args.baseline_rev, out_dir / "size.json")
        print()
        print(size.report(result["size"], result["private_names"]), flush=True)
    if "pages" in parts:
        print()
        print(pages.report(_pages(args.quick, args.pages_runs, out_dir / "pages.json")), flush=True)
    print(f"\nwall {time.time() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
