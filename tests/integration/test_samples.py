"""Issue 31.6: the shipped schedules file and the docs' example apply as they stand."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.core.management import call_command

from schedules.models import Schedule, ScheduleChange

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def sync(path: Path) -> str:
    out = io.StringIO()
    call_command("sync_schedules", str(path), stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_samples_schedules_toml_applies_as_is_and_a_second_run_changes_nothing():
    path = ROOT / "samples" / "schedules.toml"
    first = sync(path)
    names = re.findall(r'^name = "([^"]+)"', path.read_text(), flags=re.MULTILINE)
    assert len(names) >= 3
    assert f"{len(names)} change(s), 0 unchanged" in first
    schedules = Schedule.objects.filter(name__in=names)
    assert schedules.count() == len(names)
    assert all(s.managed for s in schedules)
    assert all(s.next_run_at is not None for s in schedules if s.enabled)
    assert ScheduleChange.objects.filter(
        schedule_name__in=names, source="sync", action="create"
    ).count() == len(names)
    assert sync(path).startswith(f"nothing to change ({len(names)} schedule(s) already as declared)")


@pytest.mark.parametrize("language", ["toml", "yaml"])
def test_the_schedules_doc_examples_apply_as_written(tmp_path, language):
    text = (ROOT / "docs" / "SCHEDULES.md").read_text()
    block = re.search(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert block, f"docs/SCHEDULES.md has no {language} example"
    path = tmp_path / f"schedules.{language}"
    path.write_text(block.group(1))
    assert "change(s)" in sync(path)
    assert Schedule.objects.filter(managed=True).exists()
