"""`prefloop` commands in this process on a SQLite store in a temporary data directory: what they
print and their exit status."""

from __future__ import annotations

import json
import os
import socket
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
    # `main(["--config", F, ...])` exports PREFLOOP_CONFIG for what it starts; setting it here
    # first makes monkeypatch remove it after the test, so it cannot reach later tests.
    monkeypatch.setenv("PREFLOOP_CONFIG", "")
    monkeypatch.delenv("PREFLOOP_CONFIG")


def test_status_shows_the_backoff_after_a_failed_cycle(capsys: pytest.CaptureFixture) -> None:
    registry = open_registry(load_settings())
    run = queue_run(registry.store, "count", "scheduler")
    update_run(registry.store, run.id, status="failed", finished_at=datetime.now(UTC), error="x")
    assert main(["status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["last_run"]["status"] == "failed"
    backoff = status["scheduler"]
    assert (backoff["failed_in_a_row"], backoff["backoff_s"], backoff["waiting"]) == (1, 300, True)


def test_a_misspelt_nested_config_key_stops_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text("engine:\n  max_num_seqz: 3\n")
    assert main(["--config", str(cfg), "status"]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"prefloop: unknown settings: {cfg}: engine.max_num_seqz (see README, Configuration)\n"
    )


def closed_port() -> int:
    """A local port nothing listens on (the kernel just handed it out and it was closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv", [["status"], ["versions"], ["serve", "--model-path", "{model}"]], ids=lambda a: a[0]
)
def test_an_unreachable_database_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture, argv: list[str]
) -> None:
    port = closed_port()
    monkeypatch.setenv(
        "PREFLOOP_DATABASE_URL",
        f"postgresql+psycopg://prefloop:s3cret-pw@127.0.0.1:{port}/prefloop",
    )
    assert main([a.format(model=tmp_path) for a in argv]) == 2
    out = capsys.readouterr()
    assert out.err == (
        f"prefloop: cannot reach the database at 127.0.0.1:{port} (connection refused); "
        "check PREFLOOP_DATABASE_URL\n"
    )
    assert out.out == ""
