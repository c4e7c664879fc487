"""The gate's reward-model check on tiny random-weight models: it rejects an RLHF candidate the
reward model does not prefer often enough, or one that drifted too far from the served version,
passes one within the bounds, and only reports (never rejects) for a DPO candidate."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.registry import Registry
from service.store import Store
from tests.training.test_gate import Canary
from training.config import GateConfig
from training.gate import run_gate
from training.reward_eval import RewardCheck, win_rate

PROMPTS = [[{"role": "user", "content": q}] for q in ("Reset my password?", "Where is my parcel?")]


def test_win_rate_counts_ties_half() -> None:
    # wins at 0 and 3, a tie at 1, a loss at 2: (1 + 0.5 + 0 + 1) / 4
    assert win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, 4.0]) == 0.625
    with pytest.raises(ValueError):
        win_rate([], [])


@pytest.fixture
def registry(store: Store, tmp_path: Path, tiny_model_dir: Path) -> Registry:
    reg = Registry(store, tmp_path)
    reg.ensure_base(tiny_model_dir)
    return reg


def full_copy(registry: Registry, tmp_path: Path, name: str, noise: float) -> object:
    """A full-weights candidate: the base's weights plus `noise` times Gaussian noise."""
    import torch
    from safetensors.torch import load_file, save_file

    base = registry.weights_path(registry.get("base"))
    out = tmp_path / "results" / name
    shutil.copytree(base, out / "weights")
    weights = out / "weights" / "model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(1)
    save_file(
        {k: v + noise * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
        str(weights),
        metadata={"format": "pt"},
    )
    return registry.publish(
        version_id=name,
        parent=registry.get("base"),
        source=out,
        kind="full",
        algorithm="ppo",
        snapshot_id=None,
        config={},
        metrics={},
    )


def judge(registry, candidate, tiny_reward_dir, *, decides: bool, reference=None, **gate_cfg):
    check = RewardCheck(
        decides=decides,
        reward_model_path=tiny_reward_dir,
        reward_model_id="rm-test",
        reference_weights=reference,
        reward_stats={"score_mean": 0.0, "score_std": 1.0},
        prompts=list(PROMPTS),
        max_new_tokens=8,
        temperature=1.0,
        seed=0,
    )
    return run_gate(
        registry,
        candidate,
        registry.get("base"),
        [],
        cfg=GateConfig(**gate_cfg),
        beta=0.1,
        max_length=64,
        canary=Canary(),
        reward_check=check,
    )


def test_a_candidate_equal_to_the_served_version_ties_and_is_held_to_the_win_rate(
    registry, tmp_path, tiny_reward_dir
) -> None:
    same = full_copy(registry, tmp_path, "v-same", noise=0.0)
    # Same weights, same seed: the same answers, tied scores (win rate 0.5), KL 0.
    result = judge(registry, same, tiny_reward_dir, decides=True, min_win_rate=0.6)
    stats = result.metrics["reward_model"]
    assert stats["win_rate"] == 0.5 and stats["kl"] == pytest.approx(0.0, abs=1e-4)
    assert stats["length_change"] == 0.0 and stats["prompts"] == 2
    assert not result.passed
    assert result.reasons == ["reward-model win rate 0.50 < 0.6"]
    # Within the default bounds it passes on the same numbers.
    assert judge(registry, same, tiny_reward_dir, decides=True).passed


def test_a_candidate_far_from_the_served_version_is_rejected_on_kl(
    registry, tmp_path, tiny_reward_dir
) -> None:
    drifted = full_copy(registry, tmp_path, "v-drifted", noise=0.5)
    base = registry.weights_path(registry.get("base"))
    loose = {"min_win_rate": 0.0, "max_length_change": 100.0, "max_kl": 1.0}
    # Without a PPO reference (an SFT-only candidate) the drift is reported, not bounded.
    unbounded = judge(registry, drifted, tiny_reward_dir, decides=True, **loose)
    assert unbounded.passed and unbounded.metrics["reward_model"]["kl_reference"] is None
    assert unbounded.metrics["reward_model"]["kl"] > 1.0
    # As a PPO candidate that started from the base, its KL to that reference is bounded.
    result = judge(registry, drifted, tiny_reward_dir, decides=True, reference=base, **loose)
    stats = result.metrics["reward_model"]
    assert stats["kl_reference"] > 1.0
    assert not result.passed
    assert len(result.reasons) == 1 and result.reasons[0].startswith("KL to PPO's reference")
    # The reference (here the served weights) answered with the same seed: the same answers, so
    # PPO's own effect equals the whole path's.
    assert stats["reference_score"] == stats["served_score"]
    assert stats["win_rate_reference"] == stats["win_rate"]
    assert stats["kl_reference"] == pytest.approx(stats["kl"], rel=1e-4)
    assert stats["reference_tokens"] == stats["served_tokens"]


@pytest.mark.parametrize("after_ppo", [False, True])
def test_length_is_judged_against_ppos_reference_when_there_is_one(
    registry, tmp_path, tiny_reward_dir, monkeypatch, after_ppo
) -> None:
    """SFT halved the answers (-60% against the served version), PPO kept the SFT length (-5%):
    a PPO candidate passes, a candidate without a PPO stage is held to the served version's."""
    import training.reward_eval

    measured = {
        "prompts": 2, "reward_model": "rm-test", "win_rate": 1.0, "kl": 30.0,
        "length_change": -0.6, "candidate_tokens": 20.0, "served_tokens": 50.0,
        "candidate_score": 1.0, "served_score": -1.0, "win_rate_reference": None,
        "kl_reference": None, "length_change_reference": None, "reference_tokens": None,
        "reference_score": None,
    }  # fmt: skip
    if after_ppo:
        measured |= {
            "win_rate_reference": 0.5, "kl_reference": 2.0, "length_change_reference": -0.05,
            "reference_tokens": 21.0, "reference_score": 0.9,
        }  # fmt: skip
    monkeypatch.setattr(training.reward_eval, "reward_comparison", lambda *a: dict(measured))
    candidate = full_copy(registry, tmp_path, "v-short", noise=0.0)
    reference = registry.weights_path(registry.get("base")) if after_ppo else None
    result = judge(
        registry, candidate, tiny_reward_dir, decides=True, reference=reference,
        max_length_change=0.5,
    )  # fmt: skip
    if after_ppo:
        assert result.passed, result.reasons
    else:
        assert result.reasons == [
            "answer length changed by -60% from the served version (more than 50%)"
        ]


def test_for_a_dpo_candidate_the_numbers_are_reported_only(
    registry, tmp_path, tiny_reward_dir
) -> None:
    drifted = full_copy(registry, tmp_path, "v-dpo", noise=0.5)
    base = registry.weights_path(registry.get("base"))
    result = judge(
        registry, drifted, tiny_reward_dir, decides=False, reference=base, min_win_rate=1.0,
        max_kl=1e-3,
    )  # fmt: skip
    assert result.passed, result.reasons
    assert result.metrics["reward_model"]["kl"] > 1e-3
    # No held-out pairs: the DPO check still ran, and said so.
    assert result.metrics["heldout"] == {"pairs": 0, "skipped": True}
