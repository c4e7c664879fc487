"""The RLHF path through one cycle on tiny random-weight models, without Ray: feedback sent
through the API -> snapshot -> SFT -> reward model -> PPO -> gate -> promotion, and the next cycle
reusing the reward model; and the SFT stage inside DPO's job (`train.sft_first`). The training
jobs run in this process (the same worker functions Ray Train runs); only the vLLM canary is a
stand-in (it needs the real engine, covered in e2e)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import training.cycle as cycle_module
import training.ppo.trainer as ppo_module
import training.trainer as trainer_module
from service.registry import Registry
from service.runs import queue_run
from service.store import Store
from training.config import GateConfig, SnapshotConfig, TrainConfig, TrainingSettings
from training.cycle import CycleContext, run_cycle
from training.trainer import TrainResult


@pytest.fixture
def registry(store: Store, tmp_path: Path, tiny_model_dir: Path) -> Registry:
    reg = Registry(store, tmp_path)
    reg.ensure_base(tiny_model_dir)
    return reg


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Run the Ray Train workers' functions here, counting the jobs by kind."""
    jobs: dict[str, int] = {}

    def fit(loop: Any, loop_config: dict, cfg: Any, run_id: str, output_dir: Path) -> TrainResult:
        name = loop_config.get("algorithm", "ppo")
        jobs[name] = jobs.get(name, 0) + 1
        report = loop(loop_config)
        return TrainResult(
            output_dir=output_dir,
            step_metrics=report["step_metrics"],
            summary={k: v for k, v in report.items() if k != "step_metrics"},
        )

    monkeypatch.setattr(trainer_module, "fit_on_ray", fit)
    monkeypatch.setattr(ppo_module, "fit_on_ray", fit)
    return jobs


def settings(tmp_path: Path, tiny_model_dir: Path) -> TrainingSettings:
    train = TrainConfig(
        algorithm="rlhf",
        epochs=1.0,
        batch_size=2,
        lora_rank=4,
        lora_alpha=8,
        max_length=192,
        max_prompt_length=96,
        bf16=False,
    )
    train.sft.epochs = 1.0
    train.reward.retrain_after = 100
    train.ppo = train.ppo.model_copy(
        update={
            "iterations": 2,
            "rollouts_per_iteration": 4,
            "minibatch_size": 4,
            "max_new_tokens": 8,
            "temperature": 1.0,
        }
    )
    # Random weights have no answer worth preferring: open the quality bounds to check the
    # plumbing; the gate's own tests and the e2e run hold the bounds.
    gate = GateConfig(min_win_rate=0.0, max_kl=1e6, max_length_change=1e6, eval_prompts=4)
    return TrainingSettings(
        data_dir=tmp_path,
        snapshot=SnapshotConfig(heldout_fraction=0.3),
        train=train,
        gate=gate,
    )


async def give_feedback(client: Any, questions: list[str]) -> None:
    """Per question: a comparison of two answers, and a thumbs-down with the wanted answer."""
    for q in questions:
        body = (
            await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": q}], "n": 2}
            )
        ).json()
        pair = {
            "type": "pairwise",
            "winner": "a",
            "a": {"response_id": body["id"]},
            "b": {"response_id": body["id"], "choice_index": 1},
        }
        thumbs = {
            "type": "thumbs",
            "response_id": body["id"],
            "choice_index": 1,
            "rating": "down",
            "correction": f"Open Settings and pick {q.split()[-1]}.",
        }
        for event in (pair, thumbs):
            assert (await client.post("/v1/feedback", json=event)).status_code == 201


async def test_sft_reward_model_ppo_then_promotion_and_reuse(
    client: Any,
    registry: Registry,
    tmp_path: Path,
    tiny_model_dir: Path,
    in_process: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctx = CycleContext(
        registry=registry,
        settings=settings(tmp_path, tiny_model_dir),
        database_url=registry.store.url,
        canary=lambda weights, tokenizer, prompt: "Open Settings.",
    )
    await give_feedback(client, [f"How do I change setting number {i}?" for i in range(12)])
    recorded: list[set[str]] = []
    record = cycle_module.update_run

    def spy(store: Any, run_id: str, **fields: Any) -> None:
        if "stages" in fields:
            recorded.append(set(fields["stages"]))
        record(store, run_id, **fields)

    monkeypatch.setattr(cycle_module, "update_run", spy)
    run = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)

    assert run.status == "promoted", run.error
    # Each training stage was recorded as it ended, before PPO's: progress shows while it trains.
    assert {"snapshot", "sft"} in recorded and {"snapshot", "sft", "sft_register"} in recorded
    assert {"snapshot", "sft", "sft_register", "reward_model"} in recorded
    assert run.algorithm == "rlhf"
    assert in_process == {"sft": 1, "reward": 1, "ppo": 1}
    assert set(run.stages) >= {"snapshot", "sft", "reward_model", "train", "register", "gate"}
    # PPO's iterations are the run's step metrics.
    assert [s["step"] for s in run.step_metrics] == [1, 2]
    assert {"reward", "kl", "kl_coef", "clipfrac", "approx_kl"} <= set(run.step_metrics[0])

    by_kind = {v.algorithm: v for v in registry.versions() if v.id != "base"}
    sft, reward, ppo = by_kind["sft"], by_kind["reward"], by_kind["ppo"]
    assert (sft.kind, sft.parent_id, sft.status) == ("lora", "base", "candidate")
    assert (reward.kind, reward.status) == ("reward", "approved")
    assert reward.metrics["train"]["reward_model"]["heldout_pairs"] >= 0
    # PPO's adapter applies to the SFT version's merged weights, which are its KL reference.
    assert (ppo.kind, ppo.parent_id, ppo.weights_id) == ("lora", sft.id, sft.id)
    assert ppo.id == run.candidate_version_id == registry.served().version.id
    gate = ppo.metrics["gate"]["reward_model"]
    assert gate["reward_model"] == reward.id and 0.0 <= gate["win_rate"] <= 1.0
    assert gate["prompts"] >= 1 and gate["candidate_tokens"] > 0
    assert registry.checksum_mismatches(ppo) == []

    # A second cycle on new feedback keeps the reward model (fewer than 100 new pairs).
    await give_feedback(client, [f"Where is invoice number {i}?" for i in range(6)])
    second = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    assert second.status == "promoted", second.error
    assert in_process == {"sft": 2, "reward": 1, "ppo": 2}
    assert "reward_model" not in second.stages
    newest = registry.get(second.candidate_version_id)
    assert newest.metrics["reward_model"] == reward.id


@pytest.mark.parametrize("sft_first", [True, False])
async def test_dpo_starts_from_an_sft_stage_on_the_corrections_unless_switched_off(
    client: Any,
    registry: Registry,
    tmp_path: Path,
    tiny_model_dir: Path,
    in_process: dict,
    sft_first: bool,
) -> None:
    config = settings(tmp_path, tiny_model_dir)
    config.train = config.train.model_copy(update={"algorithm": "dpo", "sft_first": sft_first})
    config.gate = config.gate.model_copy(update={"min_accuracy": 0.0, "min_margin": -1e9})
    ctx = CycleContext(
        registry=registry,
        settings=config,
        database_url=registry.store.url,
        canary=lambda weights, tokenizer, prompt: "Open Settings.",
    )
    await give_feedback(client, [f"How do I change setting number {i}?" for i in range(12)])
    run = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)

    assert run.status == "promoted", run.error
    # One Ray Train job either way: the SFT stage runs inside DPO's, before it.
    assert in_process == {"dpo": 1}
    assert not {"sft", "sft_register"} & set(run.stages)
    dpo = registry.get(run.candidate_version_id)
    assert (dpo.algorithm, dpo.parent_id, dpo.weights_id) == ("dpo", "base", "base")
    assert [v.algorithm for v in registry.versions() if v.id != "base"] == ["dpo"]
    train = dpo.metrics["train"]
    # The run's stored steps, as `prefloop status` shows them while the job trains.
    dpo_steps = [step for step in run.step_metrics if step.get("stage") != "sft"]
    assert dpo_steps and all("rewards/chosen" in step for step in dpo_steps)
    if not sft_first:
        assert "sft" not in train
        return
    sft = train["sft"]
    assert sft["rows"] >= 1 and sft["global_step"] == len(sft["step_metrics"]) >= 1
    assert [s for s in run.step_metrics if s.get("stage") == "sft"] == sft["step_metrics"]
    assert {s["stage"] for s in dpo_steps} == {"dpo"}
    # SFT's own steps (token accuracy on the endorsed answers), kept apart from DPO's.
    assert all("mean_token_accuracy" in step for step in sft["step_metrics"])
    assert sft["step_metrics"][0]["loss"] != sft["step_metrics"][-1]["loss"]
    # DPO's reference is where it starts, the SFT result: before its first update the policy is
    # the reference, so the first step's implicit rewards are zero.
    first = dpo_steps[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-4)
