"""Alerts: evaluated by the scheduler's housekeeping, one row per (schedule, kind) while it holds,
notified to webhooks once per transition however many schedulers run.

Kinds (schedules.models.AlertKind):
- `missed` (dead-man): an enabled schedule's slot did not start within its grace: it was never
  dispatched, it was recorded as missed (scheduler down, misfire_policy skip), or its run is still
  waiting for a worker. Grace: `catchup_window_seconds`, else ALERT_MISSED_GRACE_SECONDS (plus jitter).
- `failing`: the schedule's last `alert_after_failures` finished runs all failed (0 = off), or its
  last `pause_after_failures` when that is lower.
- `overdue`: a run has been running longer than `alert_after_seconds` (null = off).

The same evaluation pauses schedules after `pause_after_failures` consecutive failed slots (PAUSE_SQL),
recording each pause in the schedule's change history (source `system`).

Several schedulers may evaluate at once; the database decides. Opening is an INSERT that the partial
unique constraint `alert_one_open_per_kind` turns into a no-op for an alert already open; resolving
is an UPDATE ... WHERE resolved_at IS NULL. A notification is claimed by a conditional UPDATE of
`notified_open_at` / `notified_resolved_at` (NULL -> now()): one instance wins each transition and
sends it, from a background thread with retries and backoff, so a slow webhook never delays dispatch.
A delivery that fails every attempt gives its claim back, and a later evaluation sends it again.

Alert rows and notifications hold counts, ids, names and times: never LLM text, error messages or
URLs (a webhook URL's path is often its secret; logs name only its host).

Where a webhook may point (project/outbound.py): public addresses only, unless its host is in
ALERT_WEBHOOK_ALLOWED_HOSTS; vetted again on every send (post_json), whatever was checked at save time.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlparse

from django.conf import settings
from django.core import checks
from django.db import connection, transaction
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from project import outbound
from project.background import BackgroundQueue

logger = logging.getLogger(__name__)

MISSED, FAILING, OVERDUE = "missed", "failing", "overdue"

# --- conditions: (schedule_id, details) of every schedule for which the kind holds now -------------

# Each condition first narrows the schedules to candidates through indexed sets (the due index, the
# status index, the unfinished-runs index), then looks at each candidate's latest rows: at 100,000
# schedules a look at every schedule's latest run would cost seconds per evaluation.
MISSED_SQL = """
WITH candidates AS (
    SELECT id FROM schedules_schedule
     WHERE enabled AND next_run_at < now() - make_interval(
             secs => coalesce(catchup_window_seconds, %(grace)s) + jitter_seconds)
    UNION
    SELECT schedule_id FROM schedules_scheduledrun
     WHERE status = 'skipped' AND trigger = 'schedule' AND error_summary LIKE 'missed%%'
    UNION
    SELECT schedule_id FROM schedules_scheduledrun
     WHERE status IN ('queued', 'throttled') AND trigger = 'schedule'
)
SELECT s.id, jsonb_build_object(
         'slot', coalesce(l.scheduled_for, s.next_run_at),
         'grace_seconds', coalesce(s.catchup_window_seconds, %(grace)s) + s.jitter_seconds,
         'reason', CASE WHEN s.next_run_at < now() - g.grace THEN 'not dispatched'
                        WHEN l.status = 'skipped' THEN 'recorded as missed'
                        ELSE 'not started' END,
         'scheduled_run_id', l.id)
  FROM candidates c
  JOIN schedules_schedule s ON s.id = c.id
 CROSS JOIN LATERAL (SELECT make_interval(secs => coalesce(s.catchup_window_seconds, %(grace)s)
                                                 + s.jitter_seconds) AS grace) g
  LEFT JOIN LATERAL (SELECT id, status, scheduled_for, error_summary FROM schedules_scheduledrun
                      WHERE schedule_id = s.id AND trigger = 'schedule'
                      ORDER BY scheduled_for DESC LIMIT 1) l ON true
 WHERE s.enabled
   AND (s.next_run_at < now() - g.grace
        OR (l.status = 'skipped' AND l.error_summary LIKE 'missed%%')
        OR (l.status IN ('queued', 'throttled') AND l.scheduled_for < now() - g.grace))
"""

# Only a schedule with a failed run in its history can be failing. The threshold is
# alert_after_failures, or pause_after_failures when that is lower (or the alert is off): a schedule
# that pauses itself always has a `failing` alert open, which its first success resolves.
FAILING_SQL = """
SELECT s.id, jsonb_build_object(
         'consecutive_failures', f.n, 'threshold', t.k,
         'last_run_id', f.last_run_id, 'last_finished_at', f.last_at)
  FROM schedules_schedule s
 CROSS JOIN LATERAL (SELECT least(nullif(s.alert_after_failures, 0), s.pause_after_failures) AS k) t
 CROSS JOIN LATERAL (
       SELECT count(*) AS n, count(*) FILTER (WHERE status = 'failed') AS failed,
              (array_agg(run_id ORDER BY scheduled_for DESC, id DESC))[1] AS last_run_id,
              max(finished_at) AS last_at
         FROM (SELECT id, status, run_id, scheduled_for, finished_at FROM schedules_scheduledrun
                WHERE schedule_id = s.id AND status IN ('succeeded', 'failed')
                ORDER BY scheduled_for DESC, id DESC LIMIT t.k) AS last) f
 WHERE t.k IS NOT NULL
   AND s.id IN (SELECT schedule_id FROM schedules_scheduledrun WHERE status = 'failed')
   AND f.n = t.k AND f.failed = f.n
"""

# pause_after_failures: an enabled schedule whose last N finished slots created since its last enable
# (failures_counted_since) all failed disables itself. A slot counts by its final status (succeeded
# or failed); skipped and cancelled slots neither count nor break the streak. One statement: the
# UPDATE re-checks `enabled` and the count's start on the row as it is when it gets the row lock, so
# of several schedulers evaluating at once one pauses it, and an enable (which moves
# failures_counted_since) that commits meanwhile is never undone by a pause evaluated before it.
PAUSE_SQL = """
WITH due AS (
    SELECT s.id, s.pause_after_failures AS n, s.failures_counted_since AS since,
           s.paused_note AS old_note, s.paused_at AS old_at, s.paused_by AS old_by
      FROM schedules_schedule s
     CROSS JOIN LATERAL (
           SELECT count(*) AS n, count(*) FILTER (WHERE status = 'failed') AS failed
             FROM (SELECT status FROM schedules_scheduledrun
                    WHERE schedule_id = s.id AND status IN ('succeeded', 'failed')
                      AND (s.failures_counted_since IS NULL OR created_at >= s.failures_counted_since)
                    ORDER BY scheduled_for DESC, id DESC LIMIT s.pause_after_failures) AS last) f
     WHERE s.enabled AND s.pause_after_failures IS NOT NULL
       AND s.id IN (SELECT schedule_id FROM schedules_scheduledrun WHERE status = 'failed')
       AND f.n = s.pause_after_failures AND f.failed = f.n
)
UPDATE schedules_schedule s
   SET enabled = false, paused_note = 'paused after ' || d.n || ' consecutive failures',
       paused_at = now(), paused_by = %(by)s, updated_at = now()
  FROM due d
 WHERE s.id = d.id AND s.enabled AND s.failures_counted_since IS NOT DISTINCT FROM d.since
RETURNING s.id, s.name, s.paused_note, s.paused_at, d.old_note, d.old_at, d.old_by
"""
# Who paused it, as paused_by and as the change's actor (a max_runs completion says the same).
PAUSED_BY = "scheduler"

OVERDUE_SQL = """
SELECT s.id, jsonb_build_object(
         'run_id', min(sr.run_id), 'scheduled_run_id', min(sr.id),
         'running_seconds', max(extract(epoch FROM now() - sr.started_at))::int,
         'threshold_seconds', s.alert_after_seconds)
  FROM schedules_schedule s
  JOIN schedules_scheduledrun sr ON sr.schedule_id = s.id AND sr.status = 'running'
 WHERE s.alert_after_seconds IS NOT NULL
   AND sr.started_at < now() - make_interval(secs => s.alert_after_seconds)
 GROUP BY s.id
"""

CONDITIONS = {MISSED: MISSED_SQL, FAILING: FAILING_SQL, OVERDUE: OVERDUE_SQL}

OPEN_SQL = """
INSERT INTO schedules_alert (schedule_id, kind, opened_at, details)
SELECT v.schedule_id, %(kind)s, now(), v.details
  FROM unnest(%(ids)s::bigint[], %(details)s::jsonb[]) AS v(schedule_id, details)
ON CONFLICT (schedule_id, kind) WHERE resolved_at IS NULL DO NOTHING
RETURNING id
"""

RESOLVE_SQL = """
UPDATE schedules_alert SET resolved_at = now()
 WHERE kind = %(kind)s AND resolved_at IS NULL AND NOT (schedule_id = ANY(%(ids)s::bigint[]))
RETURNING id
"""

# Claims: one instance per transition. Open notifications first; a resolve waits for its open's.
CLAIM_SQL = {
    "open": """
UPDATE schedules_alert SET notified_open_at = now()
 WHERE id IN (SELECT id FROM schedules_alert WHERE notified_open_at IS NULL
               ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING id, notified_open_at
""",
    "resolved": """
UPDATE schedules_alert SET notified_resolved_at = now()
 WHERE id IN (SELECT id FROM schedules_alert
               WHERE resolved_at IS NOT NULL AND notified_resolved_at IS NULL AND notified_open_at IS NOT NULL
               ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
RETURNING id, notified_resolved_at
""",
}
UNCLAIM_SQL = {
    "open": "UPDATE schedules_alert SET notified_open_at = NULL WHERE id = %s AND notified_open_at = %s",
    "resolved": "UPDATE schedules_alert SET notified_resolved_at = NULL"
    " WHERE id = %s AND notified_resolved_at = %s",
}


@dataclass
class Evaluation:
    opened: int = 0
    resolved: int = 0
    claimed: int = 0
    paused: int = 0


def evaluate(*, grace: float | None = None) -> Evaluation:
    """Open and resolve every kind, then claim the notifications due and hand them to the sender."""
    grace = float(settings.ALERT_MISSED_GRACE_SECONDS if grace is None else grace)
    result = Evaluation()
    with transaction.atomic(), connection.cursor() as cursor:
        result.paused = pause_failing_schedules(cursor)
        for kind, sql in CONDITIONS.items():
            cursor.execute(sql, {"grace": grace})
            holding = cursor.fetchall()
            ids = [row[0] for row in holding]
            if holding:
                cursor.execute(
                    OPEN_SQL, {"kind": kind, "ids": ids, "details": [_json_text(row[1]) for row in holding]}
                )
                result.opened += cursor.rowcount
            cursor.execute(RESOLVE_SQL, {"kind": kind, "ids": ids})
            result.resolved += cursor.rowcount
    if result.opened or result.resolved or result.paused:
        logger.info(
            "alerts evaluated",
            extra={"opened": result.opened, "resolved": result.resolved, "paused": result.paused},
        )
    result.claimed = claim_notifications()
    return result


def pause_failing_schedules(cursor) -> int:
    """Disable the schedules due a pause (PAUSE_SQL), each recorded as a `disable` change by the system,
    in the caller's transaction; the number paused."""
    from monitoring.metrics import count_pauses
    from schedules import changes as change_log
    from schedules.models import ChangeSource, Schedule

    cursor.execute(PAUSE_SQL, {"by": PAUSED_BY})
    rows = cursor.fetchall()
    for schedule_id, name, note, paused_at, old_note, old_at, old_by in rows:
        before = {"enabled": True, "paused_note": old_note, "paused_at": old_at, "paused_by": old_by}
        after = {"enabled": False, "paused_note": note, "paused_at": paused_at, "paused_by": PAUSED_BY}
        change_log.record(
            Schedule(pk=schedule_id, name=name),
            action="disable",
            source=ChangeSource.SYSTEM,
            actor=PAUSED_BY,
            changes=change_log.diff(
                {f: change_log.json_value(f, v) for f, v in before.items()},
                {f: change_log.json_value(f, v) for f, v in after.items()},
            ),
        )
        logger.warning("schedule paused after failures", extra={"schedule_id": schedule_id, "note": note})
    if rows:
        transaction.on_commit(lambda: count_pauses(len(rows)), robust=True)
    return len(rows)


def _json_text(value) -> str:
    # Django's cursor hands jsonb back as text (its JSONField decodes it); psycopg2's own, as objects.
    return value if isinstance(value, str) else json.dumps(value)


def claim_notifications() -> int:
    """Claim every unsent transition (conditional UPDATE: each goes to exactly one instance) and queue
    it for delivery."""
    claimed = 0
    for transition in ("open", "resolved"):
        with connection.cursor() as cursor:
            cursor.execute(CLAIM_SQL[transition])
            rows = cursor.fetchall()
        for alert_id, stamp in rows:
            sender().submit(Notification(alert_id=alert_id, transition=transition, stamp=stamp))
        claimed += len(rows)
    return claimed


# --- rate limit: the scheduler calls evaluate_if_due() on every pass --------------------------------

_next_evaluation = 0.0


def evaluate_if_due() -> Evaluation | None:
    """Evaluate at most every ALERT_EVALUATE_EVERY_SECONDS in this process; never raises (a failure
    is logged and retried next period: alerts must not break dispatch)."""
    global _next_evaluation
    now = time.monotonic()
    if now < _next_evaluation:
        return None
    period = float(settings.ALERT_EVALUATE_EVERY_SECONDS)
    _next_evaluation = now + period
    if not _turn_is_ours(period):
        return None
    try:
        return evaluate()
    except Exception as exc:
        logger.warning("alert evaluation failed", extra={"error": type(exc).__name__})
        return None


EVALUATION_TURN_KEY = "cb:alerts:evaluated"


def _turn_is_ours(period: float) -> bool:
    """One evaluation per period across all schedulers (each costs a scan of the schedules): the first
    to set the Redis key takes the turn. Only a saving: with Redis away every instance evaluates, and
    the conditional SQL keeps that correct."""
    from monitoring.metrics import redis_client

    try:
        return bool(redis_client().set(EVALUATION_TURN_KEY, "1", nx=True, px=max(1, int(period * 1000))))
    except Exception:
        return True


# --- delivery -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    alert_id: int
    transition: str  # open | resolved
    stamp: datetime  # our claim (notified_*_at as we set it)


def payload_for(alert, transition: str) -> dict:
    """Slack-compatible JSON (`text`), plus the same facts as fields for other receivers."""
    schedule = alert.schedule
    verb = "OPEN" if transition == "open" else "RESOLVED"
    what = {
        MISSED: "a slot did not start within its grace",
        FAILING: f"{alert.details.get('consecutive_failures', '?')} consecutive failed runs",
        OVERDUE: f"a run has been running {alert.details.get('running_seconds', '?')}s",
    }.get(alert.kind, alert.kind)
    if transition == "open" and alert.kind == FAILING and is_paused_after_failures(schedule):
        what += f"; the schedule is {schedule.paused_note}"
    text = f"[{verb}] {alert.kind} alert on schedule {schedule.name!r} (job {schedule.job.key}): {what}"
    if transition == "resolved":
        text = f"[{verb}] {alert.kind} alert on schedule {schedule.name!r} (job {schedule.job.key}) cleared"
    return {
        "text": text,
        "event": f"alert.{transition}",
        "alert": {
            "id": alert.pk,
            "kind": alert.kind,
            "schedule_id": schedule.pk,
            "schedule": schedule.name,
            "job": schedule.job.key,
            "opened_at": alert.opened_at.isoformat(),
            "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
            "details": alert.details,
        },
    }


def is_paused_after_failures(schedule) -> bool:
    """Disabled by PAUSE_SQL (its own note, never a person's: notifications carry no free text)."""
    return (
        not schedule.enabled
        and schedule.paused_by == PAUSED_BY
        and schedule.paused_note.startswith("paused after ")
    )


def targets_for(schedule) -> list[str]:
    return [schedule.alert_webhook_url] if schedule.alert_webhook_url else list(settings.ALERT_WEBHOOK_URLS)


class WebhookAnswered(Exception):
    """The webhook answered, but not with a 2xx (a redirect included: none is followed)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def post_json(url: str, body: dict) -> None:
    """POST one notification; raise on a refused destination, a transport error or a non-2xx answer.

    The host is resolved and vetted here, at send time (its DNS may have changed since the URL was
    saved), and the connection goes to a vetted address. No redirect is followed. Connecting takes at
    most ALERT_WEBHOOK_TIMEOUT_SECONDS per address; the rest (sending, then the answer's status line
    and headers, however slowly they come) at most that in all, then the socket is shut. The answer's
    body is never read.
    """
    target = outbound.webhook_target(url)
    data = json.dumps(body).encode()
    timeout = float(settings.ALERT_WEBHOOK_TIMEOUT_SECONDS)
    conn = outbound.open_connection(target, timeout)
    expired = threading.Event()
    watchdog = threading.Timer(timeout, _shut, [conn.sock, expired])
    watchdog.start()
    try:
        conn.request(
            "POST",
            target.path,
            body=data,
            headers={
                "Host": target.host_header,
                "Content-Type": "application/json",
                "User-Agent": "cyber-brain",
                "Connection": "close",
            },
        )
        response = conn.getresponse()  # the status line and headers (http.client bounds their size)
        status = response.status
        response.close()  # its body unread
    except (OSError, http.client.HTTPException):
        if not expired.is_set():
            raise
    finally:
        watchdog.cancel()
        conn.close()
    if expired.is_set():  # even what looks like a whole answer may be one cut short
        raise TimeoutError(f"no answer within {timeout:g}s")
    if not 200 <= status < 300:
        raise WebhookAnswered(status)


def check_webhook_settings(**kwargs) -> list[checks.CheckMessage]:
    """System check (manage.py check, and every management command's start: run_scheduler's too):
    ALERT_WEBHOOK_URLS that may not be called are an error; one whose host does not resolve now, a
    warning (each send checks again)."""
    found: list[checks.CheckMessage] = []
    for url in settings.ALERT_WEBHOOK_URLS:
        try:
            outbound.webhook_target(url)
        except outbound.Unresolved as exc:
            found.append(checks.Warning(f"ALERT_WEBHOOK_URLS: {exc}", id="monitoring.W001"))
        except outbound.Refused as exc:
            found.append(checks.Error(f"ALERT_WEBHOOK_URLS: {_host(url)}: {exc}", id="monitoring.E001"))
    return found


def _shut(sock: socket.socket, expired: threading.Event) -> None:
    # Wakes a recv blocked in another thread (closing the socket would not).
    expired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _host(url: str) -> str:
    # Only the host: a webhook URL's path or query is usually its secret (Slack, Discord, Teams).
    return urlparse(url).hostname or "?"


class WebhooksPending(Exception):
    """Some of a notification's webhooks did not take it yet."""


class Sender(BackgroundQueue[Notification]):
    """One background thread per process delivering claimed notifications, each with retries."""

    attempts = 5
    thread_name = "alert-sender"

    def handle(self, notification: Notification) -> None:
        try:
            self.deliver(notification)
        except Exception as exc:
            logger.warning("alert notification failed", extra={"error": type(exc).__name__})
            self.give_back(notification)
        finally:
            connection.close()  # this thread's own connection

    def deliver(self, notification: Notification) -> None:
        from schedules.models import Alert

        alert = Alert.objects.select_related("schedule", "schedule__job").get(pk=notification.alert_id)
        body = payload_for(alert, notification.transition)
        pending = targets_for(alert.schedule)
        retrying = Retrying(
            retry=retry_if_exception_type(WebhooksPending),
            stop=stop_after_attempt(self.attempts),
            wait=wait_exponential(
                multiplier=float(settings.ALERT_RETRY_BASE_SECONDS),
                max=float(settings.ALERT_RETRY_MAX_SECONDS),
            ),
        )
        try:
            for attempt in retrying:
                with attempt:
                    number = attempt.retry_state.attempt_number
                    pending = self.post_to(pending, body, alert_id=alert.pk, attempt=number)
                    if pending:
                        raise WebhooksPending
        except RetryError:
            self.give_back(notification)
            logger.warning("alert notification given up for now", extra={"alert_id": alert.pk})
            return
        logger.info(
            "alert notified",
            extra={"alert_id": alert.pk, "kind": alert.kind, "transition": notification.transition},
        )

    @staticmethod
    def post_to(urls: list[str], body: dict, *, alert_id: int, attempt: int) -> list[str]:
        """POST `body` to each of `urls`; the ones that failed."""
        failed = []
        for url in urls:
            try:
                post_json(url, body)
            except Exception as exc:
                failed.append(url)
                why = {"error": type(exc).__name__}
                if isinstance(exc, outbound.Refused):
                    why["reason"] = str(exc)  # host and address, no path
                elif isinstance(exc, WebhookAnswered):
                    why["status"] = exc.status
                logger.warning(
                    "alert webhook failed",
                    extra={"alert_id": alert_id, "host": _host(url), "attempt": attempt, **why},
                )
        return failed

    @staticmethod
    def give_back(notification: Notification) -> None:
        """Undo our claim (only ours: the stamp we set), so a later evaluation here or elsewhere tries
        again."""
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    UNCLAIM_SQL[notification.transition], [notification.alert_id, notification.stamp]
                )
        except Exception as exc:
            logger.warning("alert claim not given back", extra={"error": type(exc).__name__})


_sender: Sender | None = None


def sender() -> Sender:
    global _sender
    if _sender is None:
        _sender = Sender()
    return _sender
