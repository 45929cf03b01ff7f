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


# --- the local env file `make run` writes (.run/local.env) ------------------------------------------


@pytest.fixture
def local_file(tmp_path, monkeypatch):
    from project import env

    path = tmp_path / "local.env"
    monkeypatch.setenv("CB_LOCAL_ENV_FILE", str(path))
    env.read_env_file.cache_clear()
    yield path
    env.read_env_file.cache_clear()


def test_local_env__environment_wins_then_the_file_then_the_default(local_file, monkeypatch):
    from project.env import env_int, env_str, format_env_file

    local_file.write_text(format_env_file({"POSTGRES_DB": "from file", "CB_TEST_NUMBER": "7"}))
    monkeypatch.delenv("POSTGRES_DB", raising=False)
    monkeypatch.delenv("CB_TEST_NUMBER", raising=False)
    assert env_str("POSTGRES_DB", "default") == "from file"
    assert env_int("CB_TEST_NUMBER", 1) == 7
    assert env_str("CB_TEST_UNSET", "default") == "default"
    monkeypatch.setenv("POSTGRES_DB", "from env")
    assert env_str("POSTGRES_DB", "default") == "from env"
    monkeypatch.setenv("POSTGRES_DB", "")  # set, even empty: the environment's
    assert env_str("POSTGRES_DB", "default") == ""


def test_local_env__round_trips_any_value_and_is_sh_sourceable(local_file, tmp_path):
    import subprocess

    from project.env import format_env_file, local_env

    values = {"SECRET_KEY": "a'b\"c $HOME `x` ; #no comment", "EMPTY": "", "URL": "redis://h:1/2?a=b&c=d"}
    local_file.write_text(format_env_file(values))
    assert local_env() == values
    shown = subprocess.run(
        ["sh", "-c", f'set -a; . "{local_file}"; printf %s "$SECRET_KEY"'],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert shown.stdout == values["SECRET_KEY"]


def test_local_env__none_when_disabled_or_missing(local_file, monkeypatch):
    from project import env

    assert env.local_env() == {}  # no file yet
    local_file.write_text("POSTGRES_DB=x\n")
    env.read_env_file.cache_clear()
    assert env.local_env() == {"POSTGRES_DB": "x"}
    monkeypatch.setenv("CB_LOCAL_ENV_FILE", "")  # as project.settings_test does, after a first read
    assert env.local_env_path() is None
    assert env.local_env() == {}


def test_local_env__a_broken_line_names_the_file(local_file):
    from project.env import ConfigError, local_env

    local_file.write_text("just words\n")
    with pytest.raises(ConfigError, match=r"local\.env"):
        local_env()
