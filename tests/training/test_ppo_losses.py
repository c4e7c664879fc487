"""PPO math pinned to numbers worked out by hand (in the comments) on 1-2 sequences of 3-4 tokens.

Padding positions hold deliberately large garbage, so any leak through a mask changes a result.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from training.ppo.losses import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_k1,
    kl_k3,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    shaped_rewards,
    value_loss,
)


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def scalar(x: torch.Tensor) -> float:
    return float(x.item())


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_all_and_per_dim() -> None:
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = t([[1, 1, 0], [0, 0, 0]])
    # all: (1 + 2) / 2
    assert scalar(masked_mean(values, mask)) == pytest.approx(1.5)
    # per row: row 0 -> (1 + 2) / 2; row 1 has no ones -> 0
    assert_close(masked_mean(values, mask, dim=1), t([1.5, 0.0]))
    # per column: 1/1, 2/1, nothing -> 0
    assert_close(masked_mean(values, mask, dim=0), t([1.0, 2.0, 0.0]))


def test_masked_mean_empty_mask_is_zero_not_nan_and_bool_mask_works() -> None:
    values = t([[1.0, 2.0, 3.0]])
    assert scalar(masked_mean(values, torch.zeros(1, 3))) == 0.0
    assert scalar(masked_mean(values, torch.tensor([[False, True, True]]))) == pytest.approx(2.5)


def test_masked_var_unbiased_and_biased() -> None:
    values = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 2; squared deviations 1 + 0 + 1 = 2; unbiased 2 / (3 - 1) = 1; biased 2 / 3
    assert scalar(masked_var(values, mask)) == pytest.approx(1.0)
    assert scalar(masked_var(values, mask, unbiased=False)) == pytest.approx(2.0 / 3.0)


def test_masked_var_one_token_is_zero() -> None:
    # n = 1: no Bessel correction (it would divide by 0); the deviation is 0
    assert scalar(masked_var(t([[5.0, 9.0]]), t([[1, 0]]))) == 0.0


def test_masked_whiten_values_and_zero_padding() -> None:
    values = t([[2.0, 4.0, 6.0, 50.0]])
    mask = t([[1, 1, 1, 0]])
    # mean 4; unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (-2, 0, 2) / 2
    assert_close(masked_whiten(values, mask), t([[-1.0, 0.0, 1.0, 0.0]]))
    # shift_mean=False adds the mean 4 back
    assert_close(masked_whiten(values, mask, shift_mean=False), t([[3.0, 4.0, 5.0, 0.0]]))


def test_masked_whiten_two_sequences_has_mean_0_var_1_over_mask() -> None:
    values = t([[1.0, 3.0, -7.0], [5.0, 7.0, 9.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # mean (1 + 3 + 5 + 7 + 9) / 5 = 5; deviations -4 -2 0 2 4, squares sum 40;
    # unbiased var 40 / 4 = 10 -> deviations / sqrt(10)
    s = math.sqrt(10.0)
    out = masked_whiten(values, mask)
    assert_close(out, t([[-4 / s, -2 / s, 0.0], [0.0, 2 / s, 4 / s]]))
    assert scalar(masked_mean(out, mask)) == pytest.approx(0.0, abs=1e-6)
    assert scalar(masked_var(out, mask)) == pytest.approx(1.0, rel=1e-5)


# --- KL estimators -------------------------------------------------------------------------------


def test_kl_k1_is_the_logprob_difference() -> None:
    logp = t([[-1.0, -2.0, -0.5]])
    ref = t([[-1.5, -1.0, -0.5]])
    # -1 - (-1.5) = 0.5; -2 - (-1) = -1; 0
    assert_close(kl_k1(logp, ref), t([[0.5, -1.0, 0.0]]))


def test_kl_k3_hand_values_and_non_negative() -> None:
    logp = t([[math.log(0.5), math.log(0.25), -1.0]])
    ref = t([[math.log(0.25), math.log(0.5), -1.0]])
    # token 0: r = 0.25 / 0.5 = 0.5 -> (0.5 - 1) - ln 0.5 = -0.5 + 0.693147 = 0.193147
    # token 1: r = 0.5 / 0.25 = 2 -> (2 - 1) - ln 2 = 1 - 0.693147 = 0.306853
    # token 2: r = 1 -> 0
    k3 = kl_k3(logp, ref)
    assert_close(k3, t([[0.193147, 0.306853, 0.0]]), atol=1e-6, rtol=0)
    assert bool((k3 >= 0).all())


# --- reward shaping ------------------------------------------------------------------------------


def test_shaped_rewards_score_at_each_sequences_last_token() -> None:
    scores = t([2.0, -1.0])
    kl = t([[0.1, 0.2, 0.3, 9.0], [0.4, 0.5, 9.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    # -0.5 * kl on response tokens; score at index 2 (row 0) and index 1 (row 1); 0 on padding
    expected = t(
        [
            [-0.05, -0.1, -0.15 + 2.0, 0.0],
            [-0.2, -0.25 - 1.0, 0.0, 0.0],
        ]
    )
    assert_close(shaped_rewards(scores, kl, mask, kl_coef=0.5), expected)


def test_shaped_rewards_left_padding_and_empty_row() -> None:
    scores = t([3.0, 7.0])
    kl = torch.zeros(2, 3)
    mask = torch.tensor([[False, True, True], [False, False, False]])
    # row 0 ends at index 2; row 1 has no response token, so no score anywhere
    assert_close(shaped_rewards(scores, kl, mask, kl_coef=0.1), t([[0, 0, 3.0], [0, 0, 0]]))


# --- GAE -----------------------------------------------------------------------------------------


def test_gae_gamma_1_lam_half() -> None:
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.5, 0.5]])
    mask = t([[1, 1, 1]])
    # t=2: delta = 1 + 1*0 - 0.5 = 0.5                  A2 = 0.5
    # t=1: delta = 0 + 1*0.5 - 0.5 = 0                  A1 = 0 + 1*0.5*0.5 = 0.25
    # t=0: delta = 0 + 1*0.5 - 0.5 = 0                  A0 = 0 + 1*0.5*0.25 = 0.125
    # returns = A + V = 0.625, 0.75, 1.0
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(adv, t([[0.125, 0.25, 0.5]]))
    assert_close(ret, t([[0.625, 0.75, 1.0]]))


def test_gae_padding_contributes_nothing() -> None:
    rewards = t([[0.0, 1.0, 5.0]])
    values = t([[0.5, 0.5, 7.0]])  # garbage reward and value at the padded position
    mask = t([[1, 1, 0]])
    # t=2 padded: A2 = 0, and V2 is taken as 0
    # t=1: delta = 1 + 1*0 - 0.5 = 0.5                  A1 = 0.5
    # t=0: delta = 0 + 1*0.5 - 0.5 = 0                  A0 = 0 + 0.5*0.5 = 0.25
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert_close(adv, t([[0.25, 0.5, 0.0]]))
    assert_close(ret, t([[0.75, 1.0, 0.0]]))


def test_gae_discount_with_lam_1_gives_discounted_return() -> None:
    rewards = t([[1.0, 2.0]])
    values = t([[0.5, 1.0]])
    mask = t([[1, 1]])
    # t=1: delta = 2 - 1 = 1                            A1 = 1
    # t=0: delta = 1 + 0.5*1.0 - 0.5 = 1                A0 = 1 + 0.5*1*1 = 1.5
    # returns 2.0, 2.0 = discounted reward sums 1 + 0.5*2 and 2
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    assert_close(adv, t([[1.5, 1.0]]))
    assert_close(ret, t([[2.0, 2.0]]))


def test_gae_outputs_carry_no_gradient() -> None:
    values = t([[0.5, 0.5]]).requires_grad_()
    adv, ret = gae_advantages(t([[0.0, 1.0]]), values, t([[1, 1]]), gamma=1.0, lam=1.0)
    assert not adv.requires_grad
    assert not ret.requires_grad


# --- leave-one-out baseline ----------------------------------------------------------------------


def test_rloo_each_answer_against_the_others_to_its_prompt() -> None:
    # Prompt A's three answers returned 1, 2, 6; prompt B's 0, 0, 3.
    # A: 1 - (2+6)/2 = -3,  2 - (1+6)/2 = -1.5,  6 - (1+2)/2 = 4.5
    # B: 0 - (0+3)/2 = -1.5, again -1.5,         3 - (0+0)/2 = 3
    returns = t([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]).requires_grad_()
    advantages = rloo_advantages(returns, group_size=3)
    assert_close(advantages, t([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    assert not advantages.requires_grad
    # Pairs: each answer's advantage is its difference from the other.
    assert_close(rloo_advantages(t([1.0, 4.0]), group_size=2), t([-3.0, 3.0]))


@pytest.mark.parametrize(("size", "group"), [(4, 1), (5, 2)])
def test_rloo_refuses_groups_it_cannot_form(size: int, group: int) -> None:
    with pytest.raises(ValueError, match="groups of k >= 2"):
        rloo_advantages(torch.zeros(size), group_size=group)


# --- policy and value losses ---------------------------------------------------------------------


def _policy_case() -> tuple[torch.Tensor, ...]:
    # ratios: row 0 = 1.5, 0.5, 1.0; row 1 = 0.5, 1.5, (padding)
    old = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    log_r = t([[math.log(1.5), math.log(0.5), 0.0], [math.log(0.5), math.log(1.5), 3.0]])
    advantages = t([[1.0, -1.0, 2.0], [1.0, -1.0, 100.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    return old + log_r, old, advantages, mask


def test_policy_loss_clipping_for_positive_and_negative_advantage() -> None:
    logprobs, old, advantages, mask = _policy_case()
    logprobs.requires_grad_()
    # eps = 0.2, per token max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   A=+1, r=1.5: max(-1.5, -1.2) = -1.2   clipped
    #   A=-1, r=0.5: max( 0.5,  0.8) =  0.8   clipped
    #   A=+2, r=1.0: max(-2.0, -2.0) = -2.0
    #   A=+1, r=0.5: max(-0.5, -0.8) = -0.5   (pessimistic side: not clipped)
    #   A=-1, r=1.5: max( 1.5,  1.2) =  1.5   (pessimistic side: not clipped)
    # loss = (-1.2 + 0.8 - 2.0 - 0.5 + 1.5) / 5 = -1.4 / 5 = -0.28
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert scalar(loss) == pytest.approx(-0.28, abs=1e-6)
    assert scalar(stats["clipfrac"]) == pytest.approx(2 / 5)
    # ratio: (1.5 + 0.5 + 1.0 + 0.5 + 1.5) / 5 = 1.0
    assert scalar(stats["ratio"]) == pytest.approx(1.0)
    # approx_kl: 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2 + 0) / 5 = (0.164402 + 0.480453) / 5
    assert scalar(stats["approx_kl"]) == pytest.approx(0.644855 / 5, abs=1e-6)
    assert all(not v.requires_grad for v in stats.values())

    # d loss / d logp = -A * r / 5 where unclipped, 0 where clipped or padded:
    #   A=+2, r=1 -> -0.4;  A=+1, r=0.5 -> -0.1;  A=-1, r=1.5 -> +0.3
    loss.backward()
    assert logprobs.grad is not None
    assert_close(logprobs.grad, t([[0.0, 0.0, -0.4], [-0.1, 0.3, 0.0]]))


def test_value_loss_clipping() -> None:
    old = t([[0.0, 0.0, 0.0, 0.0]])
    values = t([[1.0, 0.1, -1.0, 30.0]])
    returns = t([[1.0, 1.0, 1.0, -30.0]])
    mask = t([[1, 1, 1, 0]])
    # eps = 0.2, v_clipped = old + clamp(v - old, -0.2, 0.2) = 0.2, 0.1, -0.2
    #   v=1.0:  (v-R)^2 = 0,    (vc-R)^2 = 0.64 -> 0.64   clipped
    #   v=0.1:  0.81,           0.81            -> 0.81
    #   v=-1.0: 4.0,            1.44            -> 4.0
    # loss = 0.5 * (0.64 + 0.81 + 4.0) / 3 = 0.5 * 5.45 / 3 = 0.908333
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert scalar(loss) == pytest.approx(0.908333, abs=1e-6)
    assert scalar(stats["vf_clipfrac"]) == pytest.approx(1 / 3)


# --- logits --------------------------------------------------------------------------------------


def test_logprobs_from_logits_with_temperature() -> None:
    logits = t([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])  # probs (1/4, 3/4), (3/4, 1/4)
    tokens = torch.tensor([[1, 1]])
    assert_close(logprobs_from_logits(logits, tokens), t([[math.log(0.75), math.log(0.25)]]))
    # temperature 2: logits (0, ln3 / 2) -> p(1) = sqrt3 / (1 + sqrt3); ln = 0.549306 - 1.005053
    out = logprobs_from_logits(logits[:, :1], tokens[:, :1], temperature=2.0)
    assert scalar(out) == pytest.approx(-0.455746, abs=1e-6)


def test_logprobs_from_logits_returns_float32_for_bf16() -> None:
    logits = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[0, 3]]))
    assert out.dtype == torch.float32
    assert_close(out, t([[math.log(0.25), math.log(0.25)]]))


def test_entropy_uniform_is_log_v_and_two_way_hand_value() -> None:
    uniform = torch.full((2, 3, 5), 0.7)
    assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(5.0)))
    # probs (1/4, 3/4): H = 0.25 ln 4 + 0.75 ln(4/3) = ln 4 - 0.75 ln 3 = 1.386294 - 0.823959
    skewed = t([[[0.0, math.log(3.0)]]])
    assert scalar(entropy_from_logits(skewed)) == pytest.approx(0.562335, abs=1e-6)


# --- diagnostics ---------------------------------------------------------------------------------


def test_explained_variance_perfect_partial_and_constant() -> None:
    returns = t([[1.0, 2.0, 3.0, 40.0]])
    mask = t([[1, 1, 1, 0]])
    assert scalar(explained_variance(returns.clone(), returns, mask)) == pytest.approx(1.0)
    # residual R - V = (0, 0, 1): biased var 2/9; Var[R] = 2/3 -> 1 - (2/9) / (2/3) = 2/3
    values = t([[1.0, 2.0, 2.0, -5.0]])
    assert scalar(explained_variance(values, returns, mask)) == pytest.approx(2 / 3)
    # constant returns: Var[R] = 0 -> 0 by contract, not NaN
    assert scalar(explained_variance(values, t([[4.0, 4.0, 4.0, 1.0]]), mask)) == 0.0


# --- KL controllers ------------------------------------------------------------------------------


def test_adaptive_kl_above_target_is_clipped_at_0_2() -> None:
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100.0)
    # KL/target - 1 = 12/6 - 1 = 1 -> clipped to 0.2; 0.1 * (1 + 0.2 * 10/100) = 0.102
    assert ctl.update(current_kl=12.0, n_steps=10) == pytest.approx(0.102)
    assert ctl.value == pytest.approx(0.102)


def test_adaptive_kl_below_target_lowers_it() -> None:
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=100.0)
    # 5.4/6 - 1 = -0.1 (inside the clip) -> 0.1 * (1 - 0.1 * 0.1) = 0.099
    assert ctl.update(current_kl=5.4, n_steps=10) == pytest.approx(0.099)
    # KL 0: -1 clipped to -0.2 -> 0.099 * (1 - 0.2 * 0.1) = 0.09702
    assert ctl.update(current_kl=0.0, n_steps=10) == pytest.approx(0.09702)


def test_adaptive_kl_rejects_non_positive_target() -> None:
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(value=0.1, target=0.0, horizon=100.0)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = FixedKLController(value=0.05)
    assert ctl.update(current_kl=100.0, n_steps=10) == 0.05
    assert ctl.value == 0.05
