"""`Job.rate_limit`: how many runs of a job may start per second, minute or hour, across all workers.

Pure parsing here (the model, the API and the admin validate with it); the limiter itself is Redis's
(worker/ratelimit.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django.core.exceptions import ValidationError

MAX_RATE_COUNT = 10_000  # the limiter keeps one entry per start in its window: keep that set small
WINDOW_SECONDS = {"s": 1, "m": 60, "h": 3600}
RATE_LIMIT_PATTERN = r"^[1-9][0-9]*/[smh]$"  # the canonical form, as stored (also a CheckConstraint)
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$", re.ASCII)
RATE_LIMIT_HELP = f"N/s, N/m or N/h with N from 1 to {MAX_RATE_COUNT}, e.g. 10/m; empty for no limit."


@dataclass(frozen=True)
class RateLimit:
    """At most `count` run starts in any window of `window_seconds`."""

    count: int
    window_seconds: int

    def __str__(self) -> str:
        unit = {seconds: unit for unit, seconds in WINDOW_SECONDS.items()}[self.window_seconds]
        return f"{self.count}/{unit}"


def parse_rate_limit(text: str | None) -> RateLimit | None:
    """`"10/m"` -> RateLimit(10, 60); None or blank -> None; anything else raises ValueError."""
    if text is None or not str(text).strip():
        return None
    match = _RATE.match(str(text))
    if match is None or not 1 <= int(match.group(1)) <= MAX_RATE_COUNT:
        raise ValueError(f"Expected {RATE_LIMIT_HELP}")
    return RateLimit(int(match.group(1)), WINDOW_SECONDS[match.group(2)])


def validate_rate_limit(text: str | None) -> None:
    try:
        parse_rate_limit(text)
    except ValueError as exc:
        raise ValidationError(str(exc), code="invalid") from exc
