"""Schedule labels: key=value pairs with Kubernetes' syntax, and the selectors that match them.

Pure: validation and parsing take values and return errors or a `Q`; the GIN index on `labels`
(`schedule_labels_idx`) makes each selector term one index condition (`@>` for `key=value`, `?` for
`key`), so a selector over any number of schedules is one indexed query.

Syntax (https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#syntax-and-character-set):
a key is an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters, alphanumeric at
both ends with `-`, `_`, `.` between; a value is empty or the same shape as a name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from django.db.models import Q

MAX_LABELS = 64
NAME_MAX = 63
PREFIX_MAX = 253
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# One selector term: `key=value`, `key==value`, `key!=value`, `key` (has it), `!key` (has it not).
_TERM = re.compile(r"(?P<key>[^=!]+)(?P<op>==|=|!=)(?P<value>[^=!]*)|(?P<not>!)?(?P<bare>[^=!]+)")


def key_error(key: Any) -> str | None:
    """Why `key` is not a label key, or None."""
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    prefix, slash, name = key.rpartition("/")
    if slash and not (len(prefix) <= PREFIX_MAX and _PREFIX.fullmatch(prefix)):
        return (
            f"key {key!r}: the prefix before '/' must be a DNS subdomain (lowercase letters, digits, '-',"
            f" '.'; at most {PREFIX_MAX} characters)"
        )
    if not (len(name) <= NAME_MAX and _NAME.fullmatch(name)):
        return (
            f"key {key!r}: the name must be at most {NAME_MAX} characters of letters, digits, '-', '_', '.',"
            " starting and ending with a letter or digit"
        )
    return None


def value_error(key: str, value: Any) -> str | None:
    """Why `value` is not a label value (of `key`), or None."""
    if not isinstance(value, str):
        return f"key {key!r}: the value must be a string"
    if value and not (len(value) <= NAME_MAX and _NAME.fullmatch(value)):
        return (
            f"key {key!r}: the value must be empty or at most {NAME_MAX} characters of letters, digits,"
            " '-', '_', '.', starting and ending with a letter or digit"
        )
    return None


def label_errors(labels: Any) -> list[str]:
    """Every problem of a `labels` object (as messages naming the key); empty when valid."""
    if not isinstance(labels, Mapping):
        return ['Must be an object of key: value strings, e.g. {"team": "payments"}.']
    if len(labels) > MAX_LABELS:
        return [f"At most {MAX_LABELS} labels."]
    problems = []
    for key, value in labels.items():
        problem = key_error(key) or value_error(key, value)
        if problem is not None:
            problems.append(problem[0].upper() + problem[1:] + ".")
    return problems


def parse_selector(terms: Iterable[str]) -> Q:
    """A `Q` matching the schedules whose labels satisfy every term (AND), for `?label=` parameters.

    Each parameter holds one or more comma-separated terms: `team=payments` (or `==`), `tier!=batch`
    (also matches schedules without `tier`, as in Kubernetes), `team` (has the key), `!team` (has it
    not). Raises ValueError naming the bad term.
    """
    condition = Q()
    for parameter in terms:
        for raw in parameter.split(","):
            term = raw.strip()
            match = _TERM.fullmatch(term)
            if not term or match is None:
                raise ValueError(f"{term!r} is not a selector term (key=value, key!=value, key or !key)")
            key = (match["key"] or match["bare"]).strip()
            if (problem := key_error(key)) is not None:
                raise ValueError(f"{term!r}: {problem}")
            if match["op"] is None:
                has = Q(labels__has_key=key)
                condition &= ~has if match["not"] else has
                continue
            value = match["value"].strip()
            if (problem := value_error(key, value)) is not None:
                raise ValueError(f"{term!r}: {problem}")
            equal = Q(labels__contains={key: value})
            condition &= ~equal if match["op"] == "!=" else equal
    return condition


def format_labels(labels: Mapping[str, str]) -> str:
    """`team=payments, tier=batch`, sorted by key (admin and dashboard)."""
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))
