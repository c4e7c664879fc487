"""Data and adapters for trainer and evaluation tests, on the tiny models of `tests/conftest.py`
(`tiny_model_dir`, `tiny_reward_dir`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.registry import Registry
from service.store import Store
from training.config import TrainConfig

QUESTIONS = [
    "How do I reset my password?",
    "How do I cancel my plan?",
    "Where is my invoice?",
    "How do I change my email?",
]
DIRECT = "Open Settings, pick Account, press Reset and follow the email."
PITCH = "Before you go, did you know Premium gives you 20% off this month?"


@pytest.fixture(scope="session")
def parent_adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served LoRA version: rank 4, every linear layer, random A and B (so it moves the model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("parent-adapter")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    get_peft_model(base, config).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture
def tiny_registry(store: Store, tmp_path: Path, tiny_model_dir: Path) -> Registry:
    """A registry whose base version is the tiny Llama, for the gate's checks that load it."""
    registry = Registry(store, tmp_path)
    registry.ensure_base(tiny_model_dir)
    return registry


def preference_pairs(questions: list[str], chosen: str, rejected: str) -> list[dict]:
    """TRL conversational pairs: each question with the same chosen and rejected answer."""
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        for q in questions
    ]


@pytest.fixture
def pair_rows() -> list[dict]:
    """Four TRL conversational pairs: chosen = direct steps, rejected = a retention pitch."""
    return preference_pairs(QUESTIONS, DIRECT, PITCH)


@pytest.fixture
def kto_rows() -> list[dict]:
    """Four TRL conversational KTO rows, two desirable and two not, alternating."""
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": DIRECT if i % 2 == 0 else PITCH}],
            "label": i % 2 == 0,
        }
        for i, q in enumerate(QUESTIONS)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., TrainConfig]:
    """TrainConfig for the tiny model: short sequences, float32, one epoch; override any field.
    Each call builds a new config, so the factory is shared by the whole session."""

    def make(**overrides: Any) -> TrainConfig:
        values: dict[str, Any] = {
            "epochs": 1.0,
            "batch_size": 2,
            "lora_rank": 4,
            "lora_alpha": 8,
            "max_length": 192,
            "max_prompt_length": 96,
            "bf16": False,
            "cpus_per_worker": 2.0,
            "learning_rate": 1e-3,
        }
        values.update(overrides)
        return TrainConfig(**values)

    return make
