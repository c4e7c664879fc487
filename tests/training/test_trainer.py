"""Trainer tests on a tiny random-weight Llama: a step or two of DPO / KTO, then check that every
trainable parameter moved, what was saved, and the metrics. The `ray` test runs the same job
through Ray Train's `TorchTrainer` and a SQLite store."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import training.trainer as trainer_module
from bench.training import byte_tokenizer
from tests.training.conftest import DIRECT as DIRECT_TEXT
from tests.training.conftest import PITCH as PITCH_TEXT
from tests.training.conftest import write_jsonl
from training.config import TrainConfig
from training.trainer import TrainJob, fit_prompts, run_training, train_loop

DPO_KEYS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "learning_rate",
    "epoch",
    "step",
}
# "kl" is KTO's alone (DPO logs none); rewards of both labels mean both reached the loss.
KTO_KEYS = {
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "learning_rate",
    "epoch",
    "step",
}


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Captures the trainer `train_loop` builds and its trainable parameters before training."""
    seen: dict[str, Any] = {}
    build = trainer_module._build_trainer

    def spy(*args: Any, **kwargs: Any) -> Any:
        trainer = build(*args, **kwargs)
        seen["trainer"] = trainer
        seen["before"] = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if p.requires_grad
        }
        seen["frozen"] = {
            name: p.detach().clone()
            for name, p in trainer.model.named_parameters()
            if not p.requires_grad
        }
        return trainer

    monkeypatch.setattr(trainer_module, "_build_trainer", spy)
    return seen


def make_job(
    tmp_path: Path,
    model_dir: Path,
    rows: list[dict],
    config: TrainConfig,
    *,
    algorithm: str = "dpo",
    parent: Path | None = None,
    **extra: Any,
) -> TrainJob:
    return TrainJob(
        run_id="run-test",
        algorithm=algorithm,  # type: ignore[arg-type]
        base_model_path=model_dir,
        parent_adapter_path=parent,
        train_file=write_jsonl(tmp_path / "train.jsonl", rows),
        output_dir=tmp_path / "out",
        config=config,
        **extra,
    )


def assert_all_changed(seen: dict[str, Any]) -> None:
    import torch

    after = dict(seen["trainer"].model.named_parameters())
    assert seen["before"], "nothing was trainable"
    unchanged = [n for n, p in seen["before"].items() if torch.equal(p, after[n].detach())]
    assert not unchanged, f"parameters that did not move: {unchanged}"


def saved_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_dpo_lora_trains_every_adapter_weight_and_saves_it(
    tmp_path: Path,
    tiny_model_dir: Path,
    pair_rows: list[dict],
    tiny_config: Callable,
    trained: dict[str, Any],
) -> None:
    # Two steps: LoRA B starts at zero, so A gets its first gradient only in the second step.
    job = make_job(tmp_path, tiny_model_dir, pair_rows, tiny_config(batch_size=2))
    summary = train_loop(job.to_dict())

    assert_all_changed(trained)
    assert all("lora_" in name for name in trained["before"])
    out = job.output_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_metrics.json",
    ]
    tensors = saved_tensors(out)
    assert len(tensors) == len(trained["before"])
    assert not any(".ref." in key for key in tensors)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    steps = summary["step_metrics"]
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0].keys() >= DPO_KEYS
    # Policy and reference are the same model until the first update.
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    on_disk = json.loads((out / "train_metrics.json").read_text())
    assert on_disk["rows"] == 4 and on_disk["global_step"] == 2
    assert on_disk["train_samples_per_second"] > 0
    assert on_disk["final"] == steps[-1]


def test_iterative_dpo_trains_the_served_adapter_against_a_frozen_copy(
    tmp_path: Path,
    tiny_model_dir: Path,
    parent_adapter_dir: Path,
    pair_rows: list[dict],
    tiny_config: Callable,
    trained: dict[str, Any],
) -> None:
    import torch

    job = make_job(
        tmp_path, tiny_model_dir, pair_rows, tiny_config(batch_size=4), parent=parent_adapter_dir
    )
    summary = train_loop(job.to_dict())

    assert_all_changed(trained)  # one step: the parent's B is not zero, so A moves too
    parent = saved_tensors(parent_adapter_dir)
    child = saved_tensors(job.output_dir)
    assert parent.keys() == child.keys()
    assert all(not torch.equal(parent[k], child[k]) for k in parent)
    # TRL's "ref" adapter holds the served weights, frozen.
    refs = {n: p for n, p in trained["frozen"].items() if ".ref." in n}
    assert len(refs) == len(parent)
    for name, value in refs.items():
        assert torch.equal(value, parent[name.replace(".ref.", ".")])
    # The reference is the served version, not the base: no reward before the first update.
    assert summary["step_metrics"][0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert summary["parent_adapter"] == str(parent_adapter_dir)
    # The gate scores answers exactly as the trainer does (same template split, same masking).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training.evaluation import sequence_logps

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, str(parent_adapter_dir)).eval()
    chosen, rejected = sequence_logps(served, byte_tokenizer(), pair_rows, max_length=192)
    first = summary["step_metrics"][0]
    assert first["logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-4)
    assert first["logps/rejected"] == pytest.approx(rejected.mean().item(), rel=1e-4)


def test_kto_on_unpaired_rows(
    tmp_path: Path,
    tiny_model_dir: Path,
    kto_rows: list[dict],
    tiny_config: Callable,
    trained: dict[str, Any],
) -> None:
    # bf16 on: the base loads in bf16 and the adapter stays float32.
    job = make_job(
        tmp_path, tiny_model_dir, kto_rows, tiny_config(batch_size=2, bf16=True), algorithm="kto"
    )
    summary = train_loop(job.to_dict())

    from trl import KTOTrainer

    assert_all_changed(trained)
    assert isinstance(trained["trainer"], KTOTrainer)
    assert summary["bf16"] is True and summary["algorithm"] == "kto"
    first, last = summary["step_metrics"]
    # With the seeded shuffle each batch of 2 holds one desirable and one undesirable row: only
    # then does a step log the rewards of both labels.
    assert first.keys() >= KTO_KEYS and last.keys() >= KTO_KEYS
    # Before the first update the policy is its reference: rewards and KL are 0, and KTO's loss is
    # 1 - sigmoid(0) = 0.5 for either label (DPO's would be -log sigmoid(0) = ln 2).
    assert (first["rewards/chosen"], first["rewards/rejected"], first["kl"]) == (0.0, 0.0, 0.0)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)
    # After it, the loss is KTO's (eq. 7 of the paper) over the step's two rows, with the rewards
    # r = beta * log(pi / pi_ref) and the batch's KL estimate z it logged:
    #   ((1 - sigmoid(r_chosen - beta * z)) + (1 - sigmoid(beta * z - r_rejected))) / 2
    beta, z = job.config.beta, last["kl"]
    # z is KTO's reference point, estimated on mismatched prompt/completion pairs: the update moves
    # it off 0 (TRL's other unpaired loss, APO-zero, computes none and logs 0).
    assert z > 0

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    chosen_loss = 1 - sigmoid(last["rewards/chosen"] - beta * z)
    rejected_loss = 1 - sigmoid(beta * z - last["rewards/rejected"])
    assert last["loss"] == pytest.approx((chosen_loss + rejected_loss) / 2, rel=1e-3)
    # The update moved the desirable answer up and the undesirable one down.
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert (job.output_dir / "adapter_model.safetensors").is_file()


def test_full_finetune_saves_weights_and_tokenizer(
    tmp_path: Path,
    tiny_model_dir: Path,
    pair_rows: list[dict],
    tiny_config: Callable,
    trained: dict[str, Any],
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = make_job(tmp_path, tiny_model_dir, pair_rows, tiny_config(batch_size=4, lora=False))
    summary = train_loop(job.to_dict())

    assert_all_changed(trained)
    assert summary["lora"] is False
    assert (job.output_dir / "model.safetensors").is_file()
    assert not list(job.output_dir.glob("*.bin"))
    AutoModelForCausalLM.from_pretrained(job.output_dir)
    assert AutoTokenizer.from_pretrained(job.output_dir).chat_template


def test_fit_prompts_drops_old_turns_then_rows() -> None:
    tokenizer = byte_tokenizer()
    system = {"role": "system", "content": "Be brief."}
    long_history = [
        system,
        {"role": "user", "content": "x" * 60},
        {"role": "assistant", "content": "y" * 60},
        {"role": "user", "content": "How do I reset my password?"},
    ]
    rows = [
        {"prompt": long_history, "chosen": [], "rejected": []},
        {"prompt": [{"role": "user", "content": "z" * 200}], "chosen": [], "rejected": []},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [], "rejected": []},
    ]
    kept, shortened, dropped = fit_prompts(rows, tokenizer, max_prompt_length=80)
    assert (shortened, dropped) == (1, 1)
    assert kept[0]["prompt"] == [system, long_history[-1]]
    assert kept[1] == rows[2]


def test_job_validation_and_round_trip(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train\.batch_size"):
        TrainJob(
            "r",
            "kto",
            tmp_path,
            None,
            tmp_path / "t.jsonl",
            tmp_path / "o",
            TrainConfig(batch_size=1),
        )
    with pytest.raises(ValueError, match="algorithm"):
        TrainJob("r", "ppo", tmp_path, None, tmp_path / "t.jsonl", tmp_path / "o")  # type: ignore[arg-type]
    job = TrainJob(
        "r",
        "dpo",
        tmp_path,
        tmp_path / "a",
        tmp_path / "t.jsonl",
        tmp_path / "o",
        TrainConfig(beta=0.2),
        database_url="sqlite:///x.db",
        sft_file=tmp_path / "sft.jsonl",
    )
    assert TrainJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    # The SFT stage goes before a preference stage only.
    with pytest.raises(ValueError, match="goes before dpo or kto, not reward"):
        TrainJob(
            "r", "reward", tmp_path, None, tmp_path / "t.jsonl", tmp_path / "o",
            sft_file=tmp_path / "sft.jsonl",
        )  # fmt: skip


def test_bad_rows_are_refused_with_the_line(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": []}]
    job = make_job(tmp_path, tiny_model_dir, rows, TrainConfig())
    with pytest.raises(ValueError, match=r"train\.jsonl:1: a dpo row needs \['rejected'\]"):
        train_loop(job.to_dict())


# --- through Ray Train ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_run_training_through_ray_appends_steps_to_the_store(
    ray_cluster: None,
    tmp_path: Path,
    tiny_model_dir: Path,
    pair_rows: list[dict],
    tiny_config: Callable,
) -> None:
    from service.store import Store, TrainingRun

    url = f"sqlite:///{tmp_path / 'prefloop.db'}"
    store = Store(url)
    store.upgrade()
    now = datetime.now(UTC)

    def insert(session: Any) -> None:
        session.add(
            TrainingRun(
                id="run-test",
                trigger="manual",
                status="running",
                algorithm="dpo",
                config={},
                step_metrics=[],
                stages={},
                created_at=now,
                started_at=now,
            )
        )

    store.write_batch([insert])
    job = make_job(tmp_path, tiny_model_dir, pair_rows, tiny_config(batch_size=2), database_url=url)
    result = run_training(job)

    assert result.output_dir == job.output_dir.resolve()
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert [s["step"] for s in result.step_metrics] == [1, 2]
    assert result.summary["world_size"] == 1 and result.summary["torch_threads"] == 2
    with store.reading() as session:
        row = session.get(TrainingRun, "run-test")
        assert row is not None
        assert row.step_metrics == result.step_metrics
    assert (tmp_path / "ray_results" / "run-test").is_dir()
    store.close()


def test_sft_trains_the_adapter_on_answer_tokens_only(
    tmp_path: Path, tiny_model_dir: Path, tiny_config: Callable, trained: dict[str, Any]
) -> None:
    from tests.training.conftest import QUESTIONS

    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": DIRECT_TEXT}],
        }
        for q in QUESTIONS
    ]
    config = tiny_config()
    config.sft.epochs = 2.0
    job = make_job(tmp_path, tiny_model_dir, rows, config, algorithm="sft")
    summary = train_loop(job.to_dict())

    assert_all_changed(trained)
    assert summary["global_step"] == 4 and summary["rows"] == 4  # 2 epochs x 2 steps of 2 rows
    assert (job.output_dir / "adapter_model.safetensors").is_file()
    # The collator masks the prompt: only answer tokens (and the end of turn) carry labels.
    batch = trained["trainer"].data_collator([trained["trainer"].train_dataset[0]])
    labels = batch["labels"][0]
    prompt_tokens = len(
        byte_tokenizer().apply_chat_template(
            rows[0]["prompt"], tokenize=True, add_generation_prompt=True
        )["input_ids"]
    )
    assert (labels[:prompt_tokens] == -100).all()
    assert (labels[prompt_tokens:] != -100).sum() >= len(DIRECT_TEXT.encode())


def test_reward_model_learns_the_pairs_and_is_measured_on_held_out_ones(
    tmp_path: Path, tiny_model_dir: Path, pair_rows: list[dict], tiny_config: Callable
) -> None:
    from service.scoring import RewardScorer

    heldout = write_jsonl(tmp_path / "heldout.jsonl", pair_rows[:2])
    config = tiny_config(epochs=6.0, batch_size=4)
    config.reward.learning_rate = 3e-3
    config.reward.epochs = 6.0
    job = make_job(
        tmp_path, tiny_model_dir, pair_rows, config, algorithm="reward", eval_file=heldout
    )
    summary = train_loop(job.to_dict())

    measured = summary["reward_model"]
    assert measured["heldout_pairs"] == 2
    assert measured["heldout_accuracy"] == 1.0 and measured["heldout_margin"] > 0
    # DIRECT has 11 words, PITCH 12: the longer answer is the rejected one in every pair.
    assert measured["longer_wins_accuracy"] == 0.0
    assert measured["score_std"] > 0
    # Saved merged (no adapter files), and scored from disk as it scored in training.
    names = sorted(p.name for p in job.output_dir.iterdir())
    assert "model.safetensors" in names and "adapter_config.json" not in names
    scorer = RewardScorer.load(job.output_dir)
    prompt = pair_rows[0]["prompt"]
    chosen, rejected = scorer.score([prompt, prompt], [DIRECT_TEXT, PITCH_TEXT])
    assert chosen - rejected == pytest.approx(
        measured["heldout_margin"], abs=5e-2 * abs(measured["heldout_margin"]) + 1e-3
    )
