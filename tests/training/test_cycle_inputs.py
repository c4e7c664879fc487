"""Where a cycle reads its model files: from the registry's versions, never from the settings'
default model folder; and they are checked before any feedback is snapshotted.

The scene: `prefloop serve --model-path M` registered M as version `base`, users voted, and
`prefloop train` runs without the model path, so its settings point at the embedded model's
folder, which was never bootstrapped.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

import training.trainer
from deploy.loop import cycle_context
from service.registry import Registry
from service.runs import queue_run
from service.settings import Settings
from service.store import Store, TrainingRun
from training import preference_sets
from training.config import SnapshotConfig
from training.cycle import CycleContext, run_cycle
from training.trainer import TrainJob, TrainResult


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PREFLOOP_"):
            monkeypatch.delenv(name)


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """M: a model folder outside the data directory (a copy each test may damage)."""
    path = tmp_path_factory.mktemp("model") / "M"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.fixture
def registry(store: Store, tmp_path: Path, model_dir: Path) -> Registry:
    reg = Registry(store, tmp_path)
    reg.ensure_base(model_dir)
    return reg


class Canary:
    def __init__(self) -> None:
        self.tokenizers: list[Path] = []

    def __call__(self, weights: Path, tokenizer: Path, prompt: str) -> str:
        self.tokenizers.append(tokenizer)
        return "Open Settings."


def train_settings_without_model_path(registry: Registry, tmp_path: Path) -> Settings:
    """What `prefloop train` builds when the model path was given to `serve` only."""
    settings = Settings(data_dir=tmp_path, database_url=registry.store.url)
    assert settings.model_path is None and not settings.resolved_model_path.exists()
    return settings


async def thumbs(client: Any, n: int) -> None:
    """`n` thumbs on answers to `n` different questions, half up: KTO rows, no pairs."""
    for i in range(n):
        question = f"question {uuid.uuid4().hex}"
        body = (
            await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": question}]}
            )
        ).json()
        r = await client.post(
            "/v1/feedback",
            json={"type": "thumbs", "response_id": body["id"], "rating": "up" if i % 2 else "down"},
        )
        assert r.status_code == 201


def cycle(ctx: CycleContext, registry: Registry) -> TrainingRun:
    return run_cycle(ctx, queue_run(registry.store, "manual", "cli").id)


def usable(registry: Registry) -> int:
    return preference_sets.build(registry.store, SnapshotConfig()).usable


async def test_train_without_the_model_path_merges_with_the_registrys_tokenizer(
    client: Any,
    registry: Registry,
    tmp_path: Path,
    model_dir: Path,
    parent_adapter_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs: list[TrainJob] = []

    def train(job: TrainJob) -> TrainResult:
        """A trained adapter for the tiny model, as a Ray Train job would leave it."""
        jobs.append(job)
        shutil.copytree(parent_adapter_dir, job.output_dir)
        return TrainResult(job.output_dir, [], {"global_step": 1})

    monkeypatch.setattr(training.trainer, "run_training", train)
    ctx = cycle_context(train_settings_without_model_path(registry, tmp_path))
    ctx.canary = canary = Canary()
    await thumbs(client, 8)

    run = cycle(ctx, registry)
    assert run.status == "promoted", run.error
    assert run.algorithm == "kto"
    # One KTO job (with an SFT stage first where thumbs-up answers fell into the training
    # split), on M.
    assert [job.algorithm for job in jobs] == ["kto"]
    assert {job.base_model_path for job in jobs} == {model_dir}
    # The merged version carries M's tokenizer, and the canary loaded M's.
    assert canary.tokenizers == [model_dir]
    weights = registry.weights_path(registry.get(run.candidate_version_id))
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (weights / name).read_bytes() == (model_dir / name).read_bytes()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda m: shutil.rmtree(m), "{m} (the folder)"),
        (lambda m: (m / "tokenizer_config.json").unlink(), "{m}/tokenizer_config.json"),
        (lambda m: (m / "model.safetensors").unlink(), "{m}/*.safetensors"),
    ],
    ids=["folder", "tokenizer", "weights"],
)
async def test_missing_model_files_fail_the_run_before_the_snapshot(
    client: Any,
    registry: Registry,
    tmp_path: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: Any,
    named: str,
) -> None:
    def train(job: TrainJob) -> TrainResult:
        raise RuntimeError("training started on missing model files")

    monkeypatch.setattr(training.trainer, "run_training", train)
    ctx = cycle_context(train_settings_without_model_path(registry, tmp_path))
    ctx.canary = Canary()
    await thumbs(client, 4)
    before = usable(registry)
    damage(model_dir)

    run = cycle(ctx, registry)
    assert run.status == "failed"
    assert run.snapshot_id is None and "snapshot" not in run.stages
    assert named.format(m=model_dir) in run.error
    assert f"version 'base' was registered from {model_dir}" in run.error
    assert "Traceback" not in run.error
    assert usable(registry) == before == 4  # nothing consumed: the next cycle has it all


def test_a_missing_embedded_model_says_to_bootstrap(tmp_path: Path) -> None:
    from training.cycle import MissingModelFiles, check_model_files

    settings = Settings(data_dir=tmp_path)
    store = Store(settings.resolved_database_url)
    store.upgrade()
    registry = Registry(store, tmp_path)
    registry.ensure_base(settings.resolved_model_path)
    with pytest.raises(MissingModelFiles) as exc:
        check_model_files(registry)
    assert f"{settings.resolved_model_path} (the folder)" in str(exc.value)
    assert "prefloop bootstrap" in str(exc.value)
    store.close()
