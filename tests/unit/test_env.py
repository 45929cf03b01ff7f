import pytest

from project.env import ConfigError, database_from_url, env_bool


def test_database_from_url__reads_every_part():
    db = database_from_url("postgres://u%40x:p%2Fw@db.local:6543/cyber?sslmode=require")
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "u@x",
        "p/w",
        "db.local",
        6543,
        "cyber",
    )
    assert db["OPTIONS"] == {"sslmode": "require"}


@pytest.mark.parametrize("url", ["sqlite:///db.sqlite3", "mysql://u@h/db", "nosuch://h/db"])
def test_database_from_url__refuses_other_schemes(url):
    with pytest.raises(ConfigError, match="postgres"):
        database_from_url(url)


def test_database_from_url__keeps_the_settings_options():
    db = database_from_url("postgresql://u@h/cyber?connect_timeout=3&options=-c%20statement_timeout%3D5s")
    assert db["OPTIONS"] == {"connect_timeout": 3, "options": "-c statement_timeout=5s"}
    assert database_from_url("postgres://u@h")["NAME"] == "postgres"


def test_env_bool__refuses_garbage(monkeypatch):
    monkeypatch.setenv("X_FLAG", "maybe")
    with pytest.raises(ConfigError, match="X_FLAG"):
        env_bool("X_FLAG")
