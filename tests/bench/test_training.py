"""The training benchmark's arithmetic: the CPU comparison's ratios and target verdicts on
hand-made measurements (the child processes it would run are replaced by their results), the
profile's split of the training thread's time, and the synthetic pairs' sizes."""

from pathlib import Path
from typing import Any

import pytest

from bench import training
from bench.common import Result

# What run_child returns for the three CPU runs (baseline, equal settings, tuned): the figures
# the comparison reads, as the children report them, and the wall time of each.
BASELINE = {
    "train_samples_per_second": 0.5,
    "train_runtime": 40.0,
    "peak_rss_mb": 2000.0,
    "cpu_s": 150.0,
    "other_load_cores": 0.0,
    "step_s": [4.0, 6.0, 5.0],
    "phases_s": {"import": 5.0, "load_and_prepare": 10.0, "save": 2.0},
    "gradient_checkpointing": False,
    "lora": False,
    "bf16": False,
    "reference_model": "loaded",
    "torch_threads": 2,
}
OURS = {
    "other_load_cores": 0.0,
    "ray_start_s": 5.0,
    "trainer_setup_s": 3.0,
    "lora": True,
    "bf16": False,
    "torch_threads": 2,
    "gradient_checkpointing": False,
    "global_step": 5,
    "final": {"loss": 0.6},
}
EQUAL = {
    **OURS,
    "train_samples_per_second": 0.55,
    "train_runtime": 36.0,
    "peak_rss_mb": 2400.0,
    "cpu_s": 200.0,
    "step_s": [4.0, 4.5],
    "fit_s": 100.0,
    "lora": False,
}
TUNED = {
    **OURS,
    "train_samples_per_second": 0.8,
    "train_runtime": 25.0,
    "peak_rss_mb": 1500.0,
    "cpu_s": 120.0,
    "step_s": [2.5, 2.0, 3.0],
    "fit_s": 60.0,
}
WALL_S = {"bench-cpu-0": 100.0, "bench-cpu-1": 125.0, "bench-cpu-2": 80.0}


def cpu_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, baseline: dict[str, Any] = BASELINE
) -> Result:
    model = tmp_path / "model"
    model.mkdir()
    measured = {"bench-cpu-0": baseline, "bench-cpu-1": EQUAL, "bench-cpu-2": TUNED}

    def run_child(module: str, spec: dict[str, Any], folder: Path, **_: Any):
        return dict(measured[spec["run_id"]]), WALL_S[spec["run_id"]]

    monkeypatch.setattr(training, "embedded_model", lambda: model)
    monkeypatch.setattr(training, "sequence_tokens", lambda *_: 300.0)
    monkeypatch.setattr(training, "run_child", run_child)
    result = Result("training", "DPO training", command="python -m bench.training")
    training.cpu_comparison(result, tmp_path, profile=False)
    return result


@pytest.fixture
def cpu_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Result:
    return cpu_comparison(tmp_path, monkeypatch)


def test_cpu_targets_are_ratios_to_trl_standalone(cpu_result: Result) -> None:
    verdicts = {t.name: (t.value, t.goal, t.met, t.shortfall) for t in cpu_result.targets}
    equal = "equal settings vs TRL standalone"
    tuned = (
        "tuned defaults (LoRA, float32, precomputed reference log-probs) vs TRL standalone full "
        "fine-tuning (different settings)"
    )
    assert verdicts == {
        # 0.55 / 0.5 pairs/s
        f"trainer samples/s, Ray Train job with {equal}": (1.1, 1.0, True, ""),
        # 20 pairs in 125 s against 100 s: 100 / 125
        f"job pairs/s incl. start-up, Ray Train job with {equal}": (
            0.8,
            1.0,
            False,
            "missed by 0.2x (20% of the goal)",
        ),
        # 0.8 / 0.5 pairs/s
        f"trainer samples/s, Ray Train job with {tuned}": (1.6, 1.5, True, ""),
        # 100 / 80 s
        f"job pairs/s incl. start-up, Ray Train job with {tuned}": (
            1.25,
            1.5,
            False,
            "missed by 0.25x (17% of the goal)",
        ),
    }


def test_equal_settings_are_checked_against_what_each_run_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TRL at its default, gradient checkpointing on, against our job without it: not equal.
    result = cpu_comparison(tmp_path, monkeypatch, {**BASELINE, "gradient_checkpointing": True})
    verdicts = {t.name: t.verdict for t in result.targets if "equal settings" in t.name}
    assert set(verdicts.values()) == {
        "not settled (the settings differ: gradient_checkpointing: True vs False)"
    }
    assert training.unequal_settings(BASELINE, EQUAL) == []
    assert training.unequal_settings({"bf16": False}, {"bf16": False}) == [
        "gradient_checkpointing: unreported vs unreported",
        "lora: unreported vs unreported",
        "torch_threads: unreported vs unreported",
    ]


def test_cpu_baseline_turns_gradient_checkpointing_off_as_our_cpu_job_runs(
    tmp_path: Path,
) -> None:
    runs = training.cpu_runs(tmp_path / "model", tmp_path / "pairs.jsonl")
    (_, _, baseline), (_, _, equal), (_, _, tuned) = runs
    assert baseline["gradient_checkpointing"] is False
    # Our job's gradient checkpointing follows use_gpu: off for both CPU runs.
    assert equal["config"]["use_gpu"] is False and tuned["config"]["use_gpu"] is False
    assert (equal["config"]["lora"], equal["config"]["bf16"]) == (False, False)
    assert equal["config"]["precompute_ref_log_probs"] is False
    assert baseline["bf16"] is False and "lora_rank" not in baseline


def test_cpu_table_puts_each_run_beside_the_baseline(cpu_result: Result) -> None:
    (table,) = cpu_result.tables
    base, equal, tuned = table["rows"]
    # trainer pairs/s, x baseline, job pairs/s (20 pairs / wall), x baseline
    assert base[1:5] == [0.5, 1.0, 0.2, 1.0]
    assert equal[1:5] == [0.55, 1.1, 0.16, 0.8]
    assert tuned[1:5] == [0.8, 1.6, 0.25, 1.25]
    # median step s and the speed-up over the baseline's median (5 s): 5 / 4.25, 5 / 2.5
    assert (base[5], base[6]) == (5.0, 1.0)
    assert (equal[5], equal[6]) == (4.2, 1.18)
    assert (tuned[5], tuned[6]) == (2.5, 2.0)
    # peak RSS MB and its ratio
    assert (equal[9], equal[10], tuned[9], tuned[10]) == (2400, 1.2, 1500, 0.75)
    # Time outside training: wall minus train_runtime.
    outside = {
        "TRL DPOTrainer standalone (baseline)": 60.0,
        "prefloop Ray Train job, equal settings": 89.0,
        "prefloop Ray Train job, tuned defaults": 55.0,
    }
    assert cpu_result.notes[0].startswith(f"job wall time outside training (s): {outside}.")


def test_profile_splits_the_training_thread_by_category(tmp_path: Path) -> None:
    trainer = "train_loop (/x/training/trainer.py:300)"
    step = (
        "_inner_training_loop (/x/transformers/trainer.py:10);"
        "training_step (/x/transformers/trainer.py:20)"
    )
    lines = [
        f"MainThread;{trainer};_precompute_ref_logps (/x/trl/dpo_trainer.py:5) 100",
        f"MainThread;{trainer};{step};backward (/x/torch/_tensor.py:7) 50",
        f"MainThread;{trainer};{step};step (/x/torch/optim/adamw.py:9) 30",
        f"MainThread;{trainer};from_pretrained (/x/transformers/modeling_utils.py:1) 20",
        "Thread-2;wait (/x/threading.py:1) 1000",  # an idle thread: not the training thread
        "garbage line",
    ]
    path = tmp_path / "profile.txt"
    path.write_text("\n".join(lines))
    # 200 samples of the training thread at 10 per second, in PROFILE_CATEGORIES' order.
    assert training.summarize_profile(path, rate=10) == (
        "reference log-probs (forward, no grad) 10 s (50%); "
        "backward, layers 5 s (25%); "
        "optimizer step 3 s (15%); "
        "start-up: imports, model load, tokenization, Ray 2 s (10%)"
    )
    assert training.summarize_profile(tmp_path / "none.txt").startswith("no profile")


def test_synthetic_pairs_have_the_shape_sizes() -> None:
    shape = training.SHAPES["tiny"]
    rows = training.synthetic_rows(shape, seed=0)
    assert len(rows) == shape.pairs
    for row in rows:
        assert len(row["prompt"][0]["content"]) == shape.prompt_bytes
        assert len(row["chosen"][0]["content"]) == len(row["rejected"][0]["content"])
        assert len(row["chosen"][0]["content"]) == shape.answer_bytes
    assert rows == training.synthetic_rows(shape, seed=0)
