"""project/health.py: the stamp a loop writes and the verdict `manage.py health` gives on it."""

from __future__ import annotations

import json
import os
import time

import pytest
from django.test import override_settings

from project.health import check_tick, record_tick, stamp_path


@pytest.fixture(autouse=True)
def health_dir(tmp_path):
    with override_settings(HEALTH_DIR=str(tmp_path / "health")):
        yield tmp_path / "health"


def test_a_fresh_stamp_is_healthy_and_one_older_than_two_intervals_is_not():
    record_tick("scheduler", interval=30)
    assert check_tick("scheduler").healthy
    now = time.time()
    assert check_tick("scheduler", now=now + 59).healthy
    verdict = check_tick("scheduler", now=now + 61)
    assert not verdict.healthy
    assert "over 2 x 30s" in verdict.reason


def test_no_stamp_or_a_broken_one_is_unhealthy(health_dir):
    assert "no worker has stamped" in check_tick("worker").reason
    health_dir.mkdir()
    stamp_path("worker").write_text("{not json")
    assert not check_tick("worker").healthy


def test_a_stamp_of_a_process_that_exited_is_unhealthy(health_dir):
    health_dir.mkdir()
    stamp_path("worker").write_text(json.dumps({"at": time.time(), "interval": 2, "pid": 2**22 + 7}))
    assert "has exited" in check_tick("worker").reason


def test_draining_is_healthy_however_old_while_the_process_lives():
    record_tick("worker", interval=2, state="draining")
    verdict = check_tick("worker", now=time.time() + 600)
    assert verdict.healthy
    assert f"pid {os.getpid()}" in verdict.reason


def test_an_unwritable_folder_does_not_raise(health_dir):
    health_dir.parent.mkdir(exist_ok=True)
    health_dir.write_text("a file where the folder should be")
    record_tick("scheduler", interval=30)  # logged once, never raised into the loop
