"""Offline settings: environment names, validation messages that name the setting."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from deploy.loop import training_settings
from service.settings import Settings, SettingsError
from training.config import PPOConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PREFLOOP_"):
            monkeypatch.delenv(name)


def test_sections_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFLOOP_TRAIN__BETA", "0.3")
    monkeypatch.setenv("PREFLOOP_GATE__MIN_ACCURACY", "0.75")
    monkeypatch.setenv("PREFLOOP_SCHEDULER__MIN_NEW_ITEMS", "16")
    s = training_settings(Settings(data_dir=tmp_path))
    assert (s.train.beta, s.gate.min_accuracy, s.scheduler.min_new_items) == (0.3, 0.75, 16)
    assert s.data_dir == tmp_path and s.train.algorithm == "auto"


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("PREFLOOP_TRAIN__BETAA", "0.3", "PREFLOOP_TRAIN__BETAA"),
        ("PREFLOOP_TRAIN__LEARNING_RATE", "1", "PREFLOOP_TRAIN__LEARNING_RATE"),
        ("PREFLOOP_TRAIN__MAX_PROMPT_LENGTH", "600", "max_prompt_length (600)"),
        ("PREFLOOP_SNAPSHOT__MODE", "forever", "PREFLOOP_SNAPSHOT__MODE"),
    ],
)
def test_bad_values_name_the_setting(monkeypatch, tmp_path, name, value, named):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as exc:
        training_settings(Settings(data_dir=tmp_path))
    assert named in str(exc.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("train:\n  betaa: 0.3\n", "train.betaa"),
        ("train:\n  ppo:\n    epochz: 3\n", "train.ppo.epochz"),
        ("scheduler:\n  retry_backof_s: 60\n", "scheduler.retry_backof_s"),
    ],
)
def test_unknown_config_file_keys_are_named_by_their_path(monkeypatch, tmp_path, text, named):
    cfg = tmp_path / "prefloop.yaml"
    cfg.write_text(text)
    monkeypatch.setenv("PREFLOOP_CONFIG", str(cfg))
    with pytest.raises(SettingsError) as exc:
        training_settings(Settings(data_dir=tmp_path))
    assert str(exc.value) == f"unknown settings: {cfg}: {named} (see README, Configuration)"


@pytest.mark.parametrize(
    ("ppo", "message"),
    [
        ({"samples_per_prompt": 1}, "samples_per_prompt >= 2"),
        ({"samples_per_prompt": 3}, "rollouts_per_iteration \\(16\\) must be a multiple"),
    ],
)
def test_ppo_groups_must_be_formable(ppo, message):
    with pytest.raises(ValidationError, match=message):
        PPOConfig(**ppo)
    assert PPOConfig(advantage="rloo", samples_per_prompt=4).rollouts_per_iteration == 16
