"""Which code a benchmark result describes, and whether it still describes the code at hand.

Every result file records the git commit it was measured at, whether the tree had uncommitted
changes, and the content (git blob ids) of the measured code's files that differed from that
commit. The report compares that measured code, file by file, with the code of the tree it runs
in (its HEAD plus its uncommitted changes): a result whose measured files differ is "older than
the code it describes". Comparing contents rather than commits keeps a result current across
commits that change nothing measured (the report itself, say), and across committing the very
changes it was measured with.

    state = code_state()                  # {"commit": sha | "unknown", "dirty": bool | None, ...}
    stale = changed_since(state)          # ["service/app.py", ...]; None: cannot be told

Without git (or outside a checkout) the commit is "unknown" and nothing can be compared.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN = "unknown"
# The code a benchmark measures: the service, the trainer, the scripts that drive them and what
# they import from deploy/ (the embedded model, the simulated users), and the pinned packages.
MEASURED = ("bench", "service", "training", "deploy", "pyproject.toml")
# In bench/ but no part of any measurement: how results are recorded and reported.
NOT_MEASURED = ("bench/report.py", "bench/provenance.py")


def _pathspec() -> list[str]:
    return ["--", *MEASURED, *(f":(exclude){p}" for p in NOT_MEASURED)]


def git(root: Path, *args: str) -> str | None:
    """`git -C root args...`'s standard output; None when git is missing or the command fails.
    Read-only: no optional locks, so that a benchmark never holds the index while someone works
    in the tree."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return done.stdout if done.returncode == 0 else None


def code_state(root: Path = ROOT) -> dict[str, Any]:
    """The commit checked out at `root`, whether its tree has uncommitted changes (tracked or
    untracked files, anywhere), and `changed`: each file of the measured code that differs from
    the commit, with the blob id of its content now (None: deleted)."""
    head = git(root, "rev-parse", "--verify", "HEAD")
    status = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    if head is None or status is None:
        return {"commit": UNKNOWN, "dirty": None, "changed": {}}
    measured = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", *_pathspec())
    paths = _status_paths(measured or "")
    present = sorted(p for p in paths if (root / p).is_file())
    blobs = git(root, "hash-object", "--", *present) if present else ""
    ids = dict(zip(present, (blobs or "").split(), strict=False))
    return {
        "commit": head.strip(),
        "dirty": bool(status),
        "changed": {p: ids.get(p) for p in sorted(paths)},
    }


def _status_paths(porcelain_z: str) -> set[str]:
    """The paths `git status --porcelain=v1 -z` names: both sides of a rename or copy."""
    paths: set[str] = set()
    entries = iter(porcelain_z.split("\0"))
    for entry in entries:
        if len(entry) < 4:
            continue
        paths.add(entry[3:])
        if entry[0] in "RC":  # the original path follows as an entry of its own
            paths.add(next(entries, ""))
    paths.discard("")
    return paths


def changed_since(measured: dict[str, Any] | None, root: Path = ROOT) -> list[str] | None:
    """The measured code's files whose content at measurement differs from their content in the
    tree at `root` now; [] when none does. None when it cannot be told: no commit recorded, no
    git here, or a commit this checkout does not have (a result recorded on another machine
    from a commit not fetched here)."""
    if not measured or measured.get("commit") in (None, UNKNOWN):
        return None
    now = code_state(root)
    then = str(measured["commit"])
    if now["commit"] == UNKNOWN or git(root, "cat-file", "-e", f"{then}^{{commit}}") is None:
        return None
    between = git(root, "diff", "--name-only", "--no-renames", then, now["commit"], *_pathspec())
    if between is None:
        return None
    before: dict[str, str | None] = measured.get("changed") or {}
    after: dict[str, str | None] = now["changed"]
    candidates = set(between.split("\n")) | set(before) | set(after)
    candidates.discard("")

    def content(commit: str, changed: dict[str, str | None], path: str) -> str | None:
        if path in changed:
            return changed[path]
        blob = git(root, "rev-parse", "--verify", "--quiet", f"{commit}:{path}")
        return blob.strip() if blob else None

    return sorted(
        p for p in candidates if content(then, before, p) != content(now["commit"], after, p)
    )


def describe(measured: dict[str, Any] | None, root: Path = ROOT) -> tuple[str, str]:
    """(a sentence on the code a result was measured on, its status for the targets table:
    "current", "older than the code it describes" or "unknown")."""
    if not measured or measured.get("commit") in (None, UNKNOWN):
        return (
            "Code: commit unknown (the result records none, or git was absent where it ran), "
            "so whether it describes the current code cannot be told.",
            UNKNOWN,
        )
    commit = str(measured["commit"])[:12]
    changed = measured.get("changed") or {}
    tree = (
        "the tree had no uncommitted changes"
        if measured.get("dirty") is False
        else f"the tree had uncommitted changes ({len(changed)} files of the measured code)"
        if changed
        else "the tree had uncommitted changes outside the measured code"
    )
    where = f"Code: measured at commit {commit}; {tree}."
    stale = changed_since(measured, root)
    if stale is None:
        return f"{where} Whether that is the current code cannot be told here.", UNKNOWN
    if stale:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        return (
            f"{where} **Older than the code it describes**: {len(stale)} measured files "
            f"changed since ({shown}).",
            "older than the code it describes",
        )
    return f"{where} The measured code is unchanged since.", "current"
