"""Which code a result describes, in a git repository of its own: the commit and uncommitted
changes a result records, and the report's flag when the measured code changed since."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import common, report
from bench.common import Result
from bench.provenance import UNKNOWN, changed_since, code_state, describe

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

STALE = "older than the code it describes"


def git(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    }
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


def write(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def commit(root: Path, message: str) -> str:
    git(root, "add", "--all")
    git(root, "commit", "--quiet", "--message", message)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "--quiet")
    write(root, "service/app.py", "served = 1\n")
    write(root, "bench/ingest.py", "rounds = 4\n")
    write(root, "docs/notes.md", "notes\n")
    commit(root, "first")
    return root


def test_a_result_measured_at_an_older_commit_of_the_measured_code_is_flagged(repo: Path):
    measured = code_state(repo)
    assert measured == {"commit": git(repo, "rev-parse", "HEAD"), "dirty": False, "changed": {}}
    assert changed_since(measured, repo) == []
    assert describe(measured, repo)[1] == "current"

    write(repo, "service/app.py", "served = 2\n")
    commit(repo, "second")
    assert changed_since(measured, repo) == ["service/app.py"]
    sentence, status = describe(measured, repo)
    assert status == STALE
    assert "**Older than the code it describes**: 1 measured files changed since" in sentence


def test_commits_outside_the_measured_code_keep_a_result_current(repo: Path):
    measured = code_state(repo)
    write(repo, "docs/notes.md", "more notes\n")
    write(repo, "bench/report.py", "# how results are shown, not measured\n")
    commit(repo, "docs and the report")
    assert git(repo, "rev-parse", "HEAD") != measured["commit"]
    assert changed_since(measured, repo) == []
    assert describe(measured, repo)[1] == "current"


def test_a_result_measured_on_uncommitted_changes_matches_them_once_committed(repo: Path):
    write(repo, "bench/ingest.py", "rounds = 6\n")
    write(repo, "service/new.py", "x = 1\n")  # untracked
    measured = code_state(repo)
    assert measured["dirty"] is True
    assert sorted(measured["changed"]) == ["bench/ingest.py", "service/new.py"]
    assert changed_since(measured, repo) == []  # the tree at hand is what was measured

    commit(repo, "the measured changes")
    assert changed_since(measured, repo) == []
    # The same commit without those changes is not what was measured.
    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    git(repo, "clean", "--quiet", "--force")
    assert changed_since(measured, repo) == ["bench/ingest.py", "service/new.py"]


def test_uncommitted_changes_in_the_tree_at_hand_count_as_changes(repo: Path):
    measured = code_state(repo)
    write(repo, "service/app.py", "served = 3\n")
    assert changed_since(measured, repo) == ["service/app.py"]
    os.remove(repo / "service/app.py")
    assert changed_since(measured, repo) == ["service/app.py"]


def test_without_a_recorded_or_known_commit_nothing_can_be_told(repo: Path, tmp_path: Path):
    assert changed_since(None, repo) is None
    assert changed_since({"commit": UNKNOWN}, repo) is None
    assert changed_since({"commit": "0" * 40, "changed": {}}, repo) is None
    assert describe({"commit": "0" * 40}, repo)[1] == UNKNOWN
    assert describe(None, repo)[1] == UNKNOWN
    plain = tmp_path / "not-a-checkout"
    plain.mkdir()
    assert code_state(plain) == {"commit": UNKNOWN, "dirty": None, "changed": {}}


def test_report_flags_the_stale_section_and_its_targets(repo: Path, tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS_DIR", results)
    monkeypatch.setattr(report, "RESULTS_DIR", results)
    monkeypatch.setattr(common, "code_state", lambda: code_state(repo))
    result = Result("swap", "Hot swap", command="python -m bench.swap")
    result.target("promote -> serving", 0.9, 2.0, "<=", "s")
    result.write()
    recorded = json.loads((results / "swap.json").read_text())["code"]
    assert recorded["commit"] == git(repo, "rev-parse", "HEAD")

    text = report.render(report.load_results(("swap",)), root=repo)
    assert "| promote -> serving | 0.9 s | <= 2 s | met | current |" in text
    assert "The measured code is unchanged since." in text.split("## Hot swap")[1]

    write(repo, "service/app.py", "served = 2\n")
    commit(repo, "second")
    text = report.render(report.load_results(("swap",)), root=repo)
    assert f"| promote -> serving | 0.9 s | <= 2 s | met | {STALE} |" in text
    section = text.split("## Hot swap")[1]
    assert f"measured at commit {recorded['commit'][:12]}" in section
    assert "**Older than the code it describes**" in section and "service/app.py" in section
