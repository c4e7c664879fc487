"""Reward-model scoring: one rendering of (conversation, answer) to tokens, and the forward pass
that reads a reward model's scalar from it.

The reward model is trained on exactly these token ids (`training.trainer` hands TRL's
`RewardTrainer` pre-tokenised `chosen_ids` / `rejected_ids` made by `render`), and PPO, the gate and
`POST /v1/admin/score` score through `score`: the embedded model's pad and end-of-turn tokens are
the same, so any other rendering would read the scalar at another token than the one the model was
trained on. torch and transformers are imported inside the functions: this module imports fast.

    scorer = RewardScorer.load(registry.weights_path(reward_version))
    scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, Any]]


def normalisation(metrics: dict[str, Any]) -> dict[str, float]:
    """`score_mean` and `score_std` of a reward model's scores on its training answers, from its
    version's metrics (`train.reward_model`), which PPO, the gate and the admin API normalise
    scores by; 0 and 1 where training recorded none (or a spread of 0)."""
    train = metrics.get("train")
    measured = train.get("reward_model") if isinstance(train, dict) else None
    measured = measured if isinstance(measured, dict) else {}
    mean, std = measured.get("score_mean"), measured.get("score_std")
    if not (isinstance(mean, int | float) and isinstance(std, int | float) and std > 0):
        return {"score_mean": 0.0, "score_std": 1.0}
    return {"score_mean": float(mean), "score_std": float(std)}


def render(tokenizer: Any, conversation: Messages, answer: str) -> list[int]:
    """Token ids of the conversation followed by `answer` as the assistant's turn, through the
    chat template (no generation prompt: the answer's turn is closed as the template closes it)."""
    messages = [*conversation, {"role": "assistant", "content": answer}]
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=False
    )
    return list(out["input_ids"])


@dataclass
class RewardScorer:
    """A loaded reward model (sequence classification, one label) with its tokenizer."""

    model: Any
    tokenizer: Any
    max_length: int = 1024

    @classmethod
    def load(cls, path: Path, max_length: int = 1024) -> RewardScorer:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model.eval().requires_grad_(False), tokenizer, max_length)

    def score(
        self, conversations: Sequence[Messages], answers: Sequence[str], batch_size: int = 8
    ) -> list[float]:
        """One scalar per (conversation, answer); sequences keep their last `max_length` tokens."""
        ids = [
            render(self.tokenizer, c, a)[-self.max_length :]
            for c, a in zip(conversations, answers, strict=True)
        ]
        return score_ids(self.model, ids, self.tokenizer.pad_token_id, batch_size)


def score_ids(
    model: Any, sequences: Sequence[list[int]], pad_id: int, batch_size: int = 8
) -> list[float]:
    """The reward model's scalar for each token sequence (right-padded batches, no grad)."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            width = max(len(s) for s in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, seq in enumerate(chunk):
                input_ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention[j, : len(seq)] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention.to(device)
            ).logits
            out.extend(float(x) for x in logits[:, 0].float().cpu())
    return out


class ScorerCache:
    """The reward model the admin API scored with last, kept loaded (one at a time: a scorer is
    the size of the policy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: str | None = None
        self._scorer: RewardScorer | None = None

    def get(self, version_id: str, path: Path) -> RewardScorer:
        with self._lock:
            if self._key != version_id or self._scorer is None:
                self._scorer = RewardScorer.load(path)
                self._key = version_id
            return self._scorer
