"""The learning target's row from a demo report: the lift and its interval, the held-out accuracy,
the verdicts, and the section the report writes (or its absence)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import learning, report
from bench.learning import accuracy_row, lift_interval, lift_row, rising_row, wilson_interval


# Three DPO cycles as deploy/demo.py reports them (the keys the rows read, hand-chosen numbers).
def _cycle(number: int, approval: float, status: str = "promoted") -> dict:
    return {
        "number": number,
        "run": {
            "id": f"run-{number}",
            "algorithm": "dpo",
            "status": status,
            "candidate": f"v-{number}",
            "heldout": {"accuracy": 0.95, "margin": 0.4, "pairs": 40},
        },
        "cycle_s": 290.0,
        "served": {"version": f"v-{number}", "approval": approval},
    }


REPORT = {
    "heldout_prompts": 32,
    "samples_per_prompt": 4,
    "base": {"version": "base", "approval": 0.10},
    "cycles": [_cycle(1, 0.50), _cycle(2, 0.55), _cycle(3, 0.60)],
    "demo_s": 1700.0,
}


def _with(before: float, after: float) -> dict:
    return {**REPORT, "base": {"approval": before}, "cycles": [_cycle(1, after)]}


def test_lift_interval_is_two_binomial_standard_errors_wide():
    # 10% -> 50% of 128 answers: se = sqrt(.1 * .9 / 128 + .5 * .5 / 128) = 0.05154.
    lift, low, high = lift_interval(0.10, 0.50, 128)
    assert lift == pytest.approx(40.0)
    assert (low, high) == (pytest.approx(29.90, abs=0.01), pytest.approx(50.10, abs=0.01))


def test_wilson_interval_by_hand():
    # 19 of 20: centre (0.95 + 3.8416 / 40) / (1 + 3.8416 / 20) = 0.8775,
    # half 1.96 * sqrt(0.95 * 0.05 / 20 + 3.8416 / 1600) / 1.19208 = 0.1136.
    low, high = wilson_interval(0.95, 20)
    assert (low, high) == (pytest.approx(0.7639, abs=1e-3), pytest.approx(0.9911, abs=1e-3))
    assert wilson_interval(1.0, 10)[1] == 1.0


@pytest.mark.parametrize(
    ("before", "after", "verdict"),
    [
        (0.10, 0.60, "met"),  # +50, 40.1 to 59.9
        (0.10, 0.50, "not settled (its 95% interval straddles the goal)"),  # +40, 29.9 to 50.1
        (0.06, 0.18, "missed"),  # +12, DESIGN.md's kind of cycle
    ],
)
def test_lift_verdict_rests_on_its_interval(before, after, verdict):
    row = lift_row(_with(before, after))
    assert row.value == pytest.approx((after - before) * 100)
    assert row.verdict == verdict
    assert "of 128 judged answers each" in row.detail


def test_no_new_version_is_no_measurement():
    rejected = {**REPORT, "cycles": [_cycle(1, 0.10, status="rejected")]}
    row = lift_row(rejected)
    assert row.value is None
    assert row.verdict == "not measured (no new version was served; training run rejected)"
    assert rising_row(rejected).verdict == "not measured (the demo ran 1 cycle(s))"


@pytest.mark.parametrize(
    ("third", "verdict"),
    [
        (0.70, "met"),  # +20, the whole interval above 0
        (0.45, "met (equal within noise)"),  # -5, 95% interval -17.2 to +7.2
        (0.25, "missed"),  # -25: a fall beyond the noise
    ],
)
def test_three_cycles_keep_approval_unless_it_falls_beyond_the_noise(third, verdict):
    report = {**REPORT, "cycles": [_cycle(1, 0.50), _cycle(2, 0.55), _cycle(3, third)]}
    row = rising_row(report)
    assert row.value == pytest.approx((third - 0.50) * 100)
    assert row.verdict == verdict
    assert "(promoted, promoted, promoted)" in row.detail


def test_a_rejected_cycle_leaves_the_approval_of_the_version_before_it():
    # The demo measures nothing new after a rejection: the third cycle's "served" is the second's.
    cycles = [_cycle(1, 0.50), _cycle(2, 0.40), _cycle(3, 0.40, status="rejected")]
    row = rising_row({**REPORT, "cycles": cycles})
    assert row.value == pytest.approx(-10.0)
    assert "(promoted, promoted, rejected)" in row.detail


def test_accuracy_row_reads_the_gate_or_the_reward_model():
    # 0.95 of 40 pairs: Wilson 0.835 to 0.986, straddling 0.9.
    row = accuracy_row(REPORT)
    assert (row.target, row.value) == ("held-out preference accuracy of the candidate", 0.95)
    assert row.verdict == "not settled (its 95% interval straddles the goal)"

    def first(run: dict) -> dict:
        return {**REPORT, "cycles": [{"run": run}]}

    assert accuracy_row(first({"heldout": {"accuracy": 0.73, "pairs": 16}})).verdict == "missed"
    rlhf = {"algorithm": "rlhf", "reward_model": {"heldout_accuracy": 1.0, "heldout_pairs": 200}}
    row = accuracy_row(first(rlhf))
    assert row.target == "reward model's held-out preference accuracy" and row.verdict == "met"
    skipped = {"heldout": {"pairs": 0, "skipped": True}}
    assert accuracy_row(first(skipped)).verdict == "not measured (no held-out pairs)"


def test_section_from_a_demo_report(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    rows, lines, _ = learning.section(path)
    assert [r.target for r in rows] == [
        "held-out approval lift of one cycle",
        "held-out preference accuracy of the candidate",
        "three cycles keep approval",
    ]
    text = "\n".join(lines)
    assert text.startswith("## Learning (from make demo)")
    assert (
        "| held-out approval lift of one cycle | +40.0 points | +29.9 to +50.1 | >= +30.0 points | "
        "not settled (its 95% interval straddles the goal) |" in text
    )
    assert "| 0.95 | 0.83-0.99 | >= 0.90 |" in text
    # 50% -> 60%: se = sqrt(.5 * .5 / 128 + .6 * .4 / 128) = 0.06187, +10 +- 12.13.
    assert (
        "| three cycles keep approval | +10.0 points | -2.1 to +22.1 | after the 3rd >= after the "
        "1st, within noise | met (equal within noise) |" in text
    )
    assert "3 cycles (1: dpo run run-1 promoted, 290.0 s; 2: dpo run run-2" in text
    assert "Written " in text

    page = report.render({}, learned=(rows, lines, "unknown"))
    assert (
        "| Learning (from make demo) | held-out approval lift of one cycle | +40.0 points | "
        ">= +30.0 points | not settled (its 95% interval straddles the goal) | unknown |" in page
    )
    assert page.rstrip().endswith(lines[-1])


def test_section_without_a_demo_report_says_how_to_make_one(tmp_path: Path):
    rows, lines, status = learning.section(tmp_path / "demo" / "report.json")
    assert rows == [] and status == ""
    assert "not measured" in lines[2] and "`make demo`" in lines[2]
    page = report.render({}, learned=(rows, lines, status))
    assert "| Learning (from make demo) | (no demo report: `make demo`) |" in page


@pytest.mark.skipif(shutil.which("git") is None, reason="reads this checkout's history")
def test_a_report_written_before_the_demo_code_changed_is_flagged(tmp_path: Path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    # Written in 1970: every commit of the demo's code is newer.
    os.utime(path, (0, 0))
    sentence, status = learning.provenance(path, REPORT)
    assert status == "older than the code it describes"
    assert "records no commit" in sentence and "1970-01-01T00:00:00+00:00" in sentence
    # A report that records its commit is judged like a benchmark result.
    sentence, status = learning.provenance(path, {**REPORT, "commit": "0" * 40})
    assert status == "unknown" and "measured at commit 000000000000" in sentence
