"""The gate's measurements: exact numbers for the reward math, the tiny model for log-probs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.training import byte_tokenizer
from training.evaluation import (
    heldout_reward_stats,
    implicit_rewards,
    preference_accuracy,
    sequence_logps,
    weights_are_finite,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_implicit_rewards_by_hand() -> None:
    chosen, rejected = implicit_rewards(
        policy_chosen_logps=t(-10.0, -12.0, -5.0),
        policy_rejected_logps=t(-11.0, -9.0, -7.0),
        ref_chosen_logps=t(-11.0, -12.0, -6.0),
        ref_rejected_logps=t(-10.0, -10.0, -5.0),
        beta=0.5,
    )
    # 0.5 * (-10 - -11) = 0.5; 0.5 * (-12 - -12) = 0; 0.5 * (-5 - -6) = 0.5
    assert chosen.tolist() == [0.5, 0.0, 0.5]
    # 0.5 * (-11 - -10) = -0.5; 0.5 * (-9 - -10) = 0.5; 0.5 * (-7 - -5) = -1
    assert rejected.tolist() == [-0.5, 0.5, -1.0]


def test_preference_accuracy_by_hand() -> None:
    # margins 1.0, -0.5, 1.5: two of three right, mean margin 2.0 / 3
    accuracy, margin = preference_accuracy(t(0.5, 0.0, 0.5), t(-0.5, 0.5, -1.0))
    assert accuracy == pytest.approx(2 / 3)
    assert margin == pytest.approx(2 / 3)
    # A tie is a miss.
    assert preference_accuracy(t(0.25, 0.25), t(0.25, 0.0)) == (0.5, 0.125)


def test_preference_accuracy_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one pair"):
        preference_accuracy(t(), t())
    with pytest.raises(ValueError, match="differ in shape"):
        preference_accuracy(t(1.0, 2.0), t(1.0))


def reference_logp(
    model: torch.nn.Module, tokenizer, prompt: list[dict], answer: list[dict]
) -> float:
    """One sequence, no padding: the sum of log p(token) over the answer, the slow obvious way."""
    prompt_ids = tokenizer.apply_chat_template(
        prompt, tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=True, return_dict=True)
    ids = torch.tensor([full["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(logps[i - 1, ids[0, i]].item() for i in range(len(prompt_ids), ids.shape[1]))


def test_sequence_logps_sums_answer_tokens_only(
    tiny_model_dir: Path, pair_rows: list[dict]
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = byte_tokenizer()
    # Rows of different lengths, so batching pads.
    rows = [*pair_rows[:2], {**pair_rows[2], "prompt": [{"role": "user", "content": "Hi?"}]}]
    chosen, rejected = sequence_logps(model, tokenizer, rows, max_length=192, batch_size=2)

    assert chosen.shape == rejected.shape == (3,)
    for i, row in enumerate(rows):
        assert chosen[i].item() == pytest.approx(
            reference_logp(model, tokenizer, row["prompt"], row["chosen"]), abs=1e-3
        )
        assert rejected[i].item() == pytest.approx(
            reference_logp(model, tokenizer, row["prompt"], row["rejected"]), abs=1e-3
        )
    # Truncation keeps the first max_length tokens: a cut answer scores fewer tokens.
    short, _ = sequence_logps(model, tokenizer, rows[:1], max_length=60, batch_size=2)
    assert short[0].item() > chosen[0].item()


def test_heldout_stats_switch_adapters(
    tiny_model_dir: Path, parent_adapter_dir: Path, pair_rows: list[dict]
) -> None:
    def stats(candidate: Path | None, reference: Path | None) -> dict:
        return heldout_reward_stats(
            tiny_model_dir, candidate, reference, pair_rows, beta=0.1, max_length=192
        )

    adapter_vs_base = stats(parent_adapter_dir, None)
    base_vs_adapter = stats(None, parent_adapter_dir)
    assert adapter_vs_base["pairs"] == 4
    assert adapter_vs_base["margin"] != 0.0
    # Swapping candidate and reference flips every reward.
    assert base_vs_adapter["margin"] == pytest.approx(-adapter_vs_base["margin"], rel=1e-4)
    assert base_vs_adapter["chosen_reward"] == pytest.approx(
        -adapter_vs_base["chosen_reward"], rel=1e-4
    )
    # A candidate equal to its reference earns nothing, and a tie is a miss.
    same = stats(parent_adapter_dir, parent_adapter_dir)
    assert (same["accuracy"], same["margin"]) == (0.0, 0.0)


def test_heldout_stats_in_bf16_keep_the_float32_verdict(
    tiny_model_dir: Path, parent_adapter_dir: Path, pair_rows: list[dict]
) -> None:
    def stats(bf16: bool) -> dict:
        return heldout_reward_stats(
            tiny_model_dir, parent_adapter_dir, None, pair_rows, beta=0.1, max_length=192, bf16=bf16
        )

    exact, rounded = stats(False), stats(True)
    assert rounded["accuracy"] == exact["accuracy"]
    assert rounded["margin"] == pytest.approx(exact["margin"], rel=0.1)
    assert rounded["margin"] != exact["margin"]  # bf16 did run: its rounding shows


def test_heldout_stats_full_weights_reference_and_no_rows(
    tiny_model_dir: Path, pair_rows: list[dict]
) -> None:
    full = heldout_reward_stats(
        tiny_model_dir,
        None,
        None,
        pair_rows[:2],
        beta=0.1,
        max_length=192,
        reference_model_path=tiny_model_dir,
    )
    assert (full["accuracy"], full["margin"], full["pairs"]) == (0.0, 0.0, 2)
    empty = heldout_reward_stats(tiny_model_dir, None, None, [], beta=0.1, max_length=192)
    assert empty["pairs"] == 0
    with pytest.raises(ValueError, match="not both"):
        heldout_reward_stats(
            tiny_model_dir,
            None,
            tiny_model_dir,
            pair_rows,
            beta=0.1,
            max_length=192,
            reference_model_path=tiny_model_dir,
        )


def test_weights_are_finite(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    assert weights_are_finite(tmp_path) is False  # nothing to check is not a valid artifact
    save_file(
        {"w": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(4)},
        str(tmp_path / "a.safetensors"),
    )
    assert weights_are_finite(tmp_path) is True
    nested = tmp_path / "sub"
    nested.mkdir()
    save_file({"w": torch.tensor([1.0, float("inf")])}, str(nested / "b.safetensors"))
    assert weights_are_finite(tmp_path) is False
    save_file({"w": torch.tensor([float("nan")])}, str(nested / "b.safetensors"))
    assert weights_are_finite(tmp_path) is False
