"""The evaluation gate: a candidate is served only if its files are intact, its weights finite,
it is better on held-out data than the served version, and vLLM can load and run it. A failed
candidate is kept, marked rejected with the reasons.

"Better" for a DPO / KTO candidate: it prefers the held-out chosen answers over the rejected ones
more than the served version does (DPO's implicit reward, with the served version as reference).
For an RLHF candidate (a `reward_check` that decides): the reward model prefers its answers to the
served version's on held-out prompts often enough, its KL to the served version stays bounded and
its answer length does not run away (`training.reward_eval`). A DPO / KTO candidate gets the same
numbers, reported only, when a reward model exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.registry import Registry
from service.store import ModelVersion
from training.config import GateConfig
from training.reward_eval import RewardCheck

logger = logging.getLogger(__name__)
Canary = Callable[[Path, Path, str], str]


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def run_gate(
    registry: Registry,
    candidate: ModelVersion,
    parent: ModelVersion,
    heldout_pairs: list[dict],
    *,
    cfg: GateConfig,
    beta: float,
    max_length: int,
    canary: Canary,
    reward_check: RewardCheck | None = None,
    bf16: bool = False,
) -> GateResult:
    """Judge `candidate` against `parent` (the served version); `bf16`: the held-out log-probs in
    bfloat16 (where the CPU or GPU computes it natively, as training does)."""
    from training.evaluation import weights_are_finite

    result = GateResult(passed=True)

    def fail(reason: str) -> None:
        result.passed = False
        result.reasons.append(reason)

    mismatched = registry.checksum_mismatches(candidate)
    if mismatched:
        fail(f"checksums differ from the manifest: {', '.join(mismatched)}")
    root = registry.path_of(candidate)
    for part in ("weights", "adapter"):
        if (root / part).is_dir() and not weights_are_finite(root / part):
            fail(f"non-finite values in {part}/")
    if not result.passed:
        return result  # don't evaluate or load weights that are already known bad

    # The canary (a vLLM start in a child process, mostly single-threaded imports and loading)
    # runs while the held-out rewards are computed; one after the other took 141 s of a loop.
    seconds: dict[str, float] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="canary") as pool:
        started = time.perf_counter()
        answer = pool.submit(
            _timed, seconds, "canary", canary,
            registry.weights_path(candidate), registry.tokenizer_path(), cfg.canary_prompt,
        )  # fmt: skip
        if reward_check is None or not reward_check.decides:
            _heldout(
                result, registry, candidate, parent, heldout_pairs, cfg, beta, max_length, bf16,
                fail,
            )  # fmt: skip
        if reward_check is not None:
            _reward_model(result, registry, candidate, parent, reward_check, cfg, fail)
        seconds["heldout"] = round(time.perf_counter() - started, 2)
        try:
            text = answer.result()
        except Exception as exc:  # a canary that cannot run is a failed canary
            fail(f"canary generation failed: {exc}")
        else:
            result.metrics["canary"] = text
            if not text.strip():
                fail("canary generation returned no text")
    result.metrics["seconds"] = seconds
    logger.info(
        "gate for %s: %s %s",
        candidate.id,
        "pass" if result.passed else "fail",
        "; ".join(result.reasons),
    )
    return result


def _timed(seconds: dict[str, float], name: str, fn: Callable[..., str], *args: Any) -> str:
    started = time.perf_counter()
    try:
        return fn(*args)
    finally:
        seconds[name] = round(time.perf_counter() - started, 2)


def _reward_model(
    result: GateResult,
    registry: Registry,
    candidate: ModelVersion,
    parent: ModelVersion,
    check: RewardCheck,
    cfg: GateConfig,
    fail: Callable[[str], None],
) -> None:
    from training.reward_eval import reward_comparison

    if not check.prompts:
        result.metrics["reward_model"] = {"prompts": 0, "skipped": True}
        return
    check.prompts = check.prompts[: cfg.eval_prompts]
    stats = reward_comparison(
        registry.weights_path(candidate), registry.weights_path(parent), check
    )
    result.metrics["reward_model"] = stats
    if not check.decides:
        return
    if stats["win_rate"] < cfg.min_win_rate:
        fail(f"reward-model win rate {stats['win_rate']:.2f} < {cfg.min_win_rate}")
    if stats["kl_reference"] is not None and stats["kl_reference"] > cfg.max_kl:
        fail(f"KL to PPO's reference {stats['kl_reference']:.2f} nats per answer > {cfg.max_kl}")
    # Like the KL, a PPO candidate's length is judged against PPO's reference: SFT on the users'
    # own (shorter) answers moves it legitimately, PPO's reward hacking is what the bound is for.
    change, against = stats["length_change"], "the served version"
    if stats["length_change_reference"] is not None:
        change, against = stats["length_change_reference"], "PPO's reference"
    if abs(change) > cfg.max_length_change:
        fail(
            f"answer length changed by {change:+.0%} from {against} "
            f"(more than {cfg.max_length_change:.0%})"
        )


def _heldout(
    result: GateResult,
    registry: Registry,
    candidate: ModelVersion,
    parent: ModelVersion,
    heldout_pairs: list[dict],
    cfg: GateConfig,
    beta: float,
    max_length: int,
    bf16: bool,
    fail: Callable[[str], None],
) -> None:
    from training.evaluation import heldout_reward_stats

    if len(heldout_pairs) >= max(cfg.min_heldout_pairs, 1):
        base = registry.weights_path(registry.get(candidate.weights_id))
        if candidate.kind == "lora":
            stats = heldout_reward_stats(
                base,
                registry.adapter_path(candidate),
                registry.adapter_path(parent),
                heldout_pairs,
                beta,
                max_length,
                bf16=bf16,
            )
        else:
            stats = heldout_reward_stats(
                registry.weights_path(candidate),
                None,
                None,
                heldout_pairs,
                beta,
                max_length,
                reference_model_path=registry.weights_path(parent),
                bf16=bf16,
            )
        result.metrics["heldout"] = stats
        if stats["accuracy"] < cfg.min_accuracy:
            fail(f"held-out preference accuracy {stats['accuracy']:.2f} < {cfg.min_accuracy}")
        if stats["margin"] <= cfg.min_margin:
            fail(f"held-out reward margin {stats['margin']:.4f} <= {cfg.min_margin}")
    else:
        result.metrics["heldout"] = {"pairs": len(heldout_pairs), "skipped": True}
