"""The PPO loop on tiny random-weight models: one iteration changes every trainable parameter of
the policy's adapter and the value model, lowers the clipped surrogate on its own rollouts, and
reports what an operator reads (reward, KL, coefficient, clip fraction, lengths)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import training.ppo.trainer as ppo_module
from tests.training.conftest import QUESTIONS, write_jsonl
from training.ppo.trainer import PPOJob, ppo_loop

METRICS = {
    "reward",
    "score",
    "kl",
    "kl_coef",
    "answer_tokens",
    "eos_rate",
    "explained_variance",
    "policy_loss",
    "value_loss",
    "entropy",
    "clipfrac",
    "approx_kl",
    "ratio",
    "vf_clipfrac",
    "policy_loss_first_epoch",
    "policy_loss_last_epoch",
    "rollout_tokens_per_s",
    "iteration_s",
    "step",
}


@pytest.fixture
def models(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The models `ppo_loop` loads, with their trainable parameters before training."""
    seen: dict[str, Any] = {}
    load = ppo_module._load_models

    def spy(*args: Any, **kwargs: Any) -> Any:
        policy, value, reward = load(*args, **kwargs)
        seen.update(policy=policy, value=value, reward=reward)
        seen["before"] = {
            (role, name): p.detach().clone()
            for role, model in (("policy", policy), ("value", value))
            if model is not None
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        return policy, value, reward

    monkeypatch.setattr(ppo_module, "_load_models", spy)
    return seen


def make_ppo_job(
    tmp_path: Path, model_dir: Path, reward_dir: Path, tiny_config: Callable, **ppo: Any
) -> PPOJob:
    config = tiny_config()
    settings = {
        "iterations": 1,
        "rollouts_per_iteration": 4,
        "minibatch_size": 4,
        "epochs": 2,
        "max_new_tokens": 12,
        "temperature": 1.0,
        "learning_rate": 1e-2,
        "value_learning_rate": 1e-2,
        **ppo,
    }
    config.ppo = config.ppo.model_copy(update=settings)
    prompts = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS]
    return PPOJob(
        run_id="run-ppo",
        start_model_path=model_dir,
        reward_model_path=reward_dir,
        reward_stats={"score_mean": 0.0, "score_std": 1.0},
        prompts_file=write_jsonl(tmp_path / "prompts.jsonl", prompts),
        output_dir=tmp_path / "out",
        config=config,
    )


def test_one_gae_iteration_moves_every_trainable_parameter_and_lowers_the_surrogate(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_reward_dir: Path,
    tiny_config: Callable,
    models: dict[str, Any],
) -> None:
    import torch

    job = make_ppo_job(
        tmp_path,
        tiny_model_dir,
        tiny_reward_dir,
        tiny_config,
        advantage="gae",
        samples_per_prompt=1,
    )
    summary = ppo_loop(job.to_dict())

    after = {
        (role, name): p
        for role in ("policy", "value")
        for name, p in models[role].named_parameters()
        if p.requires_grad
    }
    assert {role for role, _ in models["before"]} == {"policy", "value"}
    unchanged = [k for k, p in models["before"].items() if torch.equal(p, after[k].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    assert all("lora_" in name for role, name in models["before"] if role == "policy")
    assert any("score" in name for role, name in models["before"] if role == "value")
    # The frozen reward model is not trained.
    assert not any(p.requires_grad for p in models["reward"].parameters())

    (step,) = summary["step_metrics"]
    assert step.keys() >= METRICS and step["step"] == 1
    assert all(math.isfinite(v) for v in step.values())
    # Whitened advantages have mean 0, so the surrogate starts at ~0 and the updates lower it.
    assert step["policy_loss_first_epoch"] == pytest.approx(0.0, abs=1e-5)
    assert step["policy_loss_last_epoch"] < step["policy_loss_first_epoch"]
    # The policy equals the reference until its first update: KL of the rollouts is 0.
    assert step["kl"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < step["answer_tokens"] <= 12
    assert step["kl_coef"] == job.config.ppo.kl_coef

    out = job.output_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "train_metrics.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "train_metrics.json").read_text())["episodes"] == 4


def test_leave_one_out_iteration_trains_the_policy_without_a_value_model(
    tmp_path: Path,
    tiny_model_dir: Path,
    tiny_reward_dir: Path,
    tiny_config: Callable,
    models: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    batches: list[list] = []
    iteration = ppo_module._iteration

    def recorded(prompts: list, *args: Any) -> dict[str, float]:
        batches.append(prompts)
        return iteration(prompts, *args)

    monkeypatch.setattr(ppo_module, "_iteration", recorded)
    job = make_ppo_job(
        tmp_path, tiny_model_dir, tiny_reward_dir, tiny_config,
        advantage="rloo", samples_per_prompt=2, rollouts_per_iteration=6, minibatch_size=6,
    )  # fmt: skip
    (step,) = ppo_loop(job.to_dict())["step_metrics"]

    # Three prompts, each answered twice side by side (the groups the baseline compares).
    (batch,) = batches
    assert len(batch) == 6 and batch[0::2] == batch[1::2] and len({str(p) for p in batch}) == 3
    assert models["value"] is None and {role for role, _ in models["before"]} == {"policy"}
    after = dict(models["policy"].named_parameters())
    unchanged = [n for (_, n), p in models["before"].items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged}"
    assert step.keys() >= METRICS - {"explained_variance", "value_loss", "vf_clipfrac"}
    assert not step.keys() & {"explained_variance", "value_loss", "vf_clipfrac"}
    assert step["policy_loss_last_epoch"] < step["policy_loss_first_epoch"]
    assert all(math.isfinite(v) for v in step.values())


def test_the_adaptive_coefficient_moves_between_iterations(
    tmp_path: Path, tiny_model_dir: Path, tiny_reward_dir: Path, tiny_config: Callable
) -> None:
    # A target far below any KL the updates cause: the coefficient must rise after each iteration
    # in which the policy has moved away from the reference (k3 is positive wherever they differ).
    job = make_ppo_job(
        tmp_path, tiny_model_dir, tiny_reward_dir, tiny_config,
        iterations=3, kl_target=1e-6, kl_horizon=8.0, kl_coef=0.1, kl_estimator="k3",
    )  # fmt: skip
    steps = ppo_loop(job.to_dict())["step_metrics"]
    coefficients = [s["kl_coef"] for s in steps]
    assert coefficients[0] == 0.1
    assert steps[1]["kl"] > 0
    # First iteration: KL 0 is below target (error -1 clipped to -0.2): 0.1 * (1 - 0.2 * 4 / 8).
    assert coefficients[1] == pytest.approx(0.1 * (1 - 0.2 * 4 / 8))
    # Second: KL above target (error clipped to +0.2).
    assert coefficients[2] == pytest.approx(coefficients[1] * (1 + 0.2 * 4 / 8))
