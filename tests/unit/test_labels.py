"""Label syntax and selector parsing (schedules/labels.py): pure, no database."""

from __future__ import annotations

import pytest

from schedules.labels import key_error, label_errors, parse_selector, value_error


@pytest.mark.parametrize(
    "key",
    ["team", "a", "a.b-c_d", "T1", "x" * 63, "example.com/team", "a-b.c/x", f"{'p' * 253}/n"],
)
def test_key_error__kubernetes_keys_pass(key):
    assert key_error(key) is None


@pytest.mark.parametrize(
    "key",
    [
        "",
        "-team",
        "team-",
        "_x",
        "a b",
        "x" * 64,
        "Example.com/team",
        "/team",
        "a/",
        "a//b",
        f"{'p' * 254}/n",
        5,
    ],
)
def test_key_error__others_are_refused(key):
    assert key_error(key) is not None


@pytest.mark.parametrize("value", ["", "payments", "v1.2-rc_3", "v" * 63])
def test_value_error__kubernetes_values_pass(value):
    assert value_error("k", value) is None


@pytest.mark.parametrize("value", ["-x", "x-", "a b", "v" * 64, 5, None, ["x"]])
def test_value_error__others_are_refused_naming_the_key(value):
    assert "'k'" in value_error("k", value)


def test_label_errors__names_each_bad_key_and_bounds_the_count():
    assert label_errors({"team": "payments"}) == []
    problems = label_errors({"team": "a b", "-x": "y", "ok": "fine"})
    assert len(problems) == 2
    assert "'team'" in problems[0]
    assert "'-x'" in problems[1]
    assert label_errors({f"k{i}": "v" for i in range(65)}) == ["At most 64 labels."]
    assert label_errors(["team"]) != []


@pytest.mark.parametrize(
    ("terms", "sql"),
    [
        (["team=payments"], '"labels" @>'),
        (["team==payments"], '"labels" @>'),
        (["tier!=batch"], "NOT"),
        (["team"], '"labels" ?'),
        (["!team"], "NOT"),
    ],
)
def test_parse_selector__each_operator(terms, sql):
    from schedules.models import Schedule

    query = str(Schedule.objects.filter(parse_selector(terms)).query)
    assert sql in query


@pytest.mark.parametrize(
    "term", ["", "=", "=x", "team=a=b", "team!", "!=x", "a b=c", "team=a b", "!team=x", ",", "team=,"]
)
def test_parse_selector__malformed_terms_raise_naming_the_term(term):
    with pytest.raises(ValueError, match=r"is not a selector term|key|value"):
        parse_selector([term])
