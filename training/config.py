"""Typed settings of the offline side: preference sets, training, the gate and the scheduler.

They are read from `PREFLOOP_SNAPSHOT__...`, `PREFLOOP_TRAIN__...`, `PREFLOOP_GATE__...` and
`PREFLOOP_SCHEDULER__...` (and the same sections of the `PREFLOOP_CONFIG` YAML file). Each field's
description is its documentation; cross-field checks name the parameter, the value and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.settings import prefloop_sources


class SnapshotConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    heldout_fraction: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="share of prompts (by a stable hash of the prompt) kept out of training",
    )
    mode: Literal["incremental", "window"] = Field(
        default="incremental",
        description="incremental: only feedback no earlier snapshot used; window: the last "
        "`window_hours` of feedback",
    )
    window_hours: float = Field(default=168.0, gt=0, description="used when mode is window")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    algorithm: Literal["auto", "dpo", "kto"] = Field(
        default="auto",
        description="auto: dpo when the snapshot has training pairs, else kto on unpaired thumbs",
    )
    beta: float = Field(
        default=0.1, gt=0, description="strength of the KL penalty to the reference"
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid", description="DPO loss (TRL's loss_type)"
    )
    # The calibration on the embedded model: 2e-4 for 2 epochs learned from 15 clean pairs;
    # 5e-4 for 3 epochs collapsed answer length (DESIGN.md).
    learning_rate: float = Field(default=2e-4, gt=0, le=1e-2)
    epochs: float = Field(default=2.0, gt=0, le=20)
    batch_size: int = Field(default=4, ge=1, description="pairs per device per step")
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lora: bool = Field(default=True, description="train a LoRA adapter; false: full fine-tuning")
    lora_rank: int = Field(default=16, ge=1, le=256)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_length: int = Field(default=512, ge=32, description="prompt + answer tokens")
    max_prompt_length: int = Field(default=256, ge=16)
    precompute_ref_log_probs: bool = Field(
        default=True, description="one reference pass before training instead of one per step"
    )
    bf16: bool | None = Field(default=None, description="None: where the hardware supports it")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers")
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        default=2.0,
        gt=0,
        description="also the torch thread count: Ray Train gives one OpenMP thread otherwise",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _lengths(self) -> TrainConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"train.max_prompt_length ({self.max_prompt_length}) must be below "
                f"train.max_length ({self.max_length}); raise max_length or lower it"
            )
        return self


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    min_accuracy: float = Field(
        default=0.6,
        ge=0.0,
        le=1.0,
        description="held-out implicit-reward accuracy the candidate must reach",
    )
    min_margin: float = Field(default=0.0, description="mean held-out reward margin must exceed it")
    min_heldout_pairs: int = Field(
        default=1, ge=0, description="with fewer held-out pairs the accuracy check is skipped"
    )
    canary_prompt: str = "How do I reset my password?"


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not a no-op

    enabled: bool = Field(default=True, description="run cycles automatically")
    min_new_items: int = Field(
        default=64,
        ge=1,
        description="a cycle starts once this many new pairs (or KTO rows) arrived",
    )
    interval_s: float = Field(
        default=3600.0, gt=0, description="or when this long passed since the last cycle..."
    )
    min_items_for_interval: int = Field(default=8, ge=1, description="...with at least this many")
    poll_s: float = Field(default=5.0, gt=0, description="how often the scheduler looks")
    auto_promote: bool = Field(default=True, description="promote a candidate that passes the gate")


class TrainingSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PREFLOOP_", env_nested_delimiter="__", extra="ignore"
    )

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "prefloop")
    snapshot: SnapshotConfig = Field(default_factory=SnapshotConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return prefloop_sources(settings_cls, init_settings, env_settings)
