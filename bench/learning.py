"""The learning target of DESIGN.md (the quality row), read from the demo's report.

`make demo` (deploy/demo.py) measures the simulated users' approval of the held-out prompts on the
base and after each of three training cycles in a row, and writes `<data dir>/demo/report.json`;
no benchmark script trains to a lift, so `bench.report` takes the rows from there:

- held-out approval lift of one cycle, in points, against DESIGN.md's >= 30. Each approval is a
  share of `heldout_prompts x SAMPLES_PER_PROMPT` judged answers, so the lift carries sampling
  noise (about 3-4 points at 128 answers, DESIGN.md); its approximate 95% interval (two binomial
  samples) is the spread the verdict rests on, as the benchmarks' rounds are;
- held-out preference accuracy of the first cycle's candidate (the gate's, or the reward model's
  on the RLHF path), against >= 0.9, with a Wilson 95% interval over its held-out pairs;
- three cycles keep approval: after the third cycle against after the first, higher or equal
  within noise (met unless the whole interval of the change lies below zero).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bench.common import settle
from bench.provenance import ROOT, describe, git

TITLE = "Learning (from make demo)"
LIFT_GOAL_POINTS = 30.0
ACCURACY_GOAL = 0.9
Z95 = 1.96
# The code the demo's figures depend on: the trainer, the service, the demo and its users.
DEMO_CODE = ("training", "service", "deploy", "pyproject.toml")


@dataclass(frozen=True)
class Row:
    """One row of the targets table, with the interval its verdict rests on."""

    target: str
    value: float | None
    low: float | None
    high: float | None
    goal: float
    direction: Literal[">=", "<="]
    unit: str
    detail: str = ""
    missing: str = ""  # why there is no value
    goal_text: str = ""  # the goal in words, where it is no number
    noise_meets: bool = False  # an interval that straddles the goal meets it ("equal within noise")

    @property
    def goal_shown(self) -> str:
        return self.goal_text or f"{self.direction} {shown(self.goal, self.unit)}"

    @property
    def verdict(self) -> str:
        if self.value is None or self.low is None or self.high is None:
            return f"not measured ({self.missing})" if self.missing else "not measured"
        met = settle(self.low, self.high, self.goal, self.direction)
        if met is None:
            if self.noise_meets:
                return "met (equal within noise)"
            return "not settled (its 95% interval straddles the goal)"
        return "met" if met else "missed"


def demo_report_path() -> Path:
    """`<data dir>/demo/report.json`, the data dir from the service's settings."""
    from service.settings import load_settings

    return load_settings().data_dir / "demo" / "report.json"


def lift_interval(before: float, after: float, answers: int) -> tuple[float, float, float]:
    """(lift, low, high) in points of approval, from the shares approved before and after, each
    of `answers` judged answers: lift +- 1.96 standard errors of a difference of two independent
    binomial shares, sqrt(b(1-b)/n + a(1-a)/n). (The demo judges the same prompts with the same
    seeds both times; treating the two as independent overstates the noise a little, so a
    "met" holds.)"""
    lift = (after - before) * 100
    se = math.sqrt(before * (1 - before) / answers + after * (1 - after) / answers) * 100
    return lift, lift - Z95 * se, lift + Z95 * se


def wilson_interval(share: float, n: int) -> tuple[float, float]:
    """The Wilson 95% interval of a share observed over `n` trials (sound near 0 and 1, where the
    normal approximation is not)."""
    z2 = Z95 * Z95
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _answers(report: dict[str, Any]) -> int:
    return int(report.get("heldout_prompts") or 0) * int(report.get("samples_per_prompt") or 0)


def _served_after(cycle: dict[str, Any]) -> float | None:
    """The approval a cycle's own candidate earned; None when it was not promoted."""
    run = cycle.get("run") or {}
    if run.get("status") != "promoted":
        return None
    return (cycle.get("served") or {}).get("approval")


def _first_run(report: dict[str, Any]) -> dict[str, Any]:
    cycles = report.get("cycles") or [{}]
    return cycles[0].get("run") or {}


def lift_row(report: dict[str, Any]) -> Row:
    target = "held-out approval lift of one cycle"
    before = (report.get("base") or {}).get("approval")
    after = _served_after((report.get("cycles") or [{}])[0])
    answers = _answers(report)
    if before is None or after is None or not answers:
        why = (
            f"no new version was served; training run {_first_run(report).get('status', 'absent')}"
        )
        return Row(target, None, None, None, LIFT_GOAL_POINTS, ">=", "points", missing=why)
    lift, low, high = lift_interval(before, after, answers)
    detail = f"approval {before:.1%} -> {after:.1%} of {answers} judged answers each"
    return Row(target, lift, low, high, LIFT_GOAL_POINTS, ">=", "points", detail)


def accuracy_row(report: dict[str, Any]) -> Row:
    run = _first_run(report)
    if run.get("algorithm") == "rlhf":
        target = "reward model's held-out preference accuracy"
        reward = run.get("reward_model") or {}
        share, pairs = reward.get("heldout_accuracy"), reward.get("heldout_pairs")
    else:
        target = "held-out preference accuracy of the candidate"
        heldout = run.get("heldout") or {}
        share, pairs = heldout.get("accuracy"), heldout.get("pairs")
    if share is None or not pairs:
        return Row(target, None, None, None, ACCURACY_GOAL, ">=", "", missing="no held-out pairs")
    low, high = wilson_interval(float(share), int(pairs))
    return Row(target, float(share), low, high, ACCURACY_GOAL, ">=", "", f"{pairs} pairs")


def rising_row(report: dict[str, Any]) -> Row:
    """Approval of what serves after the third cycle against after the first (a rejected cycle
    leaves the version before it serving, and its approval stands)."""
    target = "three cycles keep approval"
    cycles = report.get("cycles") or []
    goal = "after the 3rd >= after the 1st, within noise"
    first = _served_after(cycles[0]) if cycles else None
    if len(cycles) < 3 or first is None:
        why = (
            f"the demo ran {len(cycles)} cycle(s)"
            if len(cycles) < 3
            else "the first cycle served no new version"
        )
        return Row(target, None, None, None, 0.0, ">=", "points", missing=why, goal_text=goal)
    last = (cycles[2].get("served") or {}).get("approval")
    if last is None:
        return Row(target, None, None, None, 0.0, ">=", "points", missing="no third measurement")
    change, low, high = lift_interval(first, last, _answers(report))
    statuses = ", ".join(str((c.get("run") or {}).get("status")) for c in cycles[:3])
    detail = (
        f"approval {first:.1%} after the first cycle -> {last:.1%} after the third ({statuses})"
    )
    return Row(
        target, change, low, high, 0.0, ">=", "points", detail, goal_text=goal, noise_meets=True
    )


def rows(report: dict[str, Any]) -> list[Row]:
    return [lift_row(report), accuracy_row(report), rising_row(report)]


def provenance(path: Path, report: dict[str, Any], root: Path = ROOT) -> tuple[str, str]:
    """(a sentence on when and from which code the report was written, its code status)."""
    written = datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")
    code = report.get("code")
    if isinstance(code, dict) or report.get("commit"):
        recorded = code if isinstance(code, dict) else {"commit": report["commit"]}
        sentence, status = describe(recorded, root)
        return f"Written {written} (UTC). {sentence}", status
    # No commit recorded: the best that can be said is whether the demo's code was committed
    # after the report was written.
    last = git(root, "log", "-1", "--format=%H %ct", "--", *DEMO_CODE)
    if not last:
        return f"Written {written} (UTC); it records no commit, and git is absent here.", "unknown"
    commit, _, seconds = last.strip().partition(" ")
    changed = datetime.fromtimestamp(int(seconds), UTC).isoformat(timespec="seconds")
    if int(seconds) > path.stat().st_mtime:
        return (
            f"Written {written} (UTC); it records no commit. **Older than the code it "
            f"describes**: commit {commit[:12]} changed the demo's code ({', '.join(DEMO_CODE)}) "
            f"at {changed}, after the report was written.",
            "older than the code it describes",
        )
    return (
        f"Written {written} (UTC); it records no commit. The last commit that changed the demo's "
        f"code ({commit[:12]}, {changed}) is older than the report; uncommitted changes at the "
        "time cannot be told.",
        "unknown",
    )


def section(path: Path | None = None) -> tuple[list[Row], list[str], str]:
    """(targets-table rows, the section's lines, the report's code status) from the demo's
    report; without one, no rows and a section that says how to make it."""
    try:
        path = path or demo_report_path()
    except Exception as exc:  # settings that do not load: say so instead of failing the report
        return [], [f"## {TITLE}", "", f"The demo's report could not be located: {exc}."], ""
    if not path.exists():
        return (
            [],
            [
                f"## {TITLE}",
                "",
                f"No demo report at {path}: the learning target (DESIGN.md's quality row) is "
                "not measured. `make demo` runs three training cycles and writes it there; then "
                "`.venv/bin/python -m bench.report`.",
            ],
            "",
        )
    report = json.loads(path.read_text())
    found = rows(report)
    sentence, status = provenance(path, report)
    cycles = report.get("cycles") or []
    runs = "; ".join(
        f"{c.get('number')}: {(c.get('run') or {}).get('algorithm', '?')} run "
        f"{(c.get('run') or {}).get('id', '-')} {(c.get('run') or {}).get('status', '-')}, "
        f"{c.get('cycle_s', '?')} s"
        for c in cycles
    )
    lines = [
        f"## {TITLE}",
        "",
        f"`make demo` ({path}): {len(cycles)} cycles ({runs}); demo {report.get('demo_s', '?')} s.",
        "",
        sentence,
        "",
        "| target | measured | 95% interval | goal | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in found:
        lines.append(
            f"| {row.target} | {shown(row.value, row.unit)} | "
            f"{_interval(row)} | {row.goal_shown} | {row.verdict} |"
        )
    lines += ["", *[f"- {row.target}: {row.detail}" for row in found if row.detail]]
    lines.append(
        "- The intervals are the sampling noise of one run: a target is met only when its whole "
        "interval clears the goal, missed when none of it does."
    )
    return found, lines, status


def shown(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "points":
        return f"{value:+.1f} points"
    return f"{value:.2f}"


def _interval(row: Row) -> str:
    if row.low is None or row.high is None:
        return "-"
    if row.unit == "points":
        return f"{row.low:+.1f} to {row.high:+.1f}"
    return f"{row.low:.2f}-{row.high:.2f}"
