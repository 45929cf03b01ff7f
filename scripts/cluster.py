#!/usr/bin/env python
"""Several hosts for real (issue 18): a cluster on network namespaces, with partitions, slow links,
skewed clocks and node crashes from a seeded driver, checked from PostgreSQL and /proc.

    sudo .venv/bin/python scripts/cluster.py --minutes 20 --seed 1 --report docs/cluster-runs/x.json
    sudo .venv/bin/python scripts/cluster.py --minutes 2.5 --seed 3     # the CI form (tests/cluster/)

Root only (ip netns, iptables, tc). It builds, with iproute2, one network namespace per host, each joined
by a veth pair to a bridge in the root namespace (which is where this driver talks from):

- `db`: a PostgreSQL cluster of its own (initdb in a temp dir, the machine's binaries) and a Redis, both
  listening on the db host's own address only;
- `n1`, `n2`, `n3`: each runs one `manage.py run_scheduler` and one `manage.py run_worker` against the db
  host's address; `n1` runs the web (gunicorn) too. Nothing listens on 127.0.0.1 of the root namespace.

Names carry this run's id (its pid): namespaces `cbc-<pid>-<host>`, links `cbc<pid><host>`, and a free
10.231.X.0/24. A start first deletes what a crashed earlier run left (namespaces whose pid is dead, their
processes and links). Everything is torn down on exit, on a failure and on Ctrl-C/SIGTERM.

Through the web API it creates 300 schedules of the `sleep` job (the soak's mix: interval and cron, seven
timezones, every misfire and overlap policy, a per-job cap on a fifth, a global cap on all), then a seeded
driver applies, on at most `--parallel` nodes at a time (so one node always stays healthy):

- cut from PostgreSQL only, from Redis only, from both, isolated entirely (iptables DROP inside the node's
  namespace: packets vanish, connections hang as on a real partition), each for less than the claim TTL
  and the worker lease (`short`) and for 2.5 times the longer of them (`long`);
- a slow link: `tc netem` delay 50-500 ms and loss 1-10 %; where the kernel has no netem (this one has
  none), a token-bucket rate limit (`tc tbf`) for delay and an iptables `statistic` match for the loss;
- a skewed clock: the node's scheduler and worker restarted under libfaketime (`FAKETIME=+5m` or `-5m`),
  then restarted on the true clock;
- SIGKILL of every process in the node's namespace (a host crash), brought back 1.5 leases later;
- bursts of run-now through the web API.

Two samplers run meanwhile: /proc every 200 ms (every live task process group, attributed to the node whose
network namespace it is in: all namespaces share one /proc) and SQL every 100 ms. After the drain the
report checks: 0 duplicate slots, 0 lost slots (every slot of every schedule up to the cut-off has its
ScheduledRun: one healthy scheduler existed throughout, and the misfire grace is longer than any hand-over),
0 runs not terminal, 0 runs started twice (attempt > 1 in PostgreSQL, or one run's task in two process
groups in /proc), live task processes never above a cap at any sample, slot lag p50/p99 per node.
Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import soak  # noqa: E402  (the soak's schedule mix, slot and run checks)

from orchestrator.taskprocs import live_task_groups  # noqa: E402
from schedules.timing import ScheduleSpec  # noqa: E402
from tests.scheduler_support import PYTHON, postgres_bin_dir, postgres_os_user, redis_server_binary  # noqa: E402

PREFIX = "cbc"  # cyber brain cluster: namespaces cbc-<pid>-<host>, links cbc<pid><host>
DATABASE = soak.DATABASE  # soak.Sampler connects to it by this name; the server is ours alone
PG_PORT, REDIS_PORT, WEB_PORT = 5432, 6379, 9595
NODES = ("n1", "n2", "n3")
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
FAKETIME_SHIM = """import select, time


def _sleep(seconds, _select=select.select):
    if seconds > 0:
        _select([], [], [], seconds)


time.sleep = _sleep
"""
PARTITIONS = ("cut_db", "cut_redis", "cut_both", "isolate")


@dataclass
class Config:
    minutes: float = 20.0
    seed: int = 1
    schedules: int = 300
    parallel: int = 2  # nodes under a fault at once; at least one node always stays healthy
    concurrency: int = 3
    global_cap: int = 6
    job_cap: int = 2
    claim_ttl: float = 6.0
    lease: float = 8.0
    reaper: float = 2.0
    misfire_grace: float = 120.0  # longer than any hand-over: a late slot is still dispatched, not missed
    fault_gap: tuple[float, float] = (2.0, 8.0)
    slow_seconds: float = 30.0
    skew_seconds: float = 45.0
    burst_every: float = 20.0
    settle: float = 20.0
    drain: float = 300.0
    keep: bool = False


def sh(*argv: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def pid_alive(pid: int) -> bool:
    try:
        return "cluster" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def netns_pids(ns: str) -> list[int]:
    return [int(p) for p in sh("ip", "netns", "pids", ns, check=False).split()]


def kill_netns(ns: str) -> int:
    """SIGKILL every process in a namespace (a host losing power); returns how many there were."""
    pids = netns_pids(ns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def clean_stale(log=print) -> list[str]:
    """Delete the namespaces and links an earlier run left behind when it died without its teardown."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}-(\d+)-\w+", name)
        if match and not pid_alive(int(match.group(1))):
            kill_netns(name)
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    for line in sh("ip", "-o", "link", "show", check=False).splitlines():
        match = re.match(rf"\d+: ({PREFIX}(\d+)\w+)[@:]", line)
        if match and not pid_alive(int(match.group(2))):
            sh("ip", "link", "del", match.group(1), check=False)
            removed.append(match.group(1))
    for workdir in Path(tempfile.gettempdir()).glob(f"{PREFIX}-cluster-*"):
        match = re.match(rf"{PREFIX}-cluster-(\d+)-", workdir.name)
        if match and not pid_alive(int(match.group(1))) and not (workdir / "kept").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(str(workdir))
    if removed:
        log(f"[cluster] removed what a crashed run left: {removed}")
    return removed


class Net:
    """The hosts: one namespace each, a veth pair each to a bridge in the root namespace."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.bridge = f"{PREFIX}{run_id}br"
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.addr = {
            "db": f"{self.subnet}.2",
            **{n: f"{self.subnet}.{10 + i}" for i, n in enumerate(NODES, 1)},
        }
        self.created: list[str] = []
        self.netem = False

    @staticmethod
    def _free_subnet() -> str:
        used = sh("ip", "-o", "addr", "show", check=False) + sh("ip", "route", check=False)
        for x in range(os.getpid() % 200, os.getpid() % 200 + 250):
            candidate = f"10.231.{x % 250 + 1}"
            if f"{candidate}." not in used:
                return candidate
        raise RuntimeError("no free 10.231.X.0/24 for the cluster")

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{self.run_id}-{host}"

    def build(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.created.append(self.bridge)
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for host, address in self.addr.items():
            ns, veth = self.ns(host), f"{PREFIX}{self.run_id}{host}"
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            for cmd in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "addr", "add", f"{address}/24", "dev", "eth0"],
                ["ip", "link", "set", "eth0", "up"],
            ):
                sh("ip", "netns", "exec", ns, *cmd)
        self.netem = self._has_netem()

    def _has_netem(self) -> bool:
        ns = self.ns("n1")
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
            capture_output=True,
        )
        if done.returncode == 0:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root", check=False)
        return done.returncode == 0

    def inodes(self) -> dict[int, str]:
        """Network-namespace inode -> host: how a process in the shared /proc is put on its host."""
        return {os.stat(f"/run/netns/{self.ns(h)}").st_ino: h for h in self.addr}

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, *argv: str) -> None:
        sh(*self.exec_argv(host, list(argv)))

    def destroy(self) -> None:
        for name in reversed(self.created):
            if name == self.bridge:
                sh("ip", "link", "del", name, check=False)
            else:
                kill_netns(name)
                # The pair goes with its namespace only once the kernel frees it, which a socket left
                # in TIME_WAIT can put off: delete the root end now.
                sh("ip", "link", "del", f"{PREFIX}{self.run_id}{name.rsplit('-', 1)[1]}", check=False)
                sh("ip", "netns", "del", name, check=False)
        self.created.clear()

    # faults

    def partition(self, host: str, kind: str) -> None:
        """DROP inside the node's namespace, both directions, established connections included."""
        db = self.addr["db"]
        ports = {"cut_db": [PG_PORT], "cut_redis": [REDIS_PORT], "cut_both": [PG_PORT, REDIS_PORT]}
        if kind == "isolate":
            rules = [
                ["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"],
                ["-A", "INPUT", "-i", "eth0", "-j", "DROP"],
            ]
        else:
            rules = []
            for port in ports[kind]:
                rules.append(["-A", "OUTPUT", "-d", db, "-p", "tcp", "--dport", str(port), "-j", "DROP"])
                rules.append(["-A", "INPUT", "-s", db, "-p", "tcp", "--sport", str(port), "-j", "DROP"])
        for rule in rules:
            self.run(host, "iptables", *rule)

    def heal(self, host: str) -> None:
        self.run(host, "iptables", "-F")
        sh(*self.exec_argv(host, ["tc", "qdisc", "del", "dev", "eth0", "root"]), check=False)

    def slow(self, host: str, delay_ms: int, loss_pct: float) -> str:
        if self.netem:
            self.run(
                host,
                "tc",
                "qdisc",
                "add",
                "dev",
                "eth0",
                "root",
                "netem",
                "delay",
                f"{delay_ms}ms",
                "loss",
                f"{loss_pct}%",
            )
            return f"netem delay={delay_ms}ms loss={loss_pct}%"
        # No netem in this kernel: queueing delay from a narrow token bucket (a slow link), and loss
        # from iptables' statistic match, on both directions of the node's link.
        rate = max(64, int(4000 / (delay_ms / 50)))  # kbit/s: 50 ms -> 4 Mbit/s, 500 ms -> 400 kbit/s
        self.run(
            host,
            "tc",
            "qdisc",
            "add",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            f"{rate}kbit",
            "burst",
            "16kbit",
            "latency",
            f"{delay_ms}ms",
        )
        for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
            self.run(
                host,
                "iptables",
                "-A",
                chain,
                flag,
                "eth0",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                f"{loss_pct / 100:.3f}",
                "-j",
                "DROP",
            )
        return f"tbf rate={rate}kbit latency={delay_ms}ms + iptables loss={loss_pct}% (no netem)"


# --- processes ---------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    host: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    starts: int = 0
    skew: str = ""  # FAKETIME offset while the node runs with a skewed clock
    unexpected_exits: list[int] = field(default_factory=list)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=20)


class PG:
    """The db host's PostgreSQL, as soak's functions expect it (`connect`)."""

    def __init__(self, host: str) -> None:
        self.host = host

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(
            host=self.host, port=PG_PORT, user="postgres", dbname=dbname, connect_timeout=5
        )
        conn.autocommit = True
        return conn


class RedisOnDb:
    def __init__(self, host: str) -> None:
        self.host = host

    def client(self):
        import redis

        return redis.Redis(host=self.host, port=REDIS_PORT, socket_timeout=5)


class Cluster:
    """The hosts, their servers and processes; the soak's functions take it where they take a System."""

    def __init__(self, config: Config, workdir: Path, log=print) -> None:
        self.config = config
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.net = Net(os.getpid())
        self.pg = PG(self.net.addr["db"])
        self.redis = RedisOnDb(self.net.addr["db"])
        self.procs: dict[str, Proc] = {}
        self.env: dict[str, str] = {}
        self.token = ""
        self._torn_down = False

    # servers on the db host

    def start_db_host(self) -> None:
        db = self.net.addr["db"]
        bindir = postgres_bin_dir()
        user = postgres_os_user()
        pgdir = self.workdir / "pg"
        pgdir.mkdir()
        shutil.chown(pgdir, user, user)
        as_pg = ["runuser", "-u", user, "--"]
        sh(
            *as_pg,
            str(bindir / "initdb"),
            "-D",
            str(pgdir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            timeout=180,
        )
        with open(pgdir / "data" / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.net.subnet}.0/24 trust\n")
        options = f"-p {PG_PORT} -k {pgdir} -c listen_addresses={db} -c fsync=off -c max_connections=200"
        sh(
            *self.net.exec_argv(
                "db",
                [
                    *as_pg,
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(pgdir / "data"),
                    "-l",
                    str(pgdir / "log"),
                    "-o",
                    options,
                    "-w",
                    "start",
                ],
            ),
            timeout=120,
        )
        redis_dir = self.workdir / "redis"
        redis_dir.mkdir()
        self.add(
            "redis",
            "db",
            [
                redis_server_binary(),
                "--bind",
                db,
                "--port",
                str(REDIS_PORT),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(redis_dir),
            ],
        )
        soak.wait_until(self._redis_up, 30, "Redis on the db host")
        conn = self.pg.connect()
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {DATABASE}")
        conn.close()
        url = f"redis://{db}:{REDIS_PORT}/0"
        env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "LD_PRELOAD", "FAKETIME"}}
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "project.settings",
                "SECRET_KEY": secrets.token_urlsafe(40),
                "DEBUG": "0",
                "ALLOWED_HOSTS": self.net.addr["n1"],
                "POSTGRES_HOST": db,
                "POSTGRES_PORT": str(PG_PORT),
                "POSTGRES_DB": DATABASE,
                "POSTGRES_USER": "postgres",
                "POSTGRES_PASSWORD": "",
                "REDIS_URL": url,
                "CELERY_BROKER_URL": url,
                "SCHEDULER_MAX_GLOBAL": str(self.config.global_cap),
                "WORKER_LEASE_SECONDS": str(self.config.lease),
                "WORKER_REAPER_INTERVAL_SECONDS": str(self.config.reaper),
                "WORKER_THROTTLE_BASE_SECONDS": "0.5",
                "WORKER_THROTTLE_MAX_SECONDS": "3",
                "WORKER_HARD_LIMIT_GRACE_SECONDS": "5",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env = env
        self.manage("n1", "migrate", "--no-input")
        self.token = self.manage("n1", "create_api_token", "cluster").strip().splitlines()[-1]

    def _redis_up(self) -> bool:
        try:
            client = self.redis.client()
            return bool(client.ping())
        except Exception:
            return False

    def manage(self, host: str, *args: str) -> str:
        done = subprocess.run(
            self.net.exec_argv(host, [PYTHON, "manage.py", *args]),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    # processes

    def add(self, name: str, host: str, argv: list[str]) -> Proc:
        proc = Proc(name, host, argv)
        self.procs[name] = proc
        self.launch(proc)
        return proc

    def launch(self, proc: Proc) -> None:
        proc.starts += 1
        argv, env = list(proc.argv), dict(self.env)
        if proc.name.startswith("scheduler"):
            argv.append(f"--claimant=cluster-{proc.host}.{proc.starts}")
        if proc.skew:
            # The node's clock is off: every process it starts sees the skewed wall clock (monotonic
            # time is a host's own and stays true, as on a real host whose NTP is broken).
            env.update(
                LD_PRELOAD=str(FAKETIME_LIB),
                FAKETIME=proc.skew,
                FAKETIME_DONT_FAKE_MONOTONIC="1",
                PYTHONPATH=str(self.faketime_shim()),
            )
        with open(self.logs / f"{proc.name}.log", "ab") as log:
            proc.popen = subprocess.Popen(
                self.net.exec_argv(proc.host, argv),
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def faketime_shim(self) -> Path:
        """A `sitecustomize` for skewed processes: libfaketime 0.9.10 turns Python's `time.sleep` (an
        absolute `clock_nanosleep` on the monotonic clock) into EINVAL when the monotonic clock is not
        faked, and faking it hangs every timed wait instead. The shim sleeps with `select`, which the
        library leaves alone: a harness artifact, not the system's, so it must not show as failed runs."""
        shim = self.workdir / "faketime-shim"
        if not shim.exists():
            shim.mkdir()
            (shim / "sitecustomize.py").write_text(FAKETIME_SHIM)
        return shim

    def node_procs(self, host: str) -> list[Proc]:
        return [p for p in self.procs.values() if p.host == host]

    def start_node(self, host: str, *, scheduler: bool = True) -> None:
        """A node's processes: the web (on n1), the worker and, once the schedules exist, the scheduler."""
        if host == "n1" and "web" not in self.procs:
            gunicorn = str(Path(PYTHON).with_name("gunicorn"))
            self.add(
                "web",
                host,
                [
                    gunicorn,
                    "project.wsgi",
                    "--bind",
                    f"{self.net.addr['n1']}:{WEB_PORT}",
                    "--workers",
                    "2",
                    "--timeout",
                    "60",
                ],
            )
        self.add(
            f"worker-{host}",
            host,
            [
                PYTHON,
                "manage.py",
                "run_worker",
                "--concurrency",
                str(self.config.concurrency),
                "--hostname",
                f"{host}@%h",
            ],
        )
        if scheduler:
            self.start_scheduler(host)

    def start_scheduler(self, host: str) -> None:
        c = self.config
        self.add(
            f"scheduler-{host}",
            host,
            [
                PYTHON,
                "manage.py",
                "run_scheduler",
                "--interval=5",
                f"--claim-ttl={c.claim_ttl:g}",
                f"--misfire-grace={c.misfire_grace:g}",
                "--publish-grace=2",
                "--republish-after=10",
                "--republish-backlog-after=10",
            ],
        )

    def restart_node(self, host: str, skew: str = "") -> None:
        for proc in self.node_procs(host):
            if proc.name != "web":  # the web keeps the true clock: the node's scheduler and worker skew
                proc.kill()
                proc.skew = skew
                self.launch(proc)

    def crash_node(self, host: str) -> int:
        killed = kill_netns(self.net.ns(host))
        for proc in self.node_procs(host):
            with contextlib.suppress(subprocess.TimeoutExpired):
                if proc.popen is not None:
                    proc.popen.wait(timeout=20)
        return killed

    def boot_node(self, host: str) -> None:
        for proc in self.node_procs(host):
            self.launch(proc)

    def revive_dead(self, skip: set[str]) -> list[str]:
        """A process that died without being killed is a finding: record it and start it again."""
        revived = []
        for proc in self.procs.values():
            if proc.host in skip or proc.popen is None or proc.popen.poll() is None:
                continue
            proc.unexpected_exits.append(proc.popen.returncode)
            self.launch(proc)
            revived.append(proc.name)
        return revived

    def teardown(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
        self.net.destroy()  # every process left in a namespace (PostgreSQL, task processes) is killed
        for proc in self.procs.values():
            if proc.popen is not None:
                with contextlib.suppress(Exception):
                    proc.popen.wait(timeout=5)

    # API and SQL

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | list | None]:
        base = f"http://{self.net.addr['n1']}:{WEB_PORT}"
        return soak.api_request(base, self.token, method, path, body, timeout=10)

    def sql(self, statement: str, params: object = None) -> list[tuple]:
        conn = self.pg.connect(DATABASE)
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()


# --- what executes, per node, from /proc ---------------------------------------------------------------


class NodeProcSampler(threading.Thread):
    """Every 200 ms, the live task process groups of this cluster's nodes, read from the shared /proc.

    A group is put on a node by its leader's network namespace (`/proc/<pid>/ns/net`): a node's task
    processes are in the node's namespace whatever their parentage, and another engineer's processes on
    this machine are in none of ours. Samples keep the soak's shape, (monotonic, wall, ((run, job, task,
    pgid, node), ...)), so `soak.proc_report` reads them.
    """

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.inodes = cluster.net.inodes()
        self.samples: list[tuple[float, float, tuple]] = []
        self.failed_samples = 0
        self.node_of: dict[tuple[int, int, str], str | None] = {}
        self.max_per_node: dict[str, int] = dict.fromkeys(NODES, 0)
        self.stop_event = threading.Event()

    def host(self, group) -> str | None:
        key = (group.pgid, group.run_id, group.task)
        if key not in self.node_of:
            for pid in group.pids or [group.pgid]:
                try:
                    inode = os.stat(f"/proc/{pid}/ns/net").st_ino
                except OSError:
                    continue
                self.node_of[key] = self.inodes.get(inode)
                break
            else:
                return None
        return self.node_of[key]

    def latest(self) -> set[int]:
        return {g[0] for g in self.samples[-1][2]} if self.samples else set()

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            try:
                groups = [(g, self.host(g)) for g in live_task_groups().values()]
            except Exception:
                self.failed_samples += 1
                continue
            ours = tuple(sorted((g.run_id, g.job_key, g.task, g.pgid, h) for g, h in groups if h in NODES))
            per_node: dict[str, set[int]] = {}
            for run_id, _, _, _, host in ours:
                per_node.setdefault(host, set()).add(run_id)
            for host, runs in per_node.items():
                self.max_per_node[host] = max(self.max_per_node[host], len(runs))
            self.samples.append((time.monotonic(), time.time(), ours))

    def runs_on_two_nodes(self) -> list[dict]:
        """A run whose task executed on two nodes (at once or one after the other): executed twice."""
        nodes: dict[int, set[str]] = {}
        for _, _, groups in self.samples:
            for run_id, _, _, _, host in groups:
                nodes.setdefault(run_id, set()).add(host)
        return [{"run": r, "nodes": sorted(n)} for r, n in sorted(nodes.items()) if len(n) > 1]


class StuckTransactions(threading.Thread):
    """Every second, the sessions PostgreSQL holds `idle in transaction`, by the node they come from.

    A process killed on a host is seen to go at once (its kernel resets the connection). A host that is
    cut off, or frozen, sends nothing: the server keeps its transaction open, and its row locks, until
    TCP keepalive gives up on the connection (hours by default). This keeps the longest such hold seen.
    """

    SQL = """SELECT host(client_addr), extract(epoch FROM now() - state_change),
                    (SELECT count(*) FROM pg_locks l WHERE l.pid = a.pid AND l.mode LIKE '%%Exclusive%%')
               FROM pg_stat_activity a WHERE datname = %s AND state LIKE 'idle in transaction%%'"""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.node_of = {addr: host for host, addr in cluster.net.addr.items()}
        self.longest: dict[str, dict] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stop_event.wait(1.0):
            try:
                conn = conn or self.cluster.pg.connect(DATABASE)
                with conn.cursor() as cursor:
                    cursor.execute(self.SQL, [DATABASE])
                    rows = cursor.fetchall()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
                continue
            for addr, idle, locks in rows:
                host = self.node_of.get(addr, addr)
                if float(idle) > self.longest.get(host, {}).get("idle_s", 0.0):
                    self.longest[host] = {"idle_s": round(float(idle), 1), "exclusive_locks": locks}


# --- the fault driver --------------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    host: str
    began: float
    ends: float
    detail: str = ""


def fault_plan(rng: random.Random) -> list[str]:
    """Every fault once, in a seeded order; the driver cycles through reshuffled copies."""
    plan = [f"{p}:{length}" for p in PARTITIONS for length in ("short", "long")]
    plan += ["slow", "skew:+5m", "skew:-5m", "crash"]
    rng.shuffle(plan)
    return plan


class Driver:
    def __init__(self, cluster: Cluster, rng: random.Random, schedule_ids: list[int]) -> None:
        self.cluster = cluster
        self.rng = rng
        self.schedule_ids = schedule_ids
        c = cluster.config
        self.short = 0.5 * min(c.claim_ttl, c.lease)
        self.long = 2.5 * max(c.claim_ttl, c.lease)
        self.active: dict[str, Fault] = {}
        self.done: list[dict] = []
        self.counts: dict[str, int] = {}
        self.run_now_status: dict[str, int] = {}
        self.bursting: threading.Thread | None = None
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.started = time.monotonic()

    def at(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def note(self, text: str) -> None:
        self.events.append(f"{self.at()} {text}")
        self.cluster.log(f"[cluster] {self.at():7.1f}s {text}")

    def length(self, kind: str) -> float:
        name, _, arg = kind.partition(":")
        if name in PARTITIONS:
            return self.short if arg == "short" else self.long
        c = self.cluster.config
        return {"slow": c.slow_seconds, "skew": c.skew_seconds}.get(name, 1.5 * c.lease)

    def begin(self, kind: str, host: str) -> Fault:
        cluster, rng, now = self.cluster, self.rng, time.monotonic()
        name, _, arg = kind.partition(":")
        ends = now + self.length(kind)
        if name in PARTITIONS:
            cluster.net.partition(host, name)
            fault = Fault(kind, host, now, ends, f"{self.length(kind):.1f}s")
        elif name == "slow":
            detail = cluster.net.slow(host, rng.randint(50, 500), round(rng.uniform(1, 10), 1))
            fault = Fault(kind, host, now, ends, detail)
        elif name == "skew":
            cluster.restart_node(host, skew=arg)
            fault = Fault(kind, host, now, ends, f"FAKETIME={arg}")
        else:  # crash
            killed = cluster.crash_node(host)
            fault = Fault(kind, host, now, ends, f"{killed} processes SIGKILLed")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.active[host] = fault
        self.note(f"{host} {kind} begins {fault.detail}")
        return fault

    def end(self, fault: Fault) -> None:
        cluster = self.cluster
        name = fault.kind.partition(":")[0]
        if name in PARTITIONS or name == "slow":
            cluster.net.heal(fault.host)
        elif name == "skew":
            cluster.restart_node(fault.host)
        else:
            cluster.boot_node(fault.host)
        del self.active[fault.host]
        self.done.append(
            {
                "kind": fault.kind,
                "host": fault.host,
                "at_s": round(fault.began - self.started, 1),
                "seconds": round(time.monotonic() - fault.began, 1),
                "detail": fault.detail,
            }
        )
        self.note(f"{fault.host} {fault.kind} ends")

    def burst(self) -> None:
        """5-10 run-nows, in a thread of their own: an API on an isolated or crashed n1 hangs until the
        request times out, and the fault timeline must not wait for it. The schedules are drawn here, so
        the seed decides them whatever the threads' timing."""
        if self.bursting is not None and self.bursting.is_alive():
            self.note("burst skipped: the previous one is still waiting for the API")
            return
        ids = self.rng.sample(self.schedule_ids, k=self.rng.randint(5, 10))
        self.bursting = threading.Thread(target=self._run_now, args=(ids,), daemon=True)
        self.bursting.start()

    def _run_now(self, ids: list[int]) -> None:
        for sid in ids:
            status, _ = self.cluster.api("POST", f"/api/schedules/{sid}/run-now")
            with self.lock:
                self.run_now_status[str(status)] = self.run_now_status.get(str(status), 0) + 1

    def drive(self, seconds: float) -> None:
        c, rng = self.cluster.config, self.rng
        end = self.started + seconds
        plan: list[str] = []
        next_fault = self.started + rng.uniform(*c.fault_gap)
        next_burst = self.started + rng.uniform(0.3, 1.0) * c.burst_every
        while True:
            now = time.monotonic()
            for fault in [f for f in self.active.values() if f.ends <= now]:
                self.end(fault)
            if now >= end and not self.active:
                if self.bursting is not None:
                    self.bursting.join(timeout=120)
                break
            revived = self.cluster.revive_dead(
                skip={f.host for f in self.active.values() if f.kind == "crash"}
            )
            if revived:
                self.note(f"revived {revived} (died without being killed)")
            if now < end and now >= next_fault and len(self.active) < c.parallel:
                if not plan:
                    plan = fault_plan(rng)
                # The next planned fault that ends within the phase (the short ones fill its tail).
                fits = [k for k in plan if now + self.length(k) <= end + 1.0]
                if fits:
                    plan.remove(fits[0])
                    self.begin(fits[0], rng.choice([h for h in NODES if h not in self.active]))
                next_fault = now + rng.uniform(*c.fault_gap)
            if now < end and now >= next_burst:
                self.burst()
                next_burst = now + rng.uniform(0.7, 1.3) * c.burst_every
            time.sleep(0.2)


# --- the report --------------------------------------------------------------------------------------


DISPATCHED_LOG = re.compile(r"slot dispatched .*")
CLAIMANT_FIELD = re.compile(r"\bclaimant=cluster-(n\d)\.\d+")
RUN_ID_FIELD = re.compile(r"\brun_id=(\d+)")


def lags(values: list[float]) -> dict:
    return {
        "slots": len(values),
        "p50_s": round(soak.percentile(values, 0.5), 3),
        "p99_s": round(soak.percentile(values, 0.99), 3),
        "max_s": round(max(values), 3),
    }


def lag_by_node(cluster: Cluster) -> dict:
    """Slot lag per node, on the database clock. `dispatch`: the row's creation (`now()` in the slot
    INSERT) minus the slot, by the node whose scheduler dispatched it (its log line `slot dispatched
    claimant=... run_id=...`; the row does not record it). `start`: the run's start minus the slot, by
    the node whose worker executed it (dispatch, publish and any wait behind a cap included)."""
    dispatcher: dict[int, str] = {}
    for host in NODES:
        path = cluster.logs / f"scheduler-{host}.log"
        for line in DISPATCHED_LOG.findall(path.read_text(errors="replace") if path.exists() else ""):
            node, run_id = CLAIMANT_FIELD.search(line), RUN_ID_FIELD.search(line)
            if node and run_id:
                dispatcher[int(run_id.group(1))] = node.group(1)
    rows = cluster.sql(
        """SELECT sr.run_id, split_part(r.worker, '@', 1),
                  extract(epoch FROM sr.created_at - sr.scheduled_for),
                  extract(epoch FROM sr.started_at - sr.scheduled_for)
             FROM schedules_scheduledrun sr JOIN orchestrator_run r ON r.id = sr.run_id
            WHERE sr.trigger = 'schedule'"""
    )
    dispatch: dict[str, list[float]] = {}
    start: dict[str, list[float]] = {}
    for run_id, worker_node, dispatch_lag, start_lag in rows:
        dispatch.setdefault(dispatcher.get(run_id, "?"), []).append(float(dispatch_lag))
        if start_lag is not None:
            start.setdefault(worker_node or "?", []).append(float(start_lag))
    return {
        node: {
            "dispatch": lags(dispatch[node]) if node in dispatch else None,
            "start": lags(start[node]) if node in start else None,
        }
        for node in sorted(set(dispatch) | set(start))
    }


def fewest_schedulers_reaching_postgres(applied: list[dict]) -> int:
    """The fewest nodes whose scheduler could reach PostgreSQL at any instant of the fault phase.

    Faults are [at_s, at_s + seconds) rounded to 0.1 s, and the driver starts one on a node only after
    the last ended: an end and a start less than 0.2 s apart are taken as one after the other."""
    cut = [f for f in applied if f["kind"].partition(":")[0] in {"cut_db", "cut_both", "isolate", "crash"}]
    edges = sorted([(f["at_s"], 1) for f in cut] + [(f["at_s"] + f["seconds"] - 0.2, -1) for f in cut])
    down = most = 0
    for _, step in edges:
        down += step
        most = max(most, down)
    return len(NODES) - most


def report_of(
    cluster: Cluster, driver: Driver, procs: NodeProcSampler, sampler, stuck, initial, cutoff, began
) -> dict:
    config = cluster.config

    def at(t: float) -> float:
        return round(t - driver.started, 1)

    on_proc = soak.proc_report(cluster, procs, config, at)
    slots = soak.slot_report(cluster, initial, cutoff.astimezone(UTC))
    (duplicates,) = cluster.sql(
        """SELECT count(*) FROM (SELECT 1 FROM schedules_scheduledrun WHERE trigger = 'schedule'
            GROUP BY schedule_id, scheduled_for HAVING count(*) > 1) d"""
    )[0]
    slots["slots_duplicated"] = duplicates
    runs = soak.run_report(cluster)
    (restarted,) = cluster.sql("SELECT count(*) FROM orchestrator_run WHERE attempt > 1")[0]
    runs["runs_started_twice_sql"] = restarted
    on_two = procs.runs_on_two_nodes()
    for key in ("schedules_run_concurrently", "schedules_run_concurrently_examples"):
        slots[key] = on_proc.pop(key)
    for key in (
        "runs_executed_twice",
        "runs_executed_twice_examples",
        "runs_lost_while_executing",
        "runs_lost_while_executing_examples",
    ):
        runs[key] = on_proc.pop(key)
    runs["runs_on_two_nodes"] = len(on_two)
    runs["runs_on_two_nodes_examples"] = on_two[:10]
    on_proc["max_running_per_node"] = procs.max_per_node
    # With at most `parallel` (< 3) nodes under a fault, at least one scheduler reaches PostgreSQL at
    # every instant, so every slot up to the cut-off must have its row, whatever its misfire policy.
    slots["fewest_schedulers_reaching_postgres"] = fewest_schedulers_reaching_postgres(driver.done)
    report = {
        "config": {
            **config.__dict__,
            "netem": cluster.net.netem,
            "short_fault_s": driver.short,
            "long_fault_s": driver.long,
        },
        "slots": slots,
        "runs": runs,
        "slot_lag_by_node": lag_by_node(cluster),
        "caps": {
            "caps": soak.caps_of(config),
            "sql": soak.sql_cap_report(sampler, config, at),
            "proc": on_proc,
        },
        "faults": {"counts": driver.counts, "applied": driver.done, "run_now_status": driver.run_now_status},
        "timeline": driver.events,
        "idle_in_transaction_longest": stuck.longest,
        "unexpected_exits": {n: p.unexpected_exits for n, p in cluster.procs.items() if p.unexpected_exits},
        "wall_s": round(time.monotonic() - began, 1),
    }
    report["problems"] = verdict(report)
    return report


def verdict(report: dict) -> list[str]:
    problems = []
    slots, runs, caps = report["slots"], report["runs"], report["caps"]
    checks = [
        (slots["slots_duplicated"], "duplicate slots"),
        (slots["slots_lost"], f"lost slots {slots['lost_examples']}"),
        (slots["slots_unexpected"], "slots at times the schedule does not have"),
        (
            slots["schedules_run_concurrently"],
            "schedules (overlap not allow) with two runs executing at once"
            f" {slots['schedules_run_concurrently_examples']}",
        ),
        (runs["not_terminal"], f"runs not terminal after the drain {runs['not_terminal_examples']}"),
        (runs["runs_started_twice_sql"], "runs started twice (attempt > 1)"),
        (runs["runs_executed_twice"], f"runs executed twice (/proc) {runs['runs_executed_twice_examples']}"),
        (runs["runs_on_two_nodes"], f"runs executed on two nodes {runs['runs_on_two_nodes_examples']}"),
        (
            runs["runs_lost_while_executing"],
            f"runs marked 'worker lost' while executing {runs['runs_lost_while_executing_examples']}",
        ),
        (runs["scheduled_runs_without_run"], "scheduled runs without a run"),
    ]
    problems += [f"{n} {what}" for n, what in checks if n]
    if slots["fewest_schedulers_reaching_postgres"] < 1:
        problems.append("a moment with no scheduler reaching PostgreSQL: the lost-slot check assumes one")
    for scope, cap in caps["caps"].items():
        seen = caps["proc"]["max_running"][scope]
        if seen > cap:
            problems.append(
                f"{scope} cap {cap} exceeded (/proc): {seen} {caps['proc']['over_cap_samples'].get(scope)}"
            )
    if caps["proc"]["samples"] < 100 or not caps["proc"]["samples_with_runs"]:
        problems.append(f"/proc sampler saw too little: {caps['proc']['samples']} samples")
    if report["unexpected_exits"]:
        problems.append(f"processes died without being killed: {report['unexpected_exits']}")
    server_errors = {
        k: v for k, v in report["faults"]["run_now_status"].items() if k.startswith("5") and k != "503"
    }
    if server_errors:
        problems.append(f"the API answered with server errors: {server_errors}")
    if not report["faults"]["run_now_status"].get("202"):
        problems.append("no run-now was accepted")
    return problems


# --- main --------------------------------------------------------------------------------------------


def run_cluster(config: Config, log=print) -> dict:
    if os.geteuid() != 0:
        raise SystemExit("scripts/cluster.py needs root (ip netns, iptables, tc)")
    for tool in ("ip", "iptables", "tc"):
        if not shutil.which(tool):
            raise SystemExit(f"scripts/cluster.py needs {tool} (iproute2/iptables)")
    clean_stale(log)
    rng = random.Random(config.seed)
    workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-cluster-{os.getpid()}-"))
    os.chmod(workdir, 0o755)
    cluster = Cluster(config, workdir, log)
    atexit.register(cluster.teardown)
    began = time.monotonic()
    try:
        cluster.net.build()
        log(f"[cluster] hosts {cluster.net.addr} (netem {'yes' if cluster.net.netem else 'absent'})")
        cluster.start_db_host()
        for host in NODES:
            cluster.start_node(host, scheduler=False)
        soak.wait_until(lambda: cluster.api("GET", "/api/health/")[0] == 200, 120, "the web to answer")
        for host in NODES:
            path = cluster.logs / f"worker-{host}.log"
            soak.wait_until(
                lambda p=path: "ready" in p.read_text(errors="replace"), 120, f"worker {host} ready"
            )
        soak.create_schedules(cluster, soak.schedule_bodies(config.schedules, rng, config.job_cap), rng)
        initial = {
            sid: (ScheduleSpec(kind, minutes, cron or "", tz), first)
            for sid, kind, minutes, cron, tz, first in cluster.sql(
                """SELECT id, schedule_type, interval_minutes, cron_expr, timezone, next_run_at
                     FROM schedules_schedule"""
            )
        }
        procs = NodeProcSampler(cluster)
        procs.start()
        sampler = soak.Sampler(cluster)
        sampler.start()
        stuck = StuckTransactions(cluster)
        stuck.start()
        for host in NODES:
            cluster.start_scheduler(host)
        log(f"[cluster] {len(initial)} schedules; faults for {config.minutes:g} min (seed {config.seed})")
        driver = Driver(cluster, rng, sorted(initial))
        driver.drive(config.minutes * 60)
        time.sleep(config.settle)
        (cutoff,) = cluster.sql(
            "WITH off AS (UPDATE schedules_schedule SET enabled = false RETURNING 1) SELECT now()"
        )[0]
        cutoff -= timedelta(seconds=config.settle)
        try:
            soak.wait_until(
                lambda: not cluster.sql(soak.UNFINISHED_SQL), config.drain, "every run to end", 1.0
            )
        except RuntimeError as exc:
            log(f"[cluster] {exc}")
        for thread in (sampler, procs, stuck):
            thread.stop_event.set()
            thread.join(timeout=10)
        return report_of(cluster, driver, procs, sampler, stuck, initial, cutoff, began)
    finally:
        cluster.teardown()
        if config.keep:
            (workdir / "kept").touch()  # asked for: not a crashed run's leftovers
            log(f"[cluster] logs kept in {cluster.logs}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _exit_on_signal(signum, frame):  # Ctrl-C, SIGTERM, SIGHUP: unwind through the finally blocks
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    parser.add_argument("--minutes", type=float, default=d.minutes, help="fault phase (min)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--schedules", type=int, default=d.schedules)
    parser.add_argument("--parallel", type=int, default=d.parallel, help="nodes under a fault at once (< 3)")
    parser.add_argument("--drain", type=float, default=d.drain, help="longest wait for runs to end (s)")
    parser.add_argument("--report", type=Path, help="also write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the process logs")
    args = parser.parse_args(argv)
    config = Config(
        minutes=args.minutes,
        seed=args.seed,
        schedules=args.schedules,
        parallel=min(args.parallel, len(NODES) - 1),
        drain=args.drain,
        keep=args.keep,
    )
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    report = run_cluster(config)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text + "\n")
    if report["problems"]:
        print("CLUSTER FAILED:\n- " + "\n- ".join(report["problems"]), file=sys.stderr)
        return 1
    print("CLUSTER OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
