"""The demo's report of three cycles: approval of each version serving with its change on the base
and on the cycle before, per topic, answer length, each cycle's stages, and the figure."""

from pathlib import Path

import pytest

from deploy import demo


def _approval(version: str, share: float, words: float) -> dict:
    return {
        "version": version,
        "approval": share,
        "by_topic": {"refunds": share, "shipping": share / 2},
        "words": words,
        "samples": 128,
        "failures": 0,
    }


def _cycle(number: int, status: str, served: dict) -> dict:
    return {
        "number": number,
        "conversations": 128,
        "traffic_failures": 0,
        "steady_requests": 40,
        "steady_failures": 1 if number == 2 else 0,
        "run": {
            "id": f"run-{number}",
            "algorithm": "dpo",
            "status": status,
            "error": "held-out preference accuracy 0.40 < 0.6" if status == "rejected" else None,
            "stages_s": {"sft": 100.0 + number, "train": 190.0, "gate": 40.0},
            "candidate": f"v-{number}",
            "steps": [{"loss": 0.69, "rewards/accuracies": 0.5}, {"rewards/accuracies": 0.75}],
            "heldout": {"accuracy": 0.7, "pairs": 20},
        },
        "cycle_s": 340.0,
        "feedback_to_served_s": 420.0,
        "swap_s": 2.1 if status == "promoted" else None,
        "failed_during_swap": 0 if status == "promoted" else None,
        "served": served,
    }


@pytest.fixture
def report() -> dict:
    first, third = _approval("v-1", 0.45, 33.0), _approval("v-3", 0.5, 30.0)
    return {
        "heldout_prompts": 32,
        "samples_per_prompt": 4,
        "base": _approval("base", 0.1, 61.0),
        "cycles": [
            _cycle(1, "promoted", first),
            _cycle(2, "rejected", first),  # a rejected candidate: the first version still serves
            _cycle(3, "promoted", third),
        ],
    }


def test_the_report_follows_approval_through_the_cycles(report, capsys):
    demo.print_report(report)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "  base     base                    10.0%  (mean 61 words)" in lines
    assert (
        "  cycle 1  v-1                     45.0%  (+35.0 on the base, +35.0 on the cycle before; "
        "mean 33 words)" in lines
    )
    assert "(+35.0 on the base, +0.0 on the cycle before; mean 33 words)" in lines[6]
    assert "(+40.0 on the base, +5.0 on the cycle before; mean 30 words)" in lines[7]
    assert "  refunds                  10 -> 45 -> 45 -> 50" in lines
    assert "  shipping                 5 -> 22 -> 22 -> 25" in lines
    assert "cycle 2: run run-2 rejected (held-out preference accuracy 0.40 < 0.6)" in lines
    assert "  held-out preference accuracy: 0.70 on 20 pairs (mean reward margin 0.00)" in lines
    assert "{'sft': 103.0, 'train': 190.0, 'gate': 40.0}" in out
    assert lines[-1] == "requests failed in the whole demo: 1 (120 steady + the traffic's)"


def test_the_figure_is_written(report, tmp_path: Path):
    path = tmp_path / "report.png"
    demo.plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cycles_must_be_at_least_one():
    with pytest.raises(SystemExit) as exc:
        demo.main(["--cycles", "0"])
    assert exc.value.code == 2
