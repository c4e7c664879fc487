"""PPO (RLHF): which engine should sample PPO's rollouts on this CPU, and how fast PPO runs.

    python -m bench.ppo [--iterations 3] [--prompts 16] [--max-new-tokens 96]

One run on the embedded model (SmolLM2-135M-Instruct), `--prompts` questions of the
customer-service scenario as single user-turn chats, PPO's sampling (temperature 0.7, no top-k,
no top-p, EOS honoured, `--max-new-tokens`):

1. rollout engines on the same prompts and the same weights, one warm-up then the median of 3:
   a. HF `generate` on the policy exactly as PPO samples it: `training.ppo.trainer._rollout` on
      the fresh LoRA (r 16, all-linear) that `_load_models` builds, one batch of all prompts;
   b. vLLM offline (`vllm.LLM.chat`, the canary's engine settings) on the merged weights, in a
      child process (`--vllm-worker`) so its memory and processes go away; also its start-up and
      an in-place weight reload, the `collective_rpc("reload_weights")` that `service/engine.py`
      swaps versions with, which a vLLM rollout engine would need after every PPO update;
   c. the rollout side of one PPO iteration under each design, both charged the same answer
      tokens: HF = generate; vLLM = generate + merge the LoRA into full weights and save them
      (`merge_and_unload` + `save_pretrained`, measured here) + reload.
2. `training.ppo.trainer.ppo_loop` in this process (no Ray) against a reward model made from the
   embedded model under a random one-label head: episodes/s over the loop's `train_runtime`
   (model load excluded), the median iteration, rollout tokens/s, and the rollout's share.

The target says whether HF generate, the project's choice for on-policy rollouts, is at least as
fast per iteration as the vLLM design.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Result, embedded_model, python, scratch_dir

logger = logging.getLogger(__name__)

TEMPERATURE = 0.7  # PPOConfig's default
REPEATS = 3  # timed generations per engine, after one warm-up
THREADS = 2  # train.cpus_per_worker: PPO's torch threads
SHIPPED_ITERATIONS = 8  # PPOConfig.iterations: what one job amortises the engine start over
WORKER_TIMEOUT_S = 900


# --- arithmetic ----------------------------------------------------------------------------------


def tokens_per_s(tokens: float, seconds: float) -> float:
    """Answer tokens per wall second; NaN without time."""
    return tokens / seconds if seconds > 0 else math.nan


def median_rate(runs: Sequence[tuple[float, float]]) -> float:
    """The median over repetitions of (answer tokens, seconds) of their tokens/s."""
    return statistics.median(tokens_per_s(t, s) for t, s in runs)


@dataclass(frozen=True)
class IterationCost:
    """The rollout side of one PPO iteration under each design, in seconds."""

    tokens: float  # answer tokens of the iteration's rollouts, charged to both designs
    hf_s: float  # generate on the policy being trained
    vllm_generate_s: float
    merge_save_s: float  # LoRA merged into full weights, saved where vLLM reloads from
    reload_s: float | None  # None: the reload did not work

    @property
    def vllm_s(self) -> float | None:
        if self.reload_s is None:
            return None
        return self.vllm_generate_s + self.merge_save_s + self.reload_s

    @property
    def ratio(self) -> float | None:
        """vLLM's seconds / HF's: >= 1 means HF generate is at least as fast."""
        return None if self.vllm_s is None else self.vllm_s / self.hf_s


def iteration_cost(
    tokens: float,
    hf_tokens_per_s: float,
    vllm_tokens_per_s: float,
    merge_save_s: float,
    reload_s: float | None,
) -> IterationCost:
    """Both engines generate the same `tokens` at their measured rates; vLLM also merges, saves
    and reloads the policy."""
    return IterationCost(
        tokens,
        tokens / hf_tokens_per_s,
        tokens / vllm_tokens_per_s,
        merge_save_s,
        reload_s,
    )


def verdict(cost: IterationCost) -> str:
    """Which design is faster here, and by what ratio, in words."""
    if cost.ratio is None:
        return "no verdict: the vLLM weight reload did not work"
    if cost.ratio >= 1:
        return f"HF generate is faster here: the vLLM design takes {cost.ratio:.2f}x as long"
    return f"the vLLM design is faster here: HF generate takes {1 / cost.ratio:.2f}x as long"


def ppo_figures(steps: Sequence[dict[str, float]], rollouts: int, train_runtime: float) -> dict:
    """Throughput of a PPO run from its per-iteration metrics. `answer_tokens` is the mean per
    answer, so an iteration's rollout took answer_tokens * rollouts / rollout_tokens_per_s; the
    rest of `iteration_s` is scoring (log-probs, reference, values, reward) and the updates."""
    rollout_s = [s["answer_tokens"] * rollouts / s["rollout_tokens_per_s"] for s in steps]
    iteration_s = [s["iteration_s"] for s in steps]
    return {
        "episodes_per_s": len(steps) * rollouts / train_runtime,
        "iteration_s": statistics.median(iteration_s),
        "rollout_tokens_per_s": statistics.median(s["rollout_tokens_per_s"] for s in steps),
        "rollout_s": statistics.median(rollout_s),
        "update_s": statistics.median(i - r for i, r in zip(iteration_s, rollout_s, strict=True)),
        "rollout_share": sum(rollout_s) / sum(iteration_s),
    }


# --- measurements --------------------------------------------------------------------------------


def scenario_prompts(count: int) -> list[list[dict[str, str]]]:
    """`count` training questions of the scenario, round-robin over its topics, as chats of one
    user turn."""
    from deploy.simulation.scenario import load_scenario

    scenario = load_scenario()
    by_topic = [[p for p in scenario.train if p.topic == t] for t in scenario.topics]
    ordered = [q[i] for i in range(max(map(len, by_topic))) for q in by_topic if i < len(q)]
    if len(ordered) < count:
        raise ValueError(f"--prompts {count}: the scenario has {len(ordered)} training questions")
    return [[{"role": "user", "content": p.text}] for p in ordered[:count]]


def build_reward_model(model_dir: Path, out: Path) -> Path:
    """The embedded model under a random one-label head, saved with its tokenizer: a reward
    model as fast as a trained one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def measure_hf(job: Any, prompts: list[list[dict[str, str]]], merged: Path) -> dict[str, Any]:
    """PPO's `_rollout` on the policy `_load_models` builds: a warm-up, then REPEATS timed
    batches; then the LoRA merged into full weights and saved to `merged` (timed)."""
    import torch

    from service.hardware import bf16_native
    from training.ppo.trainer import _load_models, _rollout
    from training.trainer import _load_tokenizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(job.config.seed)
    use_bf16 = job.config.bf16 if job.config.bf16 is not None else bf16_native(False)
    device = torch.device("cpu")
    tokenizer = _load_tokenizer(job.start_model_path)
    tokenizer.padding_side = "left"
    policy, value, reward = _load_models(job, use_bf16, device)
    del value, reward
    runs, ended = [], []
    for repeat in range(REPEATS + 1):
        started = time.perf_counter()
        r = _rollout(policy, tokenizer, prompts, job, device)
        seconds = time.perf_counter() - started
        logger.info("HF generate %d: %d tokens in %.2f s", repeat, int(r.mask.sum()), seconds)
        if repeat:
            runs.append((int(r.mask.sum().item()), seconds))
            ended.append(sum(r.ended))
    started = time.perf_counter()
    policy.merge_and_unload().save_pretrained(str(merged), safe_serialization=True)
    merge_save_s = time.perf_counter() - started
    del policy
    gc.collect()
    return {"runs": runs, "ended": ended, "merge_save_s": merge_save_s, "bf16": use_bf16}


def measure_vllm(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """`vllm_worker` in a child process; {"error": ...} when it fails."""
    spec_path = folder / "vllm-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    try:
        proc = subprocess.run(
            [python(), "-m", "bench.ppo", "--vllm-worker", str(spec_path)],
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the vLLM worker did not finish within {WORKER_TIMEOUT_S} s"}
    (folder / "vllm-worker.log").write_text(proc.stdout + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"error": f"the vLLM worker exited with {proc.returncode}: {tail}"}
    return dict(json.loads(lines[-1]))


def vllm_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: start vLLM on the merged weights, generate the prompts (a warm-up, then
    REPEATS timed), then reload the weights in place REPEATS times."""
    from vllm import LLM, SamplingParams

    from service.hardware import engine_dtype

    started = time.perf_counter()
    llm = LLM(
        model=spec["weights"],
        tokenizer=spec["tokenizer"],
        dtype=engine_dtype(None),
        max_model_len=1024,
        max_num_batched_tokens=1024,
        enforce_eager=True,
        enable_chunked_prefill=False,
        seed=spec["seed"],
    )
    start_s = time.perf_counter() - started
    eos = llm.get_tokenizer().eos_token_id
    # PPO's sampling: plain temperature sampling, no top-k (0 and -1 both disable it), no top-p.
    params = SamplingParams(
        temperature=spec["temperature"], top_p=1.0, top_k=0, max_tokens=spec["max_new_tokens"]
    )
    runs, ended, eos_kept = [], [], 0
    for repeat in range(REPEATS + 1):
        t0 = time.perf_counter()
        outs = llm.chat(spec["prompts"], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        answers = [o.outputs[0] for o in outs]
        if repeat:
            # Through the first EOS, like PPO's answer mask: vLLM keeps the EOS in token_ids.
            runs.append((sum(len(a.token_ids) for a in answers), seconds))
            ended.append(sum(a.finish_reason == "stop" for a in answers))
            eos_kept += sum(bool(a.token_ids) and a.token_ids[-1] == eos for a in answers)
    reloads: list[float] = []
    error = None
    try:
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            llm.collective_rpc("reload_weights", kwargs={"weights_path": spec["weights"]})
            reloads.append(time.perf_counter() - t0)
        after = llm.chat(spec["prompts"][:1], params, use_tqdm=False)[0].outputs[0]
        if not after.token_ids:
            error = "no answer after the reload"
    except Exception as exc:  # reported, not raised: the figures before it still count
        error = f"{type(exc).__name__}: {exc}"
    return {
        "start_s": start_s,
        "runs": runs,
        "ended": ended,
        "eos_kept": eos_kept,
        "reload_s": statistics.median(reloads) if reloads and error is None else None,
        "reload_error": error,
        "dtype": engine_dtype(None),
    }


def measure_ppo(job: Any) -> dict[str, Any]:
    from training.ppo.trainer import ppo_loop

    return ppo_loop(job.to_dict())


# --- the result ----------------------------------------------------------------------------------


def report(
    result: Result,
    prompts: int,
    max_new_tokens: int,
    hf: dict[str, Any],
    vllm: dict[str, Any],
    summary: dict[str, Any] | None,
) -> None:
    """Tables, target and notes from the measurements."""
    hf_rate = median_rate(hf["runs"])
    hf_tokens = statistics.median(t for t, _ in hf["runs"])
    rows: list[list[Any]] = [
        [
            "HF generate on the LoRA policy (PPO's _rollout)",
            round(hf_rate, 1),
            hf_tokens,
            round(statistics.median(s for _, s in hf["runs"]), 2),
            f"{statistics.median(hf['ended']):.0f}/{prompts}",
        ]
    ]
    cost = None
    if "error" in vllm:
        rows.append(["vLLM LLM.chat, merged weights", None, None, None, None])
        result.note(f"vLLM not measured: {vllm['error']}")
    else:
        vllm_rate = median_rate(vllm["runs"])
        rows.append(
            [
                f"vLLM LLM.chat, merged weights ({vllm['dtype']})",
                round(vllm_rate, 1),
                statistics.median(t for t, _ in vllm["runs"]),
                round(statistics.median(s for _, s in vllm["runs"]), 2),
                f"{statistics.median(vllm['ended']):.0f}/{prompts}",
            ]
        )
        # Both designs are charged the mean answer tokens of every timed batch of both engines.
        tokens = statistics.fmean(t for t, _ in [*hf["runs"], *vllm["runs"]])
        cost = iteration_cost(tokens, hf_rate, vllm_rate, hf["merge_save_s"], vllm["reload_s"])
    result.table(
        f"Rollout engines: {prompts} prompts in one batch, up to {max_new_tokens} new tokens, "
        f"temperature {TEMPERATURE}, same weights; median of {REPEATS} after a warm-up",
        ["engine", "answer tokens/s", "answer tokens", "batch s", "answers ended"],
        rows,
    )
    name = (
        f"rollout engine, s per PPO iteration of {prompts} rollouts: "
        "vLLM (generate + merge/save + reload) / HF generate (>= 1: HF at least as fast)"
    )
    if cost is None:
        result.target(name, None, 1.0, ">=")
    else:
        vllm_s = "-" if cost.vllm_s is None else round(cost.vllm_s, 2)
        reload_s = "-" if cost.reload_s is None else round(cost.reload_s, 2)
        result.table(
            f"Rollout side of one PPO iteration ({cost.tokens:.0f} answer tokens for both)",
            ["design", "generate s", "merge + save s", "reload s", "total s"],
            [
                ["HF generate on the policy", round(cost.hf_s, 2), 0, 0, round(cost.hf_s, 2)],
                [
                    "vLLM engine + full-weight reload",
                    round(cost.vllm_generate_s, 2),
                    round(cost.merge_save_s, 2),
                    reload_s,
                    vllm_s,
                ],
            ],
        )
        result.target(name, None if cost.ratio is None else round(cost.ratio, 3), 1.0, ">=")
        result.note(verdict(cost))
        if vllm["reload_error"]:
            result.note(f"vLLM in-place reload not measured: {vllm['reload_error']}")
        result.note(
            "batch seconds of each timed repetition: HF "
            + ", ".join(f"{s:.1f}" for _, s in hf["runs"])
            + "; vLLM "
            + ", ".join(f"{s:.1f}" for _, s in vllm["runs"])
        )
        start = vllm["start_s"]
        result.note(
            f"vLLM engine start {start:.1f} s, once per job (not in the ratio): "
            f"{start / SHIPPED_ITERATIONS:.1f} s per iteration over the shipped "
            f"{SHIPPED_ITERATIONS} iterations; {vllm['eos_kept']} of the vLLM answers ended on "
            "an EOS token counted in their tokens, as PPO's answer mask counts it"
        )
    if summary is None:
        return
    steps = summary["step_metrics"]
    figures = ppo_figures(steps, prompts, float(summary["train_runtime"]))
    result.table(
        f"PPO loop in-process (no Ray): {len(steps)} iterations x {prompts} rollouts, "
        f"up to {max_new_tokens} new tokens, {summary['torch_threads']} torch threads, "
        f"bf16 {summary['bf16']}; medians over the iterations",
        [
            "episodes/s",
            "iteration s",
            "rollout tokens/s",
            "rollout s",
            "scoring + update s",
            "rollout share",
        ],
        [
            [
                round(figures["episodes_per_s"], 3),
                round(figures["iteration_s"], 1),
                round(figures["rollout_tokens_per_s"], 1),
                round(figures["rollout_s"], 1),
                round(figures["update_s"], 1),
                f"{figures['rollout_share']:.0%}",
            ]
        ],
    )
    if cost is not None and cost.vllm_s is not None:
        saved = cost.hf_s - cost.vllm_s
        result.note(
            f"the vLLM design would change a median PPO iteration ({figures['iteration_s']:.1f} s) "
            f"by {-saved:+.1f} s ({-saved / figures['iteration_s']:+.0%}): the rollout is "
            f"{figures['rollout_share']:.0%} of it; the engine start, the engine's memory beside "
            "the trainer's and the two sharing the CPUs are not in that figure"
        )
    result.note(
        f"PPO: train_runtime {summary['train_runtime']} s (model load, {summary['setup_s']} s, "
        f"excluded), mean answer {statistics.fmean(s['answer_tokens'] for s in steps):.1f} "
        f"tokens, EOS rate {statistics.fmean(s['eos_rate'] for s in steps):.2f}, "
        f"peak RSS {summary['peak_rss_mb']} MB; the reward model is the embedded model under a "
        "random one-label head (its scores do not matter for speed)"
    )


# --- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations of the loop")
    parser.add_argument(
        "--prompts", type=int, default=16, help="the rollout batch: answers per iteration"
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--vllm-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_worker:
        out = vllm_worker(json.loads(args.vllm_worker.read_text()))
        print(json.dumps(out), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from training.config import PPOConfig, TrainConfig
    from training.ppo.trainer import PPOJob

    result = Result("ppo", "PPO (RLHF)", command="python -m bench.ppo")
    scratch = scratch_dir("ppo")
    model_dir = embedded_model()
    prompts = scenario_prompts(args.prompts)
    prompts_file = scratch / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ppo = PPOConfig(
        iterations=args.iterations,
        rollouts_per_iteration=args.prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=TEMPERATURE,
    )
    job = PPOJob(
        run_id="bench-ppo",
        start_model_path=model_dir,
        reward_model_path=build_reward_model(model_dir, scratch / "reward-model"),
        reward_stats={"score_mean": 0.0, "score_std": 1.0},
        prompts_file=prompts_file,
        output_dir=scratch / "ppo-out",
        config=TrainConfig(ppo=ppo, cpus_per_worker=THREADS),
    )

    merged = scratch / "merged"
    hf = measure_hf(job, prompts, merged)
    spec = {
        "weights": str(merged),
        "tokenizer": str(model_dir),
        "prompts": prompts,
        "temperature": TEMPERATURE,
        "max_new_tokens": args.max_new_tokens,
        "seed": job.config.seed,
    }
    vllm = measure_vllm(spec, scratch)
    summary: dict[str, Any] | None = None
    try:
        summary = measure_ppo(job)
    except Exception as exc:  # the engine comparison still stands
        logger.exception("the PPO loop failed")
        result.note(f"PPO loop failed: {type(exc).__name__}: {exc}")
    report(result, args.prompts, args.max_new_tokens, hf, vllm, summary)
    result.note(
        "HF side: the policy loaded by PPO's _load_models (fresh LoRA r 16, all-linear, "
        f"bf16 {hf['bf16']}), {THREADS} torch threads; merge + save is "
        "merge_and_unload() + save_pretrained of the full weights (a loop that goes on training "
        "the adapter would merge and unmerge instead, at about the same cost); vLLM: "
        "enforce_eager, no chunked prefill, max_model_len 1024, in its own process after HF"
    )
    result.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
