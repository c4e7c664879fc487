"""DPO, KTO, SFT and reward-model training as a Ray Train job: TRL's trainers inside a
`TorchTrainer`.

`run_training(job)` is the driver side: it starts `train_loop` on `config.num_workers` Ray Train
workers and returns the saved artifact's folder with the per-step metrics. `train_loop` is the
per-worker function; it also runs without Ray (one process), which the tests use:

    from training.trainer import TrainJob, run_training
    result = run_training(TrainJob(run_id="r1", algorithm="dpo", base_model_path=base,
                                   parent_adapter_path=None, train_file=pairs_jsonl,
                                   output_dir=out, config=TrainConfig()))

LoRA by default. A fresh adapter is trained against the base model; when the served version is
itself an adapter, that adapter is trained further against a frozen copy of it (TRL adds it as the
"ref" adapter), so every version stays one LoRA on the base, which vLLM serves directly. Full
fine-tuning (`config.lora=False`) trains all weights against a frozen copy of the starting model.
SFT (`train.sft` settings) trains the same way on prompt-completion rows, with the loss on the
answer tokens only. A DPO or KTO job given `sft_file` runs SFT on those rows first and then trains
the result further against it as the reference, in the same worker: one job start, one model load
and one merge instead of two (each cost about 35 s on the 2-core box). A reward model is the
policy's weights under a scalar head (a LoRA on them, merged when saved, or all weights), trained
on `service.scoring.render`'s token ids, the same ones it is later scored on; rank 0 then measures
it on the held-out pairs (`eval_file`).

Resources: each worker asks Ray for `cpus_per_worker` CPUs (and one GPU with `use_gpu`). On the
2-CPU embedded box a local Ray cluster has 2 logical CPUs, so the one default worker (2 CPUs)
fits only when nothing else holds CPUs there: give the Serve replicas `num_cpus=0` on that box. A
worker that cannot be placed waits, so `run_training` warns when the cluster is too small.
torch, transformers, trl, peft and ray are imported inside the functions: this module imports fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from training.config import TrainConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "train_metrics.json"
REQUIRED_KEYS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "sft": ("prompt", "completion"),
    "reward": ("prompt", "chosen", "rejected"),
}
Algorithm = Literal["dpo", "kto", "sft", "reward"]


class TrainingError(RuntimeError):
    """A training run failed; the message names the run and the cause."""


@dataclass
class TrainJob:
    """One training run. `algorithm` wins over `config.algorithm`: the scheduler picks it per
    preference set (KTO when it has no pairs)."""

    run_id: str
    algorithm: Algorithm
    base_model_path: Path  # HF folder of the full weights the served version runs on
    parent_adapter_path: Path | None  # LoRA folder of the served version; None: it is the base
    train_file: Path  # JSONL of TRL conversational rows (pairs for dpo, labelled rows for kto)
    output_dir: Path  # receives the adapter (or full weights) and train_metrics.json
    config: TrainConfig = field(default_factory=TrainConfig)
    # When set, rank 0 appends every logged step to TrainingRun(run_id).step_metrics.
    database_url: str | None = None
    # reward: held-out pairs the saved model is measured on (accuracy, length baseline).
    eval_file: Path | None = None
    # dpo / kto: prompt-completion rows to fine-tune on first, in the same job (train.sft's
    # learning rate and epochs); the preference stage then starts from, and against, the result.
    sft_file: Path | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in REQUIRED_KEYS:
            raise ValueError(
                f"algorithm must be one of {sorted(REQUIRED_KEYS)}, got {self.algorithm!r}"
            )
        if self.algorithm == "kto" and self.config.batch_size < 2:
            # KTO estimates its KL term from mismatched pairs inside a batch.
            raise ValueError(
                f"train.batch_size ({self.config.batch_size}) must be at least 2 for KTO; raise it"
            )
        for name in ("base_model_path", "train_file", "output_dir"):
            setattr(self, name, Path(getattr(self, name)))
        if self.parent_adapter_path is not None:
            self.parent_adapter_path = Path(self.parent_adapter_path)
        if self.algorithm == "reward" and self.parent_adapter_path is not None:
            raise ValueError("a reward model starts from full weights: parent_adapter_path is None")
        if self.eval_file is not None:
            self.eval_file = Path(self.eval_file)
        if self.sft_file is not None:
            if self.algorithm not in ("dpo", "kto"):
                raise ValueError(
                    f"an SFT stage (sft_file) goes before dpo or kto, not {self.algorithm}"
                )
            self.sft_file = Path(self.sft_file)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, to cross the process boundary as `train_loop_config`."""
        parent = self.parent_adapter_path
        return {
            "run_id": self.run_id,
            "algorithm": self.algorithm,
            "base_model_path": str(self.base_model_path),
            "parent_adapter_path": str(parent) if parent is not None else None,
            "train_file": str(self.train_file),
            "output_dir": str(self.output_dir),
            "config": self.config.model_dump(mode="json"),
            "database_url": self.database_url,
            "eval_file": str(self.eval_file) if self.eval_file is not None else None,
            "sft_file": str(self.sft_file) if self.sft_file is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        parent = data.get("parent_adapter_path")
        return cls(
            run_id=data["run_id"],
            algorithm=data["algorithm"],
            base_model_path=Path(data["base_model_path"]),
            parent_adapter_path=Path(parent) if parent else None,
            train_file=Path(data["train_file"]),
            output_dir=Path(data["output_dir"]),
            config=TrainConfig.model_validate(data["config"]),
            database_url=data.get("database_url"),
            eval_file=Path(data["eval_file"]) if data.get("eval_file") else None,
            sft_file=Path(data["sft_file"]) if data.get("sft_file") else None,
        )


@dataclass
class TrainResult:
    output_dir: Path
    step_metrics: list[dict[str, float]]
    summary: dict[str, Any]


# --- driver side ---------------------------------------------------------------------------------


def run_training(job: TrainJob) -> TrainResult:
    """Run `train_loop` as a Ray Train `TorchTrainer` job and return what rank 0 saved.

    Uses the Ray cluster the caller connected to with `ray.init()`, or starts a local one. Ray's
    own run records go to `<output_dir.parent>/ray_results/<run_id>`. With several workers on
    several nodes, `output_dir` must be on storage they all share. Raises `TrainingError` when a
    worker fails.
    """
    output_dir = job.output_dir.resolve()
    job = TrainJob.from_dict({**job.to_dict(), "output_dir": str(output_dir)})
    return fit_on_ray(train_loop, job.to_dict(), job.config, job.run_id, output_dir)


def fit_on_ray(
    loop: Callable[[dict[str, Any]], dict[str, Any]],
    loop_config: dict[str, Any],
    cfg: TrainConfig,
    run_id: str,
    output_dir: Path,
) -> TrainResult:
    """Run `loop(loop_config)` on `cfg.num_workers` Ray Train workers; rank 0's summary back.

    `loop` returns (or writes to `output_dir/train_metrics.json`) a summary with the per-step
    metrics under "step_metrics". Raises `TrainingError` when a worker fails.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    if not ray.is_initialized():
        ray.init()
    _warn_if_too_small(ray.cluster_resources(), cfg.num_workers, resources)

    # Ray Train reroutes workers' print() to its logger even while a library captures stdout:
    # `datasets` fingerprints TRL's map functions through dill, which disassembles them into a
    # captured stdout, and hundreds of bytecode lines reach the console. We log, never print.
    # Ray passes the variable from the driver to the workers; a value the user set wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = TorchTrainer(
        # Ray Train 2.x hands rank 0's return value back as `Result.return_value`; the type of
        # the parameter still says None.
        loop,  # type: ignore[arg-type]
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(name=run_id, storage_path=str(output_dir.parent / "ray_results")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray raises TrainingFailedError (worker or controller failure)
        raise TrainingError(f"training run {run_id} failed: {exc}") from exc
    if getattr(result, "error", None) is not None:
        raise TrainingError(f"training run {run_id} failed: {result.error}")

    report = getattr(result, "return_value", None)
    if not isinstance(report, dict):
        # Older Ray Train returns nothing from the workers; rank 0 also wrote the file.
        report = json.loads((output_dir / METRICS_FILE).read_text())
    return TrainResult(
        output_dir=output_dir,
        step_metrics=list(report.get("step_metrics", [])),
        summary={k: v for k, v in report.items() if k != "step_metrics"},
    )


def _warn_if_too_small(
    cluster: dict[str, float], workers: int, per_worker: dict[str, float]
) -> None:
    # A warning, not an error: an autoscaling cluster (KubeRay) adds nodes for pending workers.
    for resource, amount in per_worker.items():
        if cluster.get(resource, 0.0) < workers * amount:
            logger.warning(
                "the Ray cluster has %s %s in all but the job asks for %s x %s; the workers will "
                "wait until they fit (lower train.cpus_per_worker / train.num_workers, or start "
                "Ray with more logical CPUs)",
                cluster.get(resource, 0.0),
                resource,
                workers,
                amount,
            )


# --- worker side ---------------------------------------------------------------------------------


def train_loop(job_dict: dict[str, Any]) -> dict[str, Any]:
    """Train on one worker (or in this process without Ray); rank 0 saves and reports.

    Returns (on every rank) the summary that rank 0 writes to `train_metrics.json`, with the
    per-step metrics under "step_metrics".
    """
    import torch

    from service.hardware import bf16_native

    job = TrainJob.from_dict(job_dict)
    cfg = job.config
    # Ray Train workers start with one OpenMP thread: use the CPUs the worker was given.
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ray_context = _ray_train_context()
    rank = ray_context.get_world_rank() if ray_context is not None else 0
    if ray_context is not None:
        # The worker's output goes to the driver's console: no per-map progress bars there.
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else bf16_native(cfg.use_gpu)

    tokenizer = _load_tokenizer(job.base_model_path)
    rows, shortened, dropped = _training_rows(job.train_file, job.algorithm, tokenizer, cfg)
    if job.algorithm == "reward":
        # The scalar head is drawn when the model loads, before TRL seeds anything: seed it here,
        # or one cycle's reward model differs from the next on the same pairs (0.68 and 0.82
        # held-out accuracy on one snapshot of the demo).
        torch.manual_seed(cfg.seed)
        model, peft_config, save_dtype = _load_reward_model(job, tokenizer)
        ref_model = None
        rows = [_reward_ids(tokenizer, row, cfg.max_length) for row in rows]
    else:
        model, peft_config, ref_model, save_dtype = _load_model(job, use_bf16)

    from datasets import Dataset

    sink = _StepSink(job.run_id, job.database_url if rank == 0 else None, ray_context)
    scratch = tempfile.TemporaryDirectory(prefix=f"prefloop-{job.run_id}-")
    sft: dict[str, Any] | None = None
    try:
        if job.sft_file is not None:
            sink.stage = "sft"
            sft, model = _sft_first(
                job, model, peft_config, tokenizer, scratch.name, use_bf16, sink
            )
            # The preference stage trains the SFT result further: a PeftModel now, whose adapter
            # TRL copies as the frozen reference; full weights get a frozen copy (or, with
            # precomputed reference log-probs, none: TRL computes them from the model first).
            peft_config = None
            if not cfg.lora and not cfg.precompute_ref_log_probs:
                import copy

                ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            sink.stage = job.algorithm
        setup_started = time.perf_counter()
        trainer = _build_trainer(
            job,
            model,
            ref_model,
            peft_config,
            tokenizer,
            Dataset.from_list(rows),
            scratch.name,
            use_bf16,
            callback=sink.callback(),
        )
        trainer = _on_ray(trainer, sink.ray)
        # Tokenising and, with precompute_ref_log_probs, the reference pass over every row.
        setup_s = round(time.perf_counter() - setup_started, 2)
        output = trainer.train()
    finally:
        sink.close()
        scratch.cleanup()

    summary: dict[str, Any] = {
        "run_id": job.run_id,
        "algorithm": job.algorithm,
        "rows": len(rows),
        "rows_dropped": dropped,
        "prompts_shortened": shortened,
        "lora": cfg.lora,
        "parent_adapter": str(job.parent_adapter_path) if job.parent_adapter_path else None,
        "bf16": use_bf16,
        "world_size": ray_context.get_world_size() if ray_context is not None else 1,
        "torch_threads": torch.get_num_threads(),
        "global_step": output.global_step,
        "trainer_setup_s": setup_s,
        **{k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
        "final": sink.steps[-1] if sink.steps else {},
        "peak_rss_mb": _peak_rss_mb(),
        "step_metrics": sink.steps,
    }
    if sft is not None:
        summary["sft"] = sft
    if rank == 0:
        if job.algorithm == "reward":
            summary["reward_model"] = _measure_reward_model(trainer.model, tokenizer, job, rows)
        _save(trainer.model, tokenizer, job, save_dtype)
        (job.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        logger.info("run %s saved to %s (%s steps)", job.run_id, job.output_dir, len(sink.steps))
    return summary


def _training_rows(
    path: Path, algorithm: str, tokenizer: Any, cfg: TrainConfig
) -> tuple[list[dict[str, Any]], int, int]:
    """The rows of `path` with prompts that fit `train.max_prompt_length`: (rows, prompts
    shortened, rows dropped). Raises ValueError when none is left."""
    rows, shortened, dropped = fit_prompts(
        _read_rows(path, algorithm), tokenizer, cfg.max_prompt_length
    )
    if not rows:
        raise ValueError(
            f"no row of {path} has a prompt that fits train.max_prompt_length "
            f"({cfg.max_prompt_length}); raise it"
        )
    return rows, shortened, dropped


def _sft_first(
    job: TrainJob,
    model: Any,
    peft_config: Any,
    tokenizer: Any,
    scratch: str,
    use_bf16: bool,
    sink: _StepSink,
) -> tuple[dict[str, Any], Any]:
    """SFT on `job.sft_file` with the model loaded for the preference stage: (its summary with
    its own step metrics, the trained model: a PeftModel with LoRA)."""
    from datasets import Dataset

    assert job.sft_file is not None
    started = time.perf_counter()
    sft_job = TrainJob.from_dict(
        {**job.to_dict(), "algorithm": "sft", "train_file": str(job.sft_file), "sft_file": None}
    )
    rows, shortened, dropped = _training_rows(job.sft_file, "sft", tokenizer, job.config)
    trainer = _build_trainer(
        sft_job,
        model,
        None,
        peft_config,
        tokenizer,
        Dataset.from_list(rows),
        scratch,
        use_bf16,
        callback=sink.callback(),
    )
    trainer = _on_ray(trainer, sink.ray)
    output = trainer.train()
    summary = {
        "rows": len(rows),
        "rows_dropped": dropped,
        "prompts_shortened": shortened,
        "global_step": output.global_step,
        **{k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
        "seconds": round(time.perf_counter() - started, 2),
        "step_metrics": sink.take(),
    }
    return summary, trainer.model


def _on_ray(trainer: Any, ray: bool) -> Any:
    """The trainer as Ray Train runs it inside a worker (`ray`), else unchanged."""
    if not ray:
        return trainer
    from ray.train.huggingface.transformers import prepare_trainer

    return prepare_trainer(trainer)


def fit_prompts(
    rows: list[dict[str, Any]], tokenizer: Any, max_prompt_length: int
) -> tuple[list[dict[str, Any]], int, int]:
    """Make every templated prompt fit `max_prompt_length` tokens (TRL 1.16 has no such option).

    The oldest turns go first (system messages stay); a row whose last turn alone is too long is
    dropped. Returns (rows, prompts shortened, rows dropped).
    """
    kept: list[dict[str, Any]] = []
    shortened = dropped = 0
    for row in rows:
        messages = list(row["prompt"])
        cut = False
        while _prompt_tokens(tokenizer, messages) > max_prompt_length:
            turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
            if len(turns) <= 1:
                messages = []
                break
            del messages[turns[0]]
            # A conversation restarts on a user turn.
            while (turns := [i for i, m in enumerate(messages) if m.get("role") != "system"]) and (
                len(turns) > 1 and messages[turns[0]].get("role") == "assistant"
            ):
                del messages[turns[0]]
            cut = True
        if not messages:
            dropped += 1
            continue
        shortened += cut
        kept.append({**row, "prompt": messages})
    if dropped:
        logger.warning("%s rows dropped: prompt over %s tokens", dropped, max_prompt_length)
    return kept, shortened, dropped


def _prompt_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> int:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=True
    )
    return len(out["input_ids"])


def _read_rows(path: Path, algorithm: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in REQUIRED_KEYS[algorithm] if k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: a {algorithm} row needs {missing}")
            rows.append({k: row[k] for k in REQUIRED_KEYS[algorithm]})
    if not rows:
        raise ValueError(f"{path} holds no training rows")
    return rows


def _ray_train_context() -> Any:
    """The Ray Train context when running inside a Ray Train worker, else None."""
    if "ray" not in sys.modules:  # a Ray worker has imported ray before calling us
        return None
    import ray.train

    try:
        return ray.train.get_context()
    except RuntimeError:
        return None


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(job: TrainJob, use_bf16: bool) -> tuple[Any, Any, Any, Any]:
    """(model, peft_config, ref_model, dtype to save full weights in).

    LoRA: the frozen base is loaded in bf16 when bf16 is on (PEFT keeps the adapter in float32).
    A served adapter keeps its own rank, alpha and dropout; the config's apply to new ones.
    Full fine-tuning keeps float32 master weights (bf16 runs as autocast): bf16 weights would round
    away updates of lr-sized steps. Its reference is a frozen copy of the starting model, or none
    with precomputed reference log-probs (TRL computes them from the model before training).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = job.config
    stored = getattr(AutoConfig.from_pretrained(str(job.base_model_path)), "dtype", None)
    save_dtype = getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32
    dtype = torch.bfloat16 if use_bf16 and cfg.lora else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(str(job.base_model_path), dtype=dtype)

    if cfg.lora:
        if job.parent_adapter_path is not None:
            from peft import PeftModel

            # TRL sees a PeftModel and adds a frozen copy of this adapter as the reference.
            model = PeftModel.from_pretrained(
                model, str(job.parent_adapter_path), is_trainable=True
            )
            return model, None, None, save_dtype
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        return model, peft_config, None, save_dtype

    if job.parent_adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(job.parent_adapter_path)).merge_and_unload()
    ref_model = None
    # With an SFT stage first the reference is its result, copied once SFT is done.
    if job.algorithm in ("dpo", "kto") and not cfg.precompute_ref_log_probs and not job.sft_file:
        # Explicit, because TRL would otherwise reload the base from disk, which after a merge is
        # not the starting model.
        import copy

        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    return model, None, ref_model, save_dtype


def _load_reward_model(job: TrainJob, tokenizer: Any) -> tuple[Any, Any, Any]:
    """(model, peft_config, dtype to save in): the starting policy's weights under a one-label
    scalar head. float32 weights: PEFT copies the head to train it, and Adam on bf16 rounds away
    lr-sized steps (bf16 still runs as autocast)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = job.config
    stored = getattr(AutoConfig.from_pretrained(str(job.base_model_path)), "dtype", None)
    save_dtype = getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32
    model: Any = AutoModelForSequenceClassification.from_pretrained(
        str(job.base_model_path), num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if not cfg.lora:
        return model, None, save_dtype
    from peft import LoraConfig

    # SEQ_CLS makes PEFT train the new `score` head in full beside the adapter.
    peft_config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="SEQ_CLS",
    )
    return model, peft_config, save_dtype


def _reward_ids(tokenizer: Any, row: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """A pair as the token ids the reward model is trained and later scored on (the last
    `max_length` tokens of each: the scalar is read at the end)."""
    from service.scoring import render

    return {
        side: render(tokenizer, row["prompt"], row[name][-1]["content"])[-max_length:]
        for side, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected"))
    }


def _measure_reward_model(
    model: Any, tokenizer: Any, job: TrainJob, train_ids: list[dict[str, list[int]]]
) -> dict[str, Any]:
    """What the reward model learned, measured where it is loaded: the mean and spread of its
    scores on the training answers (PPO normalises by them), and on the held-out pairs its
    accuracy beside the "longer answer wins" baseline's (ties count half)."""
    import statistics

    from service.scoring import score_ids

    model.eval()
    pad = tokenizer.pad_token_id
    answers = [ids for row in train_ids for ids in (row["chosen_ids"], row["rejected_ids"])]
    scores = score_ids(model, answers, pad)
    out: dict[str, Any] = {
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores) or 1.0,
        "heldout_pairs": 0,
    }
    if job.eval_file is None or not job.eval_file.exists() or not job.eval_file.stat().st_size:
        return out
    rows = _read_rows(job.eval_file, "reward")
    pairs = [_reward_ids(tokenizer, row, job.config.max_length) for row in rows]
    chosen = score_ids(model, [p["chosen_ids"] for p in pairs], pad)
    rejected = score_ids(model, [p["rejected_ids"] for p in pairs], pad)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]

    def words(row: dict[str, Any], side: str) -> int:
        return len(row[side][-1]["content"].split())

    longer = [
        1.0 if words(r, "chosen") > words(r, "rejected") else
        0.5 if words(r, "chosen") == words(r, "rejected") else 0.0
        for r in rows
    ]  # fmt: skip
    out.update(
        heldout_pairs=len(rows),
        heldout_accuracy=statistics.fmean(float(m > 0) for m in margins),
        heldout_margin=statistics.fmean(margins),
        longer_wins_accuracy=statistics.fmean(longer),
    )
    return out


def _score_answer_tokens_only() -> None:
    """Make TRL's fused LM head score only the answer tokens on the CPU, as it does on GPUs.

    DPO's log-probabilities sum over the answer tokens alone (the prompt and the padding are
    masked). TRL 1.16 scores every position through the LM head (49k-wide for the embedded model)
    on devices without Triton, so that compiling backends (Neuron) see one tile shape; eager CPU
    training compiles nothing, and the LM head and log-softmax were a third of the worker's time
    (py-spy, bench.loop). The numbers are the same: the skipped positions are zeroed anyway.
    """
    import trl.trainer.utils as trl_utils

    compact = getattr(trl_utils, "_use_triton", None)
    if compact is None or getattr(compact, "prefloop_cpu", False):
        return  # another TRL layout (nothing to do), or already done in this process

    def compact_on_cpu(device: Any) -> bool:
        return device.type == "cpu" or compact(device)

    compact_on_cpu.prefloop_cpu = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu


def _build_trainer(
    job: TrainJob,
    model: Any,
    ref_model: Any,
    peft_config: Any,
    tokenizer: Any,
    dataset: Any,
    scratch: str,
    use_bf16: bool,
    callback: Any,
) -> Any:
    cfg = job.config
    learning_rate, epochs = {
        "sft": (cfg.sft.learning_rate, cfg.sft.epochs),
        "reward": (cfg.reward.learning_rate, cfg.reward.epochs),
    }.get(job.algorithm, (cfg.learning_rate, cfg.epochs))
    common: dict[str, Any] = {
        "output_dir": scratch,
        "learning_rate": learning_rate,
        "num_train_epochs": epochs,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "max_length": cfg.max_length,
        "bf16": use_bf16,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "use_cpu": not cfg.use_gpu,
        # TRL turns it on by default. On CPU the models that fit are compute-bound, and
        # recomputing activations (about 20% slower, per TRL) buys memory that isn't short.
        "gradient_checkpointing": cfg.use_gpu,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,  # tokenized rows are in memory; workers would only fork
        "dataloader_pin_memory": cfg.use_gpu,
    }
    preference: dict[str, Any] = {
        "beta": cfg.beta,
        "precompute_ref_log_probs": cfg.precompute_ref_log_probs,
        # TRL zeroes every dropout module by default, LoRA's included: keep them when the config
        # asks for LoRA dropout, or the setting would silently do nothing.
        "disable_dropout": not (cfg.lora and cfg.lora_dropout > 0),
    }
    extra: dict[str, Any] = {"ref_model": ref_model}
    if job.algorithm == "dpo":
        from trl import DPOConfig, DPOTrainer

        _score_answer_tokens_only()

        trainer_cls: Any = DPOTrainer
        args: Any = DPOConfig(**common, **preference, loss_type=[cfg.loss_type])
    elif job.algorithm == "kto":
        from trl import KTOConfig, KTOTrainer

        trainer_cls = KTOTrainer
        args = KTOConfig(**common, **preference)
    elif job.algorithm == "sft":
        from trl import SFTConfig, SFTTrainer

        # Prompt-completion rows: the loss covers the answer and its end-of-turn token only (the
        # embedded model's chat template has no generation markers for assistant-only loss).
        trainer_cls = SFTTrainer
        args = SFTConfig(**common, completion_only_loss=True)
        extra = {}
    else:
        from trl import RewardConfig, RewardTrainer

        trainer_cls = RewardTrainer
        args = RewardConfig(
            **common,
            center_rewards_coefficient=cfg.reward.center_rewards_coefficient,
            disable_dropout=preference["disable_dropout"],
        )
        extra = {}
    from transformers import PrinterCallback

    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback],
        **extra,
    )
    # With tqdm off, transformers prints every log dict to stdout; the step sink logs them.
    trainer.remove_callback(PrinterCallback)
    return trainer


def _save(model: Any, tokenizer: Any, job: TrainJob, save_dtype: Any) -> None:
    """safetensors only. LoRA: the trained adapter alone (not TRL's "ref" copy); full: weights and
    tokenizer, in the dtype the base was stored in."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    if job.algorithm == "reward":
        # Scored by PPO, the gate and the admin API as one model: the LoRA is merged.
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        model.to(save_dtype).save_pretrained(str(job.output_dir))
        tokenizer.save_pretrained(str(job.output_dir))
        return
    if job.config.lora:
        model.save_pretrained(
            str(job.output_dir),
            safe_serialization=True,
            selected_adapters=["default"],
            save_embedding_layers=False,
        )
        # PEFT also writes a model card; the artifact is the adapter (its manifest is ours).
        (job.output_dir / "README.md").unlink(missing_ok=True)
        return
    model.to(save_dtype).save_pretrained(str(job.output_dir))
    tokenizer.save_pretrained(str(job.output_dir))


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is KiB on Linux (bytes on macOS, where this reads 1024x too high).
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _StepSink:
    """Collects each logged training step; reports it to Ray Train on every rank (a report is a
    barrier across workers) and appends it to the run's row in the store when given a URL. With
    `stage` set, each step names it (a job's SFT steps, then its DPO steps)."""

    def __init__(self, run_id: str, database_url: str | None, ray_context: Any):
        self.run_id = run_id
        self.stage: str | None = None
        self.steps: list[dict[str, Any]] = []
        self.ray = ray_context is not None
        self._store: Any = None
        self._store_failed = False
        if database_url:
            from service.store import Store

            self._store = Store(database_url)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        sink = self

        class StepMetrics(TrainerCallback):
            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                # The end-of-training summary (train_runtime, ...) is logged too: not a step.
                if logs and "loss" in logs and "train_runtime" not in logs:
                    sink.add(state.global_step, logs)

        return StepMetrics()

    def add(self, step: int, logs: dict[str, Any]) -> None:
        metrics: dict[str, Any] = {
            k: float(v) for k, v in logs.items() if isinstance(v, int | float)
        }
        metrics["step"] = step
        if self.stage is not None:
            metrics["stage"] = self.stage
        self.steps.append(metrics)
        logger.info("run %s step %s: %s", self.run_id, step, metrics)
        if self.ray:
            import ray.train

            ray.train.report(metrics)
        if self._store is not None and not self._store_failed:
            self._append(metrics)

    def take(self) -> list[dict[str, Any]]:
        """The steps collected so far, which the next ones no longer include (one stage's)."""
        steps, self.steps = self.steps, []
        return steps

    def _append(self, metrics: dict[str, Any]) -> None:
        from service.store import TrainingRun

        run_id = self.run_id

        def append(session: Any) -> None:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise LookupError(f"no training run {run_id!r} in the store")
            run.step_metrics = [*(run.step_metrics or []), metrics]

        (outcome,) = self._store.write_batch([append])
        if isinstance(outcome, Exception):
            # Progress reporting must not fail the run; one warning, then stop trying.
            self._store_failed = True
            logger.warning("step metrics of run %s not stored: %s", run_id, outcome)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
