"""The tensor math of PPO for RLHF on language models: masked statistics, KL estimators, reward
shaping, GAE and the leave-one-out baseline, the clipped policy and value losses, and the
KL-coefficient controllers.

Pure functions over tensors, importing only torch (no models, no I/O, no `torch.distributed`), so
the PPO loop stays thin and every equation here is pinned to hand-computed numbers in
`tests/training/test_ppo_losses.py`.

Shapes: B sequences, T response positions, V vocabulary entries. A mask is a float or bool (B, T)
tensor where 1 marks a real response token; positions where it is 0 never reach a result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype) if like.is_floating_point() else mask.float()


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """mean = sum(values * mask) / sum(mask), over `dim` or over every element.

    values, mask: (B, T) -> scalar, or the shape with `dim` removed. Where the mask has no ones
    the mean is 0, not NaN (a 0/1 mask then sums to 0, so dividing by max(count, 1) is exact).
    """
    m = _float_mask(mask, values)
    total = (values * m).sum() if dim is None else (values * m).sum(dim=dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return total / count.clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """var = sum(mask * (values - mean)^2) / n, times n / (n - 1) if `unbiased`; n = sum(mask).

    values, mask: (B, T) -> scalar. With n <= 1 no Bessel correction is applied (it would divide
    by zero), so one token gives 0 and an empty mask gives 0.
    """
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = _float_mask(mask, values).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(
    values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> Tensor:
    """whitened = (values - mean) * rsqrt(var + eps), mean and unbiased var over the masked tokens.

    values, mask: (B, T) -> (B, T). With `shift_mean=False` the mean is added back (only the scale
    changes). Masked positions of the output are 0.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * _float_mask(mask, values)


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1_t = log p(y_t) - log p_ref(y_t): per-token, unbiased, can be negative.

    logprobs, ref_logprobs: (B, T) -> (B, T).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3_t = (r - 1) - log r with log r = log p_ref(y_t) - log p(y_t) (Schulman's estimator).

    Unbiased for KL(p || p_ref) under samples from p and never negative, since x - 1 >= log x.
    logprobs, ref_logprobs: (B, T) -> (B, T).
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # expm1 keeps r - 1 exact when r is near 1


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """r_t = -kl_coef * kl_t on response tokens, plus scores[b] at the last response token of b.

    The last response token is the last position where the mask is 1, so sequences of different
    lengths (and left or right padding) each get their score at their own end; positions where
    the mask is 0 are 0, and a row with no response tokens gets no score.
    scores: (B,), kl, mask: (B, T) -> (B, T).
    """
    is_token = mask.bool()
    positions = torch.arange(kl.shape[1], device=kl.device).expand_as(is_token)
    last = torch.where(is_token, positions, -1).argmax(dim=1, keepdim=True)  # (B, 1)
    is_last = (positions == last) & is_token
    rewards = -kl_coef * kl * is_token.to(kl.dtype)
    return rewards + scores.to(kl.dtype).unsqueeze(1) * is_last.to(kl.dtype)


def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, backwards over T:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},

    with V and A taken as 0 past the last response token (a masked position ends the episode,
    whatever `rewards` and `values` hold there). returns_t = A_t + V_t.
    rewards, values, mask: (B, T) -> (advantages, returns), both (B, T), 0 where the mask is 0,
    detached (they are targets, not part of the graph).
    """
    m = _float_mask(mask, values)
    rewards, values = rewards.detach(), values.detach()
    horizon = values.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(horizon)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages.append(advantage)
        next_value, next_advantage = values[:, t] * m[:, t], advantage
    stacked = torch.stack(advantages[::-1], dim=1)
    return stacked, (stacked + values) * m


def rloo_advantages(returns: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024): each answer's
    return against the mean return of the other answers to the same prompt,
        A_i = R_i - 1 / (k - 1) * sum_{j != i} R_j = k / (k - 1) * (R_i - mean_group(R)),
    for a batch of groups of k consecutive answers to one prompt. It needs no value model, and
    every token of an answer shares its answer's advantage, so no token's credit depends on where
    in the answer it stands.
    returns: (B,) with B a multiple of k, k >= 2 -> (B,), detached.
    """
    if group_size < 2 or returns.shape[0] % group_size:
        raise ValueError(
            f"rloo_advantages needs groups of k >= 2 answers, got k={group_size} for "
            f"{returns.shape[0]} returns"
        )
    groups = returns.detach().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred * group_size / (group_size - 1)).reshape(-1)


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate: ratio = exp(logp - logp_old),

        loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).

    logprobs, old_logprobs, advantages, mask: (B, T) -> (scalar loss, stats). Stats, detached:
    "clipfrac" (share of tokens where the clipped term is the larger, so clipping is active),
    "approx_kl" (masked_mean(0.5 * (logp - logp_old)^2)) and "ratio" (masked mean ratio).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: v_clipped = V_old + clamp(V - V_old, -eps, eps),

        loss = 0.5 * masked_mean(max((V - R)^2, (v_clipped - R)^2)).

    values, old_values, returns, mask: (B, T) -> (scalar loss, stats). Stats, detached:
    "vf_clipfrac" (share of tokens where the clipped error is the larger).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(y_t) = log_softmax(z_t / temperature)[y_t], computed in float32.

    logits: (B, T, V), tokens: (B, T) integer ids -> (B, T) float32. The temperature must be
    the one the tokens were sampled with, or the ratio against the sampler is off.
    """
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H_t = logsumexp(z_t) - sum_v softmax(z_t)_v * z_t,v per position.

    logits: (B, T, V) -> (B, T). Logits must be finite (a -inf entry gives 0 * -inf = NaN).
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """EV = 1 - Var[R - V] / Var[R] over the masked tokens (1 is perfect, <= 0 predicts nothing).

    values, returns, mask: (B, T) -> scalar, detached. Returns 0 when Var[R] is 0 (constant
    returns leave nothing to explain), so the metric is never NaN.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    ev = 1.0 - var_residual / torch.where(var_returns > 0, var_returns, 1.0)
    return torch.where(var_returns > 0, ev, torch.zeros_like(ev))


@dataclass
class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n_steps / horizon).

    The clip bounds how far one noisy batch can move the coefficient.
    """

    value: float  # current coefficient
    target: float  # target KL (per sequence, nats)
    horizon: float  # episodes over which an error is corrected

    def __post_init__(self) -> None:
        if self.target <= 0:
            raise ValueError(f"AdaptiveKLController.target must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"AdaptiveKLController.horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> float:
        """Scale the coefficient toward the target KL; returns the new `value`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Returns `value` unchanged."""
        return self.value
