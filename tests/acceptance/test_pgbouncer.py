"""Behind PgBouncer in transaction pool mode (issue 15.6): scheduler, worker and web all through it.

A real PgBouncer (Debian's package) of the test's own, `pool_mode = transaction`, in front of the test
database, with fewer server connections than clients so transactions really share them. Everything
works through it; LISTEN takes its own direct connection (SCHEDULER_LISTEN_DATABASE_URL), and without
one, or with one that is no direct connection, the scheduler warns once and sleeps its --interval; the
scheduler's lock and statement timeouts hold per transaction and never leak to other clients.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
from pathlib import Path

import psycopg2
import pytest
from django.db import connection

from schedules.models import ScheduledRun
from tests.scheduler_support import PYTHON, REPO, Processes, free_port, make_schedule, sleep_job, sql
from tests.support import process_env, wait_for
from tests.webproc import api_token, start_web
from tests.workerproc import start_run_worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
)
LISTEN_WARNING = "LISTEN/NOTIFY does not work through this database connection"


class PgBouncer:
    """PgBouncer on a free port in front of the test database's server, run in the foreground."""

    def __init__(self, *, pool_size: int) -> None:
        db = connection.settings_dict
        self.user = db["USER"] or "postgres"
        self.dbname = db["NAME"]
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cb-pgbouncer-"))
        (self.dir / "userlist.txt").write_text(f'"{self.user}" "{db["PASSWORD"] or ""}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            textwrap.dedent(
                f"""\
                [databases]
                * = host={db["HOST"] or "127.0.0.1"} port={db["PORT"] or 5432}
                [pgbouncer]
                listen_addr = 127.0.0.1
                listen_port = {self.port}
                unix_socket_dir =
                auth_type = trust
                auth_file = {self.dir / "userlist.txt"}
                pool_mode = transaction
                default_pool_size = {pool_size}
                max_client_conn = 500
                logfile = {self.dir / "pgbouncer.log"}
                """
            )
        )
        # PgBouncer refuses to run as root: as the `postgres` OS user then (it owns the directory).
        self._as = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
            for path in self.dir.iterdir():
                shutil.chown(path, "postgres")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [*self._as, PGBOUNCER, str(self.dir / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._answers, timeout=30, interval=0.1, what="pgbouncer answering")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited:\n{self.log()[-2000:]}")
        try:
            self.connect().close()
            return True
        except psycopg2.OperationalError:
            return False

    def connect(self):
        conn = psycopg2.connect(
            host="127.0.0.1", port=self.port, user=self.user, dbname=self.dbname, connect_timeout=5
        )
        conn.autocommit = True
        return conn

    def log(self) -> str:
        path = self.dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _direct_url() -> str:
    db = connection.settings_dict
    return (
        f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"
    )


def _env(bouncer: PgBouncer, **extra: str) -> dict[str, str]:
    """A process's environment with its database through `bouncer` in transaction pooling mode."""
    return process_env(
        POSTGRES_PORT=str(bouncer.port), POSTGRES_HOST="127.0.0.1", DB_TRANSACTION_POOLING="1", **extra
    )


@pytest.fixture
def pgbouncer_installed() -> None:
    if PGBOUNCER is None:
        pytest.skip("pgbouncer is not installed (Debian package pgbouncer)")


@pytest.fixture
def bouncer(pgbouncer_installed):
    instance = PgBouncer(pool_size=3)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def _finished(scheduled_run_id: int) -> str | None:
    status = ScheduledRun.objects.get(pk=scheduled_run_id).status
    return status if status in {"succeeded", "failed"} else None


def test_pgbouncer__scheduler_worker_and_web_work_and_listen_falls_back_with_one_warning(
    bouncer, tmp_path, redis_client
):
    sleep_job()
    procs = Processes(_env(bouncer), tmp_path)
    web = worker = None
    try:
        worker = start_run_worker(tmp_path=tmp_path, env=_env(bouncer))
        web = start_web(_env(bouncer), tmp_path, token=api_token())
        # Listening on a direct connection: a change is picked up at once although --interval is 30.
        fast = procs.start("--interval", "30", env=_env(bouncer, SCHEDULER_LISTEN_DATABASE_URL=_direct_url()))
        wait_for(
            lambda: sql(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                " AND query = 'LISTEN schedules_wake' AND state = 'idle'"
            ),
            timeout=60,
            what="scheduler LISTENing on its direct connection",
        )
        status, created = web.call(
            "POST",
            "/api/schedules/",
            {
                "name": "pgb-scheduled",
                "job_key": "sleep",
                "custom_directive_text": "0.1",
                "schedule_type": "interval",
                "interval_minutes": 60,
            },
        )
        assert status == 201, created
        sql("UPDATE schedules_schedule SET next_run_at = now() WHERE id = %s", [created["id"]])
        scheduled = wait_for(
            lambda: ScheduledRun.objects.filter(schedule_id=created["id"], trigger="schedule").first(),
            timeout=15,
            what="slot dispatched on NOTIFY (well before the 30 s interval)",
        )
        status, run_now = web.call("POST", f"/api/schedules/{created['id']}/run-now")
        assert status == 202, run_now
        for scheduled_run_id in (scheduled.pk, run_now["id"]):
            assert (
                wait_for(lambda i=scheduled_run_id: _finished(i), timeout=90, what="run finished")
                == "succeeded"
            )
        status, history = web.call("GET", f"/api/schedules/{created['id']}/history")
        assert status == 200, history
        assert {row["status"] for row in history["results"]} == {"succeeded"}
        assert len(history["results"]) == 2
        assert LISTEN_WARNING not in procs.full_logs()
        procs.kill(fast)
        fast.wait(timeout=10)

        # No direct connection behind the pool, or a "direct" one that is PgBouncer again: one warning
        # each, and the --interval sleeps still dispatch what comes due.
        through_pool = f"postgres://{bouncer.user}@127.0.0.1:{bouncer.port}/{bouncer.dbname}"
        procs.start("--interval", "1")
        procs.start("--interval", "1", env=_env(bouncer, SCHEDULER_LISTEN_DATABASE_URL=through_pool))
        wait_for(lambda: procs.full_logs().count(LISTEN_WARNING) >= 2, timeout=60, what="both warn")
        later = make_schedule("pgb-polled")  # its NOTIFY reaches nobody: the next poll finds it
        polled = wait_for(
            lambda: ScheduledRun.objects.filter(schedule=later).first(), timeout=60, what="polled dispatch"
        )
        assert wait_for(lambda: _finished(polled.pk), timeout=90, what="polled run finished") == "succeeded"
        logs = procs.full_logs()
        assert logs.count(LISTEN_WARNING) == 2, logs[-4000:]
        assert "SCHEDULER_LISTEN_DATABASE_URL is not" in logs
        assert "never reached the listener" in logs
        assert "unsupported startup parameter" not in bouncer.log() + worker.log() + web.log() + logs
    finally:
        if worker is not None:
            worker.stop()
        if web is not None:
            web.stop()
        procs.stop_all()


_TIMEOUTS_SCRIPT = """
import django
django.setup()
from django.db import OperationalError, connection, transaction
from project.dbsession import apply_scheduler_timeouts

apply_scheduler_timeouts()
print("no server-side cursors", connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"))
with connection.cursor() as cursor:
    cursor.execute("SHOW lock_timeout")
    print("lock_timeout", cursor.fetchone()[0])
    cursor.execute("SHOW statement_timeout")
    print("statement_timeout", cursor.fetchone()[0])
    cursor.execute("SHOW idle_in_transaction_session_timeout")
    print("idle_in_transaction_session_timeout", cursor.fetchone()[0])
    try:
        with transaction.atomic():
            cursor.execute("UPDATE schedules_schedule SET name = name WHERE id = %s", [{schedule_id}])
        print("update done")
    except OperationalError as exc:
        print("update stopped", exc.__cause__.pgcode)
"""


def test_pgbouncer__the_schedulers_timeouts_hold_per_transaction_and_never_leak(pgbouncer_installed):
    # One server connection: every client's transactions share it, so a session SET would show.
    solo = PgBouncer(pool_size=1)
    solo.start()
    locker = psycopg2.connect(_direct_url())
    try:
        schedule = make_schedule("pgb-locked")
        with locker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM schedules_schedule WHERE id = %s FOR UPDATE", [schedule.pk])
        env = _env(
            solo,
            SCHEDULER_LOCK_TIMEOUT_MS="300",
            SCHEDULER_STATEMENT_TIMEOUT_MS="20000",
            SCHEDULER_IDLE_IN_TRANSACTION_TIMEOUT_MS="7000",
        )
        out = subprocess.run(
            [PYTHON, "-c", _TIMEOUTS_SCRIPT.replace("{schedule_id}", str(schedule.pk))],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.splitlines()
        assert "no server-side cursors True" in lines  # .iterator() would DECLARE past the transaction
        assert "lock_timeout 300ms" in lines
        assert "statement_timeout 20s" in lines
        assert "idle_in_transaction_session_timeout 7s" in lines
        assert "update stopped 55P03" in lines  # lock_not_available: it did not wait for the lock
        # Another client on the same server connection keeps PostgreSQL's defaults.
        other = solo.connect()
        with other.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone()[0] == "0"
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone()[0] == "0"
            cursor.execute("SHOW idle_in_transaction_session_timeout")
            assert cursor.fetchone()[0] == "0"
        other.close()
    finally:
        locker.rollback()
        locker.close()
        solo.stop()
