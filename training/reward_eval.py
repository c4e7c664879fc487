"""What the gate measures with a reward model: how often it prefers a candidate's answers to the
served version's on held-out prompts, how far it moved from the served version (KL per
answer), and how its answer length changed.

Both models answer every prompt by sampling at the rollout temperature with the same seed; the
reward model scores each answer through `service.scoring` (as in PPO). The KL is the k1 estimate
on the candidate's own answers, sum_t log p_cand(y_t) - log p_served(y_t), at that temperature:
the quantity PPO's penalty and target are stated in. Reward hacking shows as a high win rate with a
large KL or a collapsing (or ballooning) length, which the gate bounds.

For a PPO candidate the policy PPO started from (its reference: the SFT version's weights after an
SFT stage) answers too, so the same numbers separate PPO's own effect (candidate against reference)
from the whole path's (candidate against the served version).

    stats = reward_comparison(candidate_weights, served_weights, check)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RewardCheck:
    """What the gate needs to measure a candidate with a reward model; `decides`: the bounds
    reject (RLHF candidates), else the numbers are only reported (DPO / KTO ones)."""

    decides: bool
    reward_model_path: Path
    reward_model_id: str
    # A PPO candidate's KL reference (the weights PPO started from, the SFT version's after an SFT
    # stage); None for other candidates. The gate bounds the KL to it: SFT's move toward the
    # users' own answers is no reward hacking, and the KL to the served version counts it.
    reference_weights: Path | None
    reward_stats: dict[str, float]
    prompts: list[list[dict[str, Any]]]  # held-out prompts (lists of messages)
    max_new_tokens: int
    temperature: float
    seed: int


def win_rate(candidate: list[float], served: list[float]) -> float:
    """Share of prompts where the candidate's score beats the served one's; ties count half."""
    if len(candidate) != len(served) or not candidate:
        raise ValueError("win_rate needs two equally long, non-empty lists of scores")
    return statistics.fmean(
        1.0 if c > s else 0.5 if c == s else 0.0 for c, s in zip(candidate, served, strict=True)
    )


def reward_comparison(
    candidate_weights: Path, served_weights: Path, check: RewardCheck
) -> dict[str, Any]:
    """{"prompts", "win_rate", "kl" (to the served version), "candidate_tokens", "served_tokens",
    "length_change", "candidate_score", "served_score"} (scores normalised by the reward model's
    statistics), and for a PPO candidate "kl_reference", "reference_tokens", "reference_score",
    "win_rate_reference" and "length_change_reference" (each None without a reference)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.scoring import RewardScorer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(served_weights))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    weights = {"candidate": candidate_weights, "served": served_weights}
    if check.reference_weights is not None:
        weights["reference"] = check.reference_weights
    models = {
        name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        for name, path in weights.items()
    }
    encoded: Any = tokenizer.apply_chat_template(
        check.prompts,
        tokenize=True,
        add_generation_prompt=True,
        padding=True,
        return_dict=True,
        return_tensors="pt",
    )
    answers = {}
    for name, model in models.items():
        torch.manual_seed(check.seed)
        with torch.no_grad():
            out = model.eval().generate(
                **encoded,
                do_sample=True,
                temperature=check.temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=check.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers[name] = _cut_at_eos(out[:, encoded["input_ids"].shape[1] :], tokenizer.eos_token_id)

    kls = {
        name: statistics.fmean(
            _kl_per_answer(
                models["candidate"], models[name], encoded, answers["candidate"], check.temperature
            )
        )
        for name in models
        if name != "candidate"
    }
    scorer = RewardScorer.load(check.reward_model_path)
    mean, std = check.reward_stats["score_mean"], check.reward_stats["score_std"]
    scores = {
        name: [
            (s - mean) / std
            for s in scorer.score(
                check.prompts,
                [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers[name]],
            )
        ]
        for name in answers
    }
    tokens = {name: statistics.fmean(len(a) for a in answers[name]) for name in answers}
    stats: dict[str, Any] = {"prompts": len(check.prompts), "reward_model": check.reward_model_id}
    for other, suffix in (("served", ""), ("reference", "_reference")):
        known = other in models
        stats[f"win_rate{suffix}"] = win_rate(scores["candidate"], scores[other]) if known else None
        stats[f"kl{suffix}"] = kls[other] if known else None
        stats[f"length_change{suffix}"] = (
            tokens["candidate"] / max(tokens[other], 1.0) - 1.0 if known else None
        )
        stats[f"{other}_tokens"] = tokens[other] if known else None
        stats[f"{other}_score"] = statistics.fmean(scores[other]) if known else None
    stats["candidate_tokens"] = tokens["candidate"]
    stats["candidate_score"] = statistics.fmean(scores["candidate"])
    return stats


def _cut_at_eos(answers: Any, eos_id: int) -> list[list[int]]:
    """Each answer's token ids through its first EOS (the padding after it dropped)."""
    out = []
    for row in answers.tolist():
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append(row[:end])
    return out


def _kl_per_answer(
    candidate: Any, served: Any, encoded: Any, answers: list[list[int]], temperature: float
) -> list[float]:
    """sum_t log p_cand(y_t) - log p_served(y_t) for each of the candidate's answers."""
    import torch

    from training.ppo.losses import logprobs_from_logits

    out = []
    for i, answer in enumerate(answers):
        prompt = encoded["input_ids"][i][encoded["attention_mask"][i].bool()]
        ids = torch.cat([prompt, torch.tensor(answer, dtype=torch.long)]).unsqueeze(0)
        tokens = ids[:, len(prompt) :]
        sums = []
        for model in (candidate, served):
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[:, len(prompt) - 1 : -1]
            sums.append(float(logprobs_from_logits(logits, tokens, temperature).sum()))
        out.append(sums[0] - sums[1])
    return out
