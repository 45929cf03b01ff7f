"""Calendars, pure: which days (and minutes) a calendar names, read in the calendar's own zone.

A calendar is a set of days plus windows of minutes. `exclude_calendars` rules out the slots it names;
`only_calendars` keeps only the slots one of them names (schedules/timing.py applies both). Rules
(docs/SCHEDULES.md, "Calendars"), each an object with one key:

    {"date": "2026-12-25"}                               one day
    {"start": "2026-12-24", "end": "2027-01-02"}         days, end exclusive
    {"yearly": "12-25"}                                  every year ("02-29": leap years only)
    {"nth_weekday": {"month": 11, "weekday": "thu", "n": 4}}   n = -1 for the last
    {"weekdays": ["sat", "sun"]}
    {"cron": "* 0-6 * * *"}                              a window: every minute the cron matches

Besides the rules, `holidays` ({"country": "US", "subdiv": "NY", "years": [2027]} or {"market":
"NYSE", ...}) adds the days of the `holidays` package, and an iCalendar file's events become rules
(`ics_rules`). No database, no clock: every function takes the instant or date it reasons about.
"""

from __future__ import annotations

import calendar as stdlib_calendar
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
RULE_KINDS = ("date", "start", "yearly", "nth_weekday", "weekdays", "cron")
# Bounds that keep a calendar cheap to store and to evaluate.
MAX_RULES = 5000
MAX_HOLIDAY_YEARS = 50
HOLIDAY_YEARS = (1950, 2100)
# GET /api/calendars/{id}/days answers at most this many days per call.
MAX_DAYS_RANGE = 3660
# An iCalendar recurrence other than a plain yearly one is expanded to at most this many days.
MAX_ICS_OCCURRENCES = 1000


@dataclass(frozen=True)
class CalendarSpec:
    """What the slot math needs of a calendar: its name (for reasons), zone, rules and holiday days."""

    name: str
    timezone: str = "UTC"
    rules: tuple = ()  # the validated rule dicts, as stored (compiled lazily, see _compiled)
    extra_days: frozenset = field(default_factory=frozenset)  # holidays-package days

    def day_matches(self, day: date) -> bool:
        """The calendar names `day` (a local date in its zone) by a day rule or a holiday."""
        compiled = _compiled(self.rules)
        if day in self.extra_days or day in compiled.dates:
            return True
        if (day.month, day.day) in compiled.yearly or day.weekday() in compiled.weekdays:
            return True
        if any(start <= day < end for start, end in compiled.ranges):
            return True
        if any(_nth_weekday_matches(day, month, weekday, n) for month, weekday, n in compiled.nth):
            return True
        # A window of every minute of every hour (`* * * * 6`) is whole days.
        midnight = datetime.combine(day, time(0))
        return any(window_matches(expr, midnight) for expr in compiled.day_windows)

    def window_matches(self, instant: datetime) -> bool:
        """A cron window of the calendar holds the minute of `instant` (read in the calendar's zone)."""
        windows = _compiled(self.rules).windows
        if not windows:
            return False
        wall = instant.astimezone(_zone(self.timezone)).replace(tzinfo=None, second=0, microsecond=0)
        return any(window_matches(expr, wall) for expr in windows)

    def has_windows(self) -> bool:
        return bool(_compiled(self.rules).windows)

    def local_date(self, instant: datetime) -> date:
        return instant.astimezone(_zone(self.timezone)).date()

    def matches(self, instant: datetime) -> bool:
        """The calendar names `instant`: its local day is one of the calendar's, or a window holds it."""
        return self.day_matches(self.local_date(instant)) or self.window_matches(instant)

    def day_start(self, day: date) -> datetime:
        """The first instant of the local `day` in the calendar's zone, in UTC (fold 0: a midnight lost
        to a spring-forward gap starts the day at the transition)."""
        return datetime.combine(day, time(0), tzinfo=_zone(self.timezone)).astimezone(UTC)

    def days_between(self, start: date, end: date) -> list[date]:
        """The days in [start, end) the calendar names (its windows are not days)."""
        days = (start + timedelta(days=i) for i in range((end - start).days))
        return [day for day in days if self.day_matches(day)]


@dataclass(frozen=True)
class _Compiled:
    dates: frozenset
    ranges: tuple
    yearly: frozenset
    nth: tuple
    weekdays: frozenset
    windows: tuple
    day_windows: tuple  # the windows that hold whole days


@lru_cache(maxsize=512)
def _compiled(rules: tuple) -> _Compiled:
    dates, ranges, yearly, nth, weekdays, windows = set(), [], set(), [], set(), []
    for rule in rules:
        rule = dict(rule)
        if "date" in rule:
            dates.add(date.fromisoformat(rule["date"]))
        elif "start" in rule:
            ranges.append((date.fromisoformat(rule["start"]), date.fromisoformat(rule["end"])))
        elif "yearly" in rule:
            month, day = rule["yearly"].split("-")
            yearly.add((int(month), int(day)))
        elif "nth_weekday" in rule:
            spec = dict(rule["nth_weekday"])
            nth.append((spec["month"], WEEKDAYS.index(spec["weekday"]), spec["n"]))
        elif "weekdays" in rule:
            weekdays.update(WEEKDAYS.index(name) for name in rule["weekdays"])
        elif "cron" in rule:
            windows.append(" ".join(rule["cron"].split()))
    day_windows = tuple(expr for expr in windows if expr.split()[:2] == ["*", "*"])
    return _Compiled(frozenset(dates), tuple(ranges), frozenset(yearly), tuple(nth), frozenset(weekdays),
                     tuple(windows), day_windows)  # fmt: skip


@lru_cache(maxsize=512)
def _window_fields(expr: str) -> tuple | None:
    """The sets of values of a window's five fields (None: any), or None for `L`/`#`, which
    croniter.match reads itself (slower: a window is checked once per slot searched)."""
    fields, nth = croniter.expand(expr)
    if nth or any(str(value).lower() == "l" for field in fields for value in field):
        return None
    return tuple(None if field == ["*"] else frozenset(int(v) % 7 if i == 4 else int(v) for v in field)
                 for i, field in enumerate(fields))  # fmt: skip


def window_matches(expr: str, wall: datetime) -> bool:
    """The cron `expr` matches the naive local minute `wall` (croniter.match's rules: with both day
    fields restricted, either one matches)."""
    fields = _window_fields(expr)
    if fields is None:
        return croniter.match(expr, wall)
    minutes, hours, days, months, weekdays = fields
    if (minutes is not None and wall.minute not in minutes) or (hours is not None and wall.hour not in hours):
        return False
    if months is not None and wall.month not in months:
        return False
    day_ok = days is None or wall.day in days
    weekday_ok = weekdays is None or (wall.weekday() + 1) % 7 in weekdays
    if days is not None and weekdays is not None:
        return day_ok or weekday_ok
    return day_ok and weekday_ok


def freeze(rules: Iterable[dict]) -> tuple:
    """Rules as a hashable tuple (CalendarSpec.rules)."""
    return tuple(_frozen(rule) for rule in rules)


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _nth_weekday_matches(day: date, month: int, weekday: int, n: int) -> bool:
    if day.month != month or day.weekday() != weekday:
        return False
    if n > 0:
        return (day.day - 1) // 7 + 1 == n
    days_in_month = stdlib_calendar.monthrange(day.year, day.month)[1]
    return (days_in_month - day.day) // 7 + 1 == -n


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


# --- Validation: messages that name the rule and key at fault ---------------------------------------


def _iso_date(value: Any) -> date | None:
    if not isinstance(value, str) or len(value) != 10:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rule_errors(rule: Any, where: str) -> dict[str, list[str]]:
    """Why one rule is refused, keyed by its path (`rules[2].nth_weekday.n`); empty when valid."""
    if not isinstance(rule, dict) or not rule:
        return {where: ["Must be an object with one of the keys " + ", ".join(RULE_KINDS) + "."]}
    keys = set(rule)
    if keys == {"start", "end"}:
        start, end = _iso_date(rule["start"]), _iso_date(rule["end"])
        errors = {}
        if start is None:
            errors[f"{where}.start"] = ["Must be a date, YYYY-MM-DD."]
        if end is None:
            errors[f"{where}.end"] = ["Must be a date, YYYY-MM-DD."]
        elif start is not None and end <= start:
            errors[f"{where}.end"] = ["Must be after start (end is exclusive)."]
        return errors
    if len(keys) != 1 or not keys <= set(RULE_KINDS) or keys == {"start"}:
        return {where: ["Must have exactly one of the keys date, yearly, nth_weekday, weekdays, cron,"
                        " or both start and end."]}  # fmt: skip
    (kind,) = keys
    value = rule[kind]
    path = f"{where}.{kind}"
    if kind == "date" and _iso_date(value) is None:
        return {path: ["Must be a date, YYYY-MM-DD."]}
    if kind == "yearly":
        try:
            month, day = (int(part) for part in value.split("-")) if isinstance(value, str) else (0, 0)
            date(2000, month, day)  # a leap year: 02-29 is a valid yearly day
            valid = len(value) == 5
        except ValueError:
            valid = False
        if not valid:
            return {path: ["Must be a month and day, MM-DD (e.g. 12-25; 02-29 matches leap years only)."]}
    if kind == "nth_weekday":
        return _nth_weekday_errors(value, path)
    if kind == "weekdays":
        if not isinstance(value, list) or not value:
            return {path: ["Must be a non-empty list of " + ", ".join(WEEKDAYS) + "."]}
        for index, name in enumerate(value):
            if name not in WEEKDAYS:
                return {f"{path}[{index}]": [f"{name!r} is not one of " + ", ".join(WEEKDAYS) + "."]}
    if kind == "cron":
        return _window_errors(value, path)
    return {}


def _nth_weekday_errors(value: Any, path: str) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        return {path: ['Must be an object {"month": 1-12, "weekday": "mon".."sun", "n": 1-5 or -1}.']}
    errors: dict[str, list[str]] = {}
    unknown = set(value) - {"month", "weekday", "n"}
    if unknown:
        errors[path] = [f"Unknown keys: {', '.join(sorted(unknown))}."]
    if not _int(value.get("month")) or not 1 <= value["month"] <= 12:
        errors[f"{path}.month"] = ["Must be a month, 1 to 12."]
    if value.get("weekday") not in WEEKDAYS:
        errors[f"{path}.weekday"] = ["Must be one of " + ", ".join(WEEKDAYS) + "."]
    n = value.get("n")
    if not _int(n) or not (1 <= n <= 5 or -5 <= n <= -1):
        errors[f"{path}.n"] = ["Must be 1 to 5 (the nth), or -1 to -5 (-1: the last)."]
    return errors


def _window_errors(value: Any, path: str) -> dict[str, list[str]]:
    from schedules import timing  # the cron rules and messages the schedules use

    if isinstance(value, str) and "h" in value.lower() and not value.strip().startswith("@"):
        return {path: ["A window cannot hash (H): give the minutes it holds."]}
    try:
        timing.validate_cron_expr(value)
    except ValueError as exc:
        return {path: [str(exc)]}
    return {}


def rules_errors(rules: Any) -> dict[str, list[str]]:
    """Every rule's problems, keyed `rules[i]...`; empty when all are valid."""
    if not isinstance(rules, list):
        return {"rules": ["Must be a list of rules."]}
    if len(rules) > MAX_RULES:
        return {"rules": [f"At most {MAX_RULES} rules."]}
    errors: dict[str, list[str]] = {}
    for index, rule in enumerate(rules):
        errors.update(rule_errors(rule, f"rules[{index}]"))
    return errors


def normalise_rules(rules: list[dict]) -> list[dict]:
    """Rules as stored: cron windows in their canonical form (aliases expanded, spacing single)."""
    from schedules import timing

    return [{"cron": timing.expand_cron(rule["cron"])} if "cron" in rule else rule for rule in rules]


def holidays_errors(value: Any) -> dict[str, list[str]]:
    """The `holidays` field: null, or {"country" | "market", "subdiv"?, "years"}."""
    if value is None:
        return {}
    import holidays as holidays_package

    if not isinstance(value, dict):
        return {"holidays": ['Must be an object such as {"country": "US", "years": [2027]}, or null.']}
    errors: dict[str, list[str]] = {}
    unknown = set(value) - {"country", "subdiv", "market", "years"}
    if unknown:
        errors["holidays"] = [f"Unknown keys: {', '.join(sorted(unknown))}."]
    country, market, subdiv = value.get("country"), value.get("market"), value.get("subdiv")
    if (country is None) == (market is None):
        errors["holidays"] = ["Give one of country or market."]
    elif country is not None:
        supported = holidays_package.list_supported_countries()
        if not isinstance(country, str) or country not in supported:
            errors["holidays.country"] = [f"Unknown country {country!r}: an ISO 3166 code such as 'US'."]
        elif subdiv is not None and (not isinstance(subdiv, str) or subdiv not in supported[country]):
            errors["holidays.subdiv"] = [f"Unknown subdivision {subdiv!r} of {country}."]
    else:
        supported = holidays_package.list_supported_financial()
        if not isinstance(market, str) or market not in supported:
            errors["holidays.market"] = [f"Unknown market {market!r}; one of {', '.join(sorted(supported))}."]
        if subdiv is not None:
            errors["holidays.subdiv"] = ["A market has no subdivisions."]
    years = value.get("years")
    low, high = HOLIDAY_YEARS
    if (
        not isinstance(years, list)
        or not years
        or len(years) > MAX_HOLIDAY_YEARS
        or not all(_int(year) and low <= year <= high for year in years)
    ):
        errors["holidays.years"] = [f"Must be a list of 1 to {MAX_HOLIDAY_YEARS} years, {low} to {high}."]
    return errors


@lru_cache(maxsize=128)
def _holiday_days(country: str | None, subdiv: str | None, market: str | None, years: tuple) -> frozenset:
    import holidays as holidays_package

    if market is not None:
        days = holidays_package.financial_holidays(market, years=list(years))
    else:
        days = holidays_package.country_holidays(country, subdiv=subdiv, years=list(years))
    return frozenset(days.keys())


def holiday_days(value: dict | None) -> frozenset:
    """The days a valid `holidays` field names."""
    if not value:
        return frozenset()
    return _holiday_days(
        value.get("country"), value.get("subdiv"), value.get("market"), tuple(sorted(set(value["years"])))
    )


def spec_from(name: str, timezone: str, rules: list[dict], holidays: dict | None) -> CalendarSpec:
    return CalendarSpec(name=name, timezone=timezone, rules=freeze(rules), extra_days=holiday_days(holidays))


# --- iCalendar import ---------------------------------------------------------------------------------


class IcsError(ValueError):
    """An iCalendar file that cannot be read as days."""


def ics_rules(data: bytes | str, *, timezone: str) -> list[dict]:
    """Each VEVENT of an iCalendar file as rules: an all-day event as a date (or a range), an event
    with times as the local days (in `timezone`) it touches, a plain yearly recurrence as a yearly
    rule, any other recurrence expanded to at most MAX_ICS_OCCURRENCES days."""
    import icalendar
    from dateutil.rrule import rrulestr

    try:
        parsed = icalendar.Calendar.from_ical(data)
    except Exception as exc:  # icalendar raises ValueError and assorted others on bad input
        raise IcsError(f"not an iCalendar file: {exc}") from exc
    zone = _zone(timezone)
    rules: list[dict] = []
    for event in parsed.walk("VEVENT"):
        start_prop = event.get("DTSTART")
        if start_prop is None:
            raise IcsError("an event has no DTSTART")
        start = start_prop.dt
        end_prop = event.get("DTEND")
        if end_prop is not None:
            end = end_prop.dt
        elif event.get("DURATION") is not None:
            end = start + event.get("DURATION").dt
        else:
            end = start + timedelta(days=1) if not isinstance(start, datetime) else start
        first, last = _local_days(start, end, zone)  # [first, last)
        rrule = event.get("RRULE")
        if rrule is None:
            rules.append(_day_rule(first, (last - first).days))
            continue
        parts = {key.upper(): value for key, value in rrule.items()}
        plain_yearly = parts.get("FREQ") == ["YEARLY"] and set(parts) <= {"FREQ", "INTERVAL"}
        if plain_yearly and parts.get("INTERVAL", [1]) == [1] and last - first == timedelta(days=1):
            rules.append({"yearly": first.strftime("%m-%d")})
            continue
        anchor = datetime.combine(first, time(0))
        try:
            recurrence = rrulestr(rrule.to_ical().decode(), dtstart=anchor, ignoretz=True)
        except (ValueError, TypeError) as exc:
            raise IcsError(f"unreadable recurrence {rrule.to_ical().decode()!r}: {exc}") from exc
        span = (last - first).days
        for count, occurrence in enumerate(recurrence):
            if count >= MAX_ICS_OCCURRENCES:
                break
            rules.append(_day_rule(occurrence.date(), span))
    return rules


def _day_rule(day: date, span: int) -> dict:
    if span == 1:
        return {"date": day.isoformat()}
    return {"start": day.isoformat(), "end": (day + timedelta(days=span)).isoformat()}


def _local_days(start: Any, end: Any, zone: ZoneInfo) -> tuple[date, date]:
    """[first, last) local days an event covers."""
    if not isinstance(start, datetime):
        last = end if isinstance(end, date) and not isinstance(end, datetime) else start + timedelta(days=1)
        return start, max(last, start + timedelta(days=1))
    start_local = (start if start.tzinfo else start.replace(tzinfo=zone)).astimezone(zone)
    end_local = (end if end.tzinfo else end.replace(tzinfo=zone)).astimezone(zone)
    first = start_local.date()
    # An event ending at midnight does not touch the day that starts then.
    last_touched = (end_local - timedelta(microseconds=1)).date() if end_local > start_local else first
    return first, max(last_touched, first) + timedelta(days=1)


def merged_rules(existing: list[dict], new: list[dict]) -> list[dict]:
    """`existing` plus the rules of `new` not already in it, in order."""
    seen = {_frozen(rule) for rule in existing}
    out = list(existing)
    for rule in new:
        if (key := _frozen(rule)) not in seen:
            seen.add(key)
            out.append(rule)
    return out
