"""The learning target's row from a demo report: the lift and its interval, the held-out accuracy,
the verdicts, and the section the report writes (or its absence)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import learning, report
from bench.learning import accuracy_row, lift_interval, lift_row, wilson_interval

# One DPO cycle as deploy/demo.py reports it (the keys the row reads, with hand-chosen numbers).
REPORT = {
    "heldout_prompts": 32,
    "approval_before": 0.10,
    "approval_after": 0.50,
    "run": {
        "id": "run-1",
        "algorithm": "dpo",
        "status": "promoted",
        "candidate": "v-1",
        "heldout": {"accuracy": 0.95, "margin": 0.4, "pairs": 40},
    },
    "cycle_s": 290.0,
    "demo_s": 700.0,
}


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
    row = lift_row({**REPORT, "approval_before": before, "approval_after": after}, 4)
    assert row.value == pytest.approx((after - before) * 100)
    assert row.verdict == verdict
    assert "of 128 judged answers each" in row.detail


def test_no_new_version_is_no_measurement():
    row = lift_row({**REPORT, "approval_after": None, "run": {"status": "rejected"}}, 4)
    assert row.value is None
    assert row.verdict == "not measured (no new version was served; training run rejected)"


def test_accuracy_row_reads_the_gate_or_the_reward_model():
    # 0.95 of 40 pairs: Wilson 0.835 to 0.986, straddling 0.9.
    row = accuracy_row(REPORT)
    assert (row.target, row.value) == ("held-out preference accuracy of the candidate", 0.95)
    assert row.verdict == "not settled (its 95% interval straddles the goal)"
    assert accuracy_row(
        {**REPORT, "run": {"heldout": {"accuracy": 0.73, "pairs": 16}}}
    ).verdict == ("missed")
    rlhf = {"algorithm": "rlhf", "reward_model": {"heldout_accuracy": 1.0, "heldout_pairs": 200}}
    row = accuracy_row({**REPORT, "run": rlhf})
    assert row.target == "reward model's held-out preference accuracy" and row.verdict == "met"
    skipped = {"run": {"heldout": {"pairs": 0, "skipped": True}}}
    assert accuracy_row(skipped).verdict == "not measured (no held-out pairs)"


def test_section_from_a_demo_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(learning, "samples_per_prompt", lambda: 4)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    rows, lines, _ = learning.section(path)
    assert [r.target for r in rows] == [
        "held-out approval lift of one cycle",
        "held-out preference accuracy of the candidate",
        "three cycles keep approval rising",
    ]
    text = "\n".join(lines)
    assert text.startswith("## Learning (from make demo)")
    assert (
        "| held-out approval lift of one cycle | +40.0 points | +29.9 to +50.1 | >= +30.0 points | "
        "not settled (its 95% interval straddles the goal) |" in text
    )
    assert "| 0.95 | 0.83-0.99 | >= 0.90 |" in text
    assert "| three cycles keep approval rising | - | - | a lift in each of 3 cycles | " in text
    assert "dpo cycle, training run run-1 promoted, candidate v-1" in text
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
