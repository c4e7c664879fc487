"""The evaluation gate on hand-made candidates: corrupted ones (non-finite weights, files that
differ from the manifest) are rejected before anything loads them; the canary must answer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from service.errors import Conflict
from tests.conftest import trained_result
from training.config import GateConfig
from training.gate import run_gate


def candidate(registry, tmp_path, name: str, weight: float = 1.0):
    parent = registry.served().version
    version = registry.publish(
        version_id=name,
        parent=parent,
        source=trained_result(tmp_path, name, weight),
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


def gate(registry, cand, parent, canary, pairs=()):
    return run_gate(
        registry,
        cand,
        parent,
        list(pairs),
        cfg=GateConfig(),
        beta=0.1,
        max_length=64,
        tokenizer_path=Path("unused"),
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
