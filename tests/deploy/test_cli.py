"""`prefloop` commands in this process on a SQLite store in a temporary data directory: what they
print and their exit status."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime

import pytest

from deploy.cli import main
from deploy.loop import open_registry
from service.runs import queue_run, update_run
from service.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in list(os.environ):
        if name.startswith("PREFLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PREFLOOP_DATA_DIR", str(tmp_path))


def test_status_shows_the_backoff_after_a_failed_cycle(capsys: pytest.CaptureFixture) -> None:
    registry = open_registry(load_settings())
    run = queue_run(registry.store, "count", "scheduler")
    update_run(registry.store, run.id, status="failed", finished_at=datetime.now(UTC), error="x")
    assert main(["status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["last_run"]["status"] == "failed"
    backoff = status["scheduler"]
    assert (backoff["failed_in_a_row"], backoff["backoff_s"], backoff["waiting"]) == (1, 300, True)
