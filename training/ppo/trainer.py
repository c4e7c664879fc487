"""PPO against a reward model, as a Ray Train job: the loop around `training.ppo.losses`.

    from training.ppo.trainer import PPOJob, run_ppo
    result = run_ppo(PPOJob(run_id="r1", start_model_path=sft_weights, reward_model_path=rm,
                            reward_stats={"score_mean": 0.1, "score_std": 1.3},
                            prompts_file=prompts_jsonl, output_dir=out, config=TrainConfig()))

Each iteration samples `ppo.rollouts_per_iteration / ppo.samples_per_prompt` prompts, lets the
policy answer each of them `ppo.samples_per_prompt` times (`generate` on the policy being trained:
on-policy by construction, no weight copy to an engine), scores every answer with the reward model
through its own forward on the chat template (`service.scoring`), normalised by the reward model's
score statistics, and shapes per-token rewards as -beta * KL(policy || reference) plus that score
at the answer's last token, minus a penalty for an answer that never ended. The advantages
(`ppo.advantage`) come from GAE on the value model's per-token values, whitened, or from the
leave-one-out baseline: an answer's summed reward against the other answers to its prompt, the
same for all its tokens, scaled to unit variance. `ppo.epochs` passes of minibatches then minimise
the clipped surrogate, the clipped value loss (GAE only) and the entropy bonus. beta follows the
adaptive controller.

The policy is a fresh LoRA on the starting weights; the reference is the same model with the
adapter off, so no second copy is held. The value model (GAE only) is the reward model with a LoRA
of its own and its scalar head applied to every position. Sequences are prompt (left-padded) +
answer; every forward passes explicit position ids so padding never shifts positions between
sampling and scoring, and log-probs are taken at the sampling temperature.
"""

from __future__ import annotations

import json
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.trainer import (
    METRICS_FILE,
    TrainResult,
    _load_tokenizer,
    _peak_rss_mb,
    _ray_train_context,
    _StepSink,
    fit_on_ray,
    fit_prompts,
)

logger = logging.getLogger(__name__)


@dataclass
class PPOJob:
    run_id: str
    start_model_path: Path  # full weights PPO starts from; with the adapter off, the reference
    reward_model_path: Path  # full weights of the reward model (one-label sequence classifier)
    reward_stats: dict[str, float]  # "score_mean", "score_std": the normalisation of its scores
    prompts_file: Path  # JSONL rows with a "prompt" (list of messages)
    output_dir: Path  # receives the adapter and train_metrics.json
    config: TrainConfig = field(default_factory=TrainConfig)
    database_url: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "start_model_path": str(self.start_model_path),
            "reward_model_path": str(self.reward_model_path),
            "reward_stats": dict(self.reward_stats),
            "prompts_file": str(self.prompts_file),
            "output_dir": str(self.output_dir),
            "config": self.config.model_dump(mode="json"),
            "database_url": self.database_url,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PPOJob:
        return cls(
            run_id=data["run_id"],
            start_model_path=Path(data["start_model_path"]),
            reward_model_path=Path(data["reward_model_path"]),
            reward_stats=dict(data["reward_stats"]),
            prompts_file=Path(data["prompts_file"]),
            output_dir=Path(data["output_dir"]),
            config=TrainConfig.model_validate(data["config"]),
            database_url=data.get("database_url"),
        )


def run_ppo(job: PPOJob) -> TrainResult:
    """Run `ppo_loop` as a Ray Train job (one worker: rollouts and updates share the model)."""
    output_dir = job.output_dir.resolve()
    job = PPOJob.from_dict({**job.to_dict(), "output_dir": str(output_dir)})
    cfg = job.config.model_copy(update={"num_workers": 1})
    return fit_on_ray(ppo_loop, job.to_dict(), cfg, job.run_id, output_dir)


@dataclass
class Rollout:
    """One batch of answers. Shapes: B answers, P prompt width (left-padded), T answer width."""

    sequences: Any  # (B, P + T) prompt then answer token ids
    attention: Any  # (B, P + T) 1 on real prompt tokens and answer tokens up to the first EOS
    mask: Any  # (B, T) the answer tokens (through the first EOS)
    prompt_width: int
    texts: list[str]
    ended: list[bool]  # the answer reached EOS within max_new_tokens


def ppo_loop(job_dict: dict[str, Any]) -> dict[str, Any]:
    """Train on this worker (or in this process without Ray); saves the adapter and returns the
    summary with one entry per iteration under "step_metrics"."""
    import torch

    from service.hardware import bf16_native

    job = PPOJob.from_dict(job_dict)
    cfg, ppo = job.config, job.config.ppo
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else bf16_native(cfg.use_gpu)

    tokenizer = _load_tokenizer(job.start_model_path)
    tokenizer.padding_side = "left"
    rows = [json.loads(line) for line in job.prompts_file.read_text().splitlines() if line]
    rows, _, dropped = fit_prompts(rows, tokenizer, cfg.max_prompt_length)
    if not rows:
        raise ValueError(f"{job.prompts_file} has no prompt that fits train.max_prompt_length")
    prompts = [row["prompt"] for row in rows]

    started = time.perf_counter()
    policy, value_model, reward_model = _load_models(job, use_bf16, device)
    params = [
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": ppo.learning_rate}
    ]
    if value_model is not None:
        params.append(
            {
                "params": [p for p in value_model.parameters() if p.requires_grad],
                "lr": ppo.value_learning_rate,
            }
        )
    # eps 1e-5 as in the N+ details: PyTorch's 1e-8 made early updates aggressive.
    optimizer = torch.optim.AdamW(params, eps=1e-5, weight_decay=0.0)
    from training.ppo.losses import AdaptiveKLController, FixedKLController

    horizon = ppo.kl_horizon or float(ppo.iterations * ppo.rollouts_per_iteration)
    kl_ctl: AdaptiveKLController | FixedKLController = (
        AdaptiveKLController(ppo.kl_coef, ppo.kl_target, horizon)
        if ppo.kl_target is not None
        else FixedKLController(ppo.kl_coef)
    )
    setup_s = round(time.perf_counter() - started, 2)

    ray_context = _ray_train_context()
    rank = ray_context.get_world_rank() if ray_context is not None else 0
    sink = _StepSink(job.run_id, job.database_url if rank == 0 else None, ray_context)
    order: list[int] = []
    try:
        for iteration in range(1, ppo.iterations + 1):
            asked = ppo.rollouts_per_iteration // ppo.samples_per_prompt
            while len(order) < asked:  # epochs over the prompts, shuffled
                fresh = list(range(len(prompts)))
                rng.shuffle(fresh)
                order.extend(fresh)
            batch = [
                prompts[i] for i in order[:asked] for _ in range(ppo.samples_per_prompt)
            ]  # each prompt's answers side by side: the groups the leave-one-out baseline reads
            del order[:asked]
            metrics = _iteration(
                batch, policy, value_model, reward_model, tokenizer, optimizer, kl_ctl, job, device
            )
            sink.add(iteration, metrics)
    finally:
        sink.close()

    summary: dict[str, Any] = {
        "run_id": job.run_id,
        "algorithm": "ppo",
        "prompts": len(prompts),
        "rows_dropped": dropped,
        "episodes": ppo.iterations * ppo.rollouts_per_iteration,
        "bf16": use_bf16,
        "torch_threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "train_runtime": round(time.perf_counter() - started - setup_s, 2),
        "final": sink.steps[-1] if sink.steps else {},
        "peak_rss_mb": _peak_rss_mb(),
        "step_metrics": sink.steps,
    }
    if rank == 0:
        job.output_dir.mkdir(parents=True, exist_ok=True)
        policy.save_pretrained(str(job.output_dir), safe_serialization=True)
        (job.output_dir / "README.md").unlink(missing_ok=True)
        (job.output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _load_models(job: PPOJob, use_bf16: bool, device: Any) -> tuple[Any, Any | None, Any]:
    """(policy with a fresh LoRA, value model with a LoRA and a trainable head or None without
    GAE, frozen reward model). The frozen weights are bf16 where the hardware computes it
    natively; adapters and the value head stay float32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.utils import disable_dropout_in_model

    cfg = job.config
    dtype = torch.bfloat16 if use_bf16 else torch.float32

    def lora(task: str) -> LoraConfig:
        return LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type=task,
        )

    policy: Any = AutoModelForCausalLM.from_pretrained(str(job.start_model_path), dtype=dtype)
    policy = get_peft_model(policy, lora("CAUSAL_LM"))
    value: Any = None
    if cfg.ppo.advantage == "gae":
        value = AutoModelForSequenceClassification.from_pretrained(
            str(job.reward_model_path), num_labels=1, dtype=dtype
        )
        value = get_peft_model(value, lora("SEQ_CLS"))
        for module in value.modules():  # the head PEFT copies to train: float32 master weights
            if module.__class__.__name__ == "ModulesToSaveWrapper":
                module.float()
    reward = AutoModelForSequenceClassification.from_pretrained(
        str(job.reward_model_path), num_labels=1, dtype=torch.float32
    )
    for model in (policy, value, reward):
        if model is not None:
            disable_dropout_in_model(model)
            model.to(device)
    reward.eval().requires_grad_(False)
    return policy, value, reward


def _positions(attention: Any) -> Any:
    return (attention.cumsum(-1) - 1).clamp(min=0)


def _rollout(
    policy: Any, tokenizer: Any, prompts: list[list[dict]], job: PPOJob, device: Any
) -> Rollout:
    import torch

    ppo = job.config.ppo
    encoded = tokenizer.apply_chat_template(
        prompts,
        tokenize=True,
        add_generation_prompt=True,
        padding=True,
        return_dict=True,
        return_tensors="pt",
    )
    prompt_ids = encoded["input_ids"].to(device)
    prompt_attention = encoded["attention_mask"].to(device)
    policy.eval()
    with torch.no_grad():
        # No top-k / top-p / minimum length: anything but plain sampling lets the KL go negative.
        out = policy.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_attention,
            do_sample=True,
            temperature=ppo.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=ppo.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    width = prompt_ids.shape[1]
    answer = out[:, width:]
    is_eos = answer == tokenizer.eos_token_id
    ended = is_eos.any(dim=1)
    first = torch.where(ended, is_eos.int().argmax(dim=1), answer.shape[1] - 1)
    mask = (torch.arange(answer.shape[1], device=device)[None, :] <= first[:, None]).long()
    texts = [
        tokenizer.decode(answer[i, : int(first[i]) + 1], skip_special_tokens=True).strip()
        for i in range(answer.shape[0])
    ]
    return Rollout(
        sequences=out,
        attention=torch.cat([prompt_attention, mask], dim=1),
        mask=mask.float(),
        prompt_width=width,
        texts=texts,
        ended=[bool(x) for x in ended],
    )


def _answer_logits(model: Any, r: Rollout, rows: Any) -> Any:
    """Logits that predict each answer token: position t - 1 predicts token t. (b, T, V).

    Only those positions go through the LM head (49k wide on the embedded model): the prompt's
    would be thrown away."""
    attention = r.attention[rows]
    answer_width = r.sequences.shape[1] - r.prompt_width
    logits = model(
        input_ids=r.sequences[rows],
        attention_mask=attention,
        position_ids=_positions(attention),
        use_cache=False,
        logits_to_keep=answer_width + 1,
    ).logits
    return logits[:, :-1]


def _values(value_model: Any, r: Rollout, rows: Any, stats: dict[str, float]) -> Any:
    """The value head on every position's hidden state, aligned with `_answer_logits`. (b, T).

    Normalised as the scores are, (head - mean) / std: the value model starts as the reward
    model, so its first estimates are already on the scale of the returns (the head has no bias
    that could absorb the offset)."""
    base = value_model.get_base_model()
    attention = r.attention[rows]
    hidden = base.model(
        input_ids=r.sequences[rows], attention_mask=attention, position_ids=_positions(attention)
    ).last_hidden_state
    head = base.score(hidden[:, r.prompt_width - 1 : -1].float()).squeeze(-1)
    return (head - stats["score_mean"]) / stats["score_std"]


def _iteration(
    prompts: list[list[dict]],
    policy: Any,
    value_model: Any | None,
    reward_model: Any,
    tokenizer: Any,
    optimizer: Any,
    kl_ctl: Any,
    job: PPOJob,
    device: Any,
) -> dict[str, float]:
    import torch

    from service.scoring import render, score_ids
    from training.ppo import losses

    ppo = job.config.ppo
    started = time.perf_counter()
    r = _rollout(policy, tokenizer, prompts, job, device)
    rollout_s = time.perf_counter() - started
    answer_tokens = int(r.mask.sum().item())
    everything = torch.arange(len(prompts), device=device)
    answers = r.sequences[:, r.prompt_width :]
    with torch.no_grad():
        logits = _answer_logits(policy, r, everything)
        old_logprobs = losses.logprobs_from_logits(logits, answers, ppo.temperature)
        with policy.disable_adapter():
            ref_logits = _answer_logits(policy, r, everything)
        ref_logprobs = losses.logprobs_from_logits(ref_logits, answers, ppo.temperature)
        del logits, ref_logits
        raw = score_ids(
            reward_model,
            [render(tokenizer, p, t) for p, t in zip(prompts, r.texts, strict=True)],
            tokenizer.pad_token_id,
        )
        stats = job.reward_stats
        scores = (torch.tensor(raw) - stats["score_mean"]) / stats["score_std"]
        scores -= ppo.missing_eos_penalty * (~torch.tensor(r.ended)).float()
        if ppo.reward_clip is not None:
            scores = scores.clamp(-ppo.reward_clip, ppo.reward_clip)
        estimator = losses.kl_k3 if ppo.kl_estimator == "k3" else losses.kl_k1
        kl = estimator(old_logprobs, ref_logprobs) * r.mask
        rewards = losses.shaped_rewards(scores.to(device), kl, r.mask, kl_ctl.value)
        if ppo.whiten_rewards:
            rewards = losses.masked_whiten(rewards, r.mask, shift_mean=False)
        if value_model is None:
            # Each prompt's answers are already centred on each other; shifting by the token-
            # weighted mean would hand the longer answers' sign to every token, so scale only.
            per_answer = losses.rloo_advantages(rewards.sum(dim=1), ppo.samples_per_prompt)
            advantages = losses.masked_whiten(per_answer[:, None] * r.mask, r.mask, False)
        else:
            old_values = _values(value_model, r, everything, job.reward_stats)
            advantages, returns = losses.gae_advantages(
                rewards, old_values, r.mask, ppo.gamma, ppo.lam
            )
            advantages = losses.masked_whiten(advantages, r.mask)

    scored = time.perf_counter()
    policy.train()
    if value_model is not None:
        value_model.train()
    seen: dict[str, list[float]] = {}
    surrogate_by_epoch: list[list[float]] = []
    for _ in range(ppo.epochs):
        surrogate_by_epoch.append([])
        for rows in torch.randperm(len(prompts), device=device).split(ppo.minibatch_size):
            mask = r.mask[rows]
            logits = _answer_logits(policy, r, rows)
            logprobs = losses.logprobs_from_logits(logits, answers[rows], ppo.temperature)
            pg_loss, step_stats = losses.policy_loss(
                logprobs, old_logprobs[rows], advantages[rows], mask, ppo.clip_range
            )
            entropy = losses.masked_mean(losses.entropy_from_logits(logits.float()), mask)
            loss = pg_loss - ppo.entropy_coef * entropy
            if value_model is not None:
                values = _values(value_model, r, rows, job.reward_stats)
                vf_loss, vf_stats = losses.value_loss(
                    values, old_values[rows], returns[rows], mask, ppo.value_clip_range
                )
                loss = loss + ppo.vf_coef * vf_loss
                step_stats |= {"value_loss": vf_loss, **vf_stats}
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], 1.0
            )
            optimizer.step()
            surrogate_by_epoch[-1].append(float(pg_loss.detach()))
            for name, value in {"policy_loss": pg_loss, "entropy": entropy, **step_stats}.items():
                seen.setdefault(name, []).append(float(value.detach()))

    kl_per_answer = kl.sum(dim=1)
    mean_kl = float(kl_per_answer.mean())
    coef = kl_ctl.value
    kl_ctl.update(mean_kl, len(prompts))
    metrics = {
        "reward": statistics.fmean(raw),
        "score": float(scores.mean()),
        "kl": mean_kl,
        "kl_coef": coef,
        "answer_tokens": answer_tokens / len(prompts),
        "eos_rate": statistics.fmean(float(e) for e in r.ended),
        **{name: statistics.fmean(v) for name, v in seen.items()},
        # The surrogate before the first update and in the last epoch: PPO should lower it.
        "policy_loss_first_epoch": statistics.fmean(surrogate_by_epoch[0]),
        "policy_loss_last_epoch": statistics.fmean(surrogate_by_epoch[-1]),
        "rollout_tokens_per_s": answer_tokens / rollout_s,
        "rollout_s": rollout_s,
        "scoring_s": scored - started - rollout_s,
        "update_s": time.perf_counter() - scored,
        "iteration_s": time.perf_counter() - started,
    }
    if value_model is not None:
        metrics["explained_variance"] = float(
            losses.explained_variance(old_values, returns, r.mask)
        )
    return metrics
