"""The evaluation gate on hand-made candidates: corrupted ones (non-finite weights, files that
differ from the manifest) are rejected before anything loads them; the canary must answer. On a
DPO candidate trained on the tiny Llama, the held-out pairs decide: it passes where its implicit
reward ranks the users' chosen answers first, and is rejected below the accuracy or margin bar."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from service.errors import Conflict
from service.registry import Registry
from service.store import ModelVersion
from tests.conftest import trained_result
from tests.training.conftest import DIRECT, PITCH, QUESTIONS, preference_pairs, write_jsonl
from training.config import GateConfig, TrainConfig
from training.cycle import merge_adapter
from training.gate import run_gate
from training.trainer import TrainJob, train_loop

# Questions the candidate never trained on, with the same two kinds of answer.
HELDOUT_QUESTIONS = [
    "How do I update my card?",
    "Can I pause my plan?",
    "How do I delete my account?",
]
USERS_WANT_STEPS = preference_pairs(HELDOUT_QUESTIONS, chosen=DIRECT, rejected=PITCH)
USERS_WANT_PITCH = preference_pairs(HELDOUT_QUESTIONS, chosen=PITCH, rejected=DIRECT)
# Room for the templated question and the whole answer (the byte tokenizer: one token a byte).
MAX_LENGTH = 192


def candidate(registry, tmp_path, name: str, weight: float = 1.0):
    return publish_candidate(registry, trained_result(tmp_path, name, weight), name)


def publish_candidate(registry, source: Path, name: str) -> tuple[ModelVersion, ModelVersion]:
    """`source` (a result folder) published as a LoRA candidate on the base, which serves."""
    parent = registry.served().version
    version = registry.publish(
        version_id=name,
        parent=parent,
        source=source,
        kind="lora",
        weights_id="base",
        algorithm="dpo",
        snapshot_id=None,
        config={},
        metrics={},
    )
    return version, parent


class Canary:
    def __init__(self, answer: str | Exception = "Go to Settings > Account."):
        self.answer = answer
        self.calls: list[Path] = []

    def __call__(self, weights: Path, tokenizer: Path, prompt: str) -> str:
        self.calls.append(weights)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def gate(registry, cand, parent, canary, pairs=(), cfg=None, max_length=64):
    return run_gate(
        registry,
        cand,
        parent,
        list(pairs),
        cfg=cfg or GateConfig(),
        beta=0.1,
        max_length=max_length,
        canary=canary,
    )


def test_nan_weights_are_rejected_and_never_served(registry, tmp_path):
    cand, parent = candidate(registry, tmp_path, "v-nan", weight=math.nan)
    canary = Canary()
    result = gate(registry, cand, parent, canary)
    assert not result.passed
    assert result.reasons == ["non-finite values in weights/"]
    assert canary.calls == []
    registry.judge(cand.id, approved=False, reason="; ".join(result.reasons), metrics={})
    with pytest.raises(Conflict, match="non-finite"):
        registry.promote(cand.id, "ops")
    assert registry.served().version.id == "base"


def test_wrong_checksum_is_rejected(registry, tmp_path):
    cand, parent = candidate(registry, tmp_path, "v-tampered")
    weights = registry.path_of(cand) / "weights" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = gate(registry, cand, parent, Canary())
    assert not result.passed
    assert result.reasons == ["checksums differ from the manifest: weights/model.safetensors"]


def test_healthy_candidate_passes_with_a_canary_answer(registry, tmp_path):
    cand, parent = candidate(registry, tmp_path, "v-ok")
    canary = Canary()
    result = gate(registry, cand, parent, canary)
    assert result.passed, result.reasons
    assert result.metrics["canary"] == "Go to Settings > Account."
    assert result.metrics["heldout"] == {"pairs": 0, "skipped": True}
    assert canary.calls == [registry.path_of(cand) / "weights"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("   ", "canary generation returned no text"),
        (RuntimeError("engine died"), "canary generation failed: engine died"),
    ],
)
def test_canary_must_answer(registry, tmp_path, answer, reason):
    cand, parent = candidate(registry, tmp_path, "v-mute")
    result = gate(registry, cand, parent, Canary(answer))
    assert not result.passed and result.reasons == [reason]


@pytest.fixture(scope="module")
def dpo_result(
    tiny_model_dir: Path,
    tiny_config: Callable[..., TrainConfig],
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A training result as a cycle leaves it (`adapter/`, merged `weights/`): LoRA DPO on the
    tiny Llama, two epochs of the training questions with the direct answer chosen over the
    pitch. Trained once for the module; each test publishes a copy."""
    work = tmp_path_factory.mktemp("dpo-result")
    job = TrainJob(
        run_id="run-gate",
        algorithm="dpo",
        base_model_path=tiny_model_dir,
        parent_adapter_path=None,
        train_file=write_jsonl(work / "train.jsonl", preference_pairs(QUESTIONS, DIRECT, PITCH)),
        output_dir=work / "result" / "adapter",
        config=tiny_config(epochs=2.0, max_length=MAX_LENGTH),
    )
    train_loop(job.to_dict())
    merge_adapter(tiny_model_dir, job.output_dir, work / "result" / "weights", tiny_model_dir)
    return work / "result"


def dpo_candidate(
    registry: Registry, tmp_path: Path, result: Path, name: str
) -> tuple[ModelVersion, ModelVersion]:
    """The DPO result published as a LoRA candidate on the base, which serves: its reference."""
    source = tmp_path / "results" / name
    shutil.copytree(result, source)
    return publish_candidate(registry, source, name)


def test_candidate_that_ranks_heldout_pairs_right_passes(tiny_registry, tmp_path, dpo_result):
    cand, parent = dpo_candidate(tiny_registry, tmp_path, dpo_result, "v-learned")
    result = gate(tiny_registry, cand, parent, Canary(), USERS_WANT_STEPS, max_length=MAX_LENGTH)
    assert result.passed, result.reasons
    heldout = result.metrics["heldout"]
    assert heldout["pairs"] == len(HELDOUT_QUESTIONS)
    # Every unseen question's direct answer gained reward over the base and the pitch lost it.
    assert heldout["accuracy"] == 1.0
    assert heldout["margin"] > 0
    assert heldout["chosen_reward"] > 0 > heldout["rejected_reward"]
    assert result.metrics["canary"] == "Go to Settings > Account."


@pytest.mark.parametrize(
    ("pairs", "thresholds", "reasons"),
    [
        # The held-out users wanted what the candidate learned to avoid: both checks fail.
        (
            USERS_WANT_PITCH,
            {},
            [
                r"held-out preference accuracy 0\.00 < 0\.6",
                r"held-out reward margin -0\.\d{4} <= 0\.0",
            ],
        ),
        # Each check on its own: the accuracy with the margin bar out of reach below ...
        (
            USERS_WANT_PITCH,
            {"min_margin": -1e9},
            [r"held-out preference accuracy 0\.00 < 0\.6"],
        ),
        # ... and the margin, set above what two epochs on four questions can earn.
        (
            USERS_WANT_STEPS,
            {"min_margin": 1.0},
            [r"held-out reward margin 0\.\d{4} <= 1\.0"],
        ),
    ],
    ids=["both", "accuracy", "margin"],
)
def test_candidate_is_rejected_on_heldout_pairs(
    tiny_registry, tmp_path, dpo_result, pairs, thresholds, reasons
):
    cand, parent = dpo_candidate(tiny_registry, tmp_path, dpo_result, "v-heldout")
    cfg = GateConfig(**thresholds)
    result = gate(tiny_registry, cand, parent, Canary(), pairs, cfg=cfg, max_length=MAX_LENGTH)
    assert not result.passed
    assert len(result.reasons) == len(reasons), result.reasons
    for reason, pattern in zip(result.reasons, reasons, strict=True):
        assert re.fullmatch(pattern, reason), reason
    assert result.metrics["heldout"]["pairs"] == len(HELDOUT_QUESTIONS)
    # A healthy candidate all the same: the canary answered; only the held-out pairs decided.
    assert result.metrics["canary"] == "Go to Settings > Account."
