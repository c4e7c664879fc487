"""DPO training throughput and peak memory: prefloop's Ray Train job against TRL's `DPOTrainer`
run standalone, on the same preference pairs, model, batch size, learning rate, max_length, epochs
and seed.

CPU (always; the embedded SmolLM2-135M-Instruct, 20 pairs built from the customer-service
scenario: chosen is the topic's procedure, rejected a deflection / retention pitch / question back):

1. baseline: TRL `DPOTrainer` in a plain Python process (`bench.trl_standalone`), TRL's defaults
   for everything not pinned equal: full fine-tuning in float32, the reference model TRL loads
   itself, reference log-probs at every step; gradient checkpointing pinned off, as our job runs
   on CPU (TRL's default is on);
2. `training.trainer.run_training` on a fresh local Ray cluster with the same settings
   (lora=False, bf16=False, precompute_ref_log_probs=False, gradient checkpointing off): the
   "equal settings" comparison, which says so when the two runs report different settings;
3. the same job with the shipped `TrainConfig` defaults (LoRA, bf16 where the CPU has it,
   precomputed reference log-probs), epochs pinned to the others': the "tuned defaults"
   comparison, against the same baseline, so not like for like.

Each run is its own process, timed from spawn to exit (imports, Ray start, model load, training,
save). Figures: the trainer's `train_samples_per_second` and pairs / that wall time; peak RSS of
the training process (the Ray Train worker for 2 and 3); the CPU seconds of all the run's
processes and the load other processes put on the machine meanwhile. Both sides use 2 torch
threads, what our worker uses (`train.cpus_per_worker`), so the comparison is about the trainer.
`--profile` samples each training process with py-spy and says where its time goes.

GPU (when CUDA is available, or `--device` / PREFLOOP_BENCH_DEVICE names a device): the same
comparison at a realistic size, random-initialised Llama-shaped models built from a config, 8
pairs per step of about 1,360 tokens per sequence: TRL full fine-tuning and TRL LoRA r16 against
`train_loop` with equal and with tuned settings, with the card's name and peak GPU memory, beside
DESIGN.md's H200 figures for TRL.

    python -m bench.training                      # CPU comparison (about 5 minutes here)
    python -m bench.training --profile            # and where the time goes
    python -m bench.training --gpu-size 0.3b,1.4b # on a GPU box: also the larger model
    python -m bench.training --skip-cpu --device cpu --gpu-size tiny   # check the GPU path on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import linecache
import logging
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Result, embedded_model, python, scratch_dir

# What every run of one comparison shares; the CPU values are the shipped TrainConfig's, except
# one epoch (the shipped two would only double the time).
PAIRS = 20  # 5 steps: the three runs take about 5 minutes here
BATCH_SIZE = 4
LEARNING_RATE = 2e-4
MAX_LENGTH = 512
EPOCHS = 1
SEED = 0
THREADS = 2  # TrainConfig.cpus_per_worker: our worker's torch threads
PROFILE_RATE = 25  # py-spy samples per second with --profile: little load on 2 cores
RUN_MARKER = "PREFLOOP_BENCH_RUN"

# Rejected answers: what the scenario's customers hold against an answer (deploy/simulation/
# rubric.py): deflection, retention pitch, filler, a question back. `{topic}` is filled in.
POOR_ANSWERS = (
    "I'm sorry to hear that. As an AI language model I don't have access to your account, so I "
    "can't look into your question about {topic} myself. Please contact customer support "
    "and they will be happy to help. Is there anything else I can help you with?",
    "Great question! Before you go, we'd hate to lose you. Could you tell me a bit more about "
    "your situation ({topic}) so I can see what options there are? Feel free to reach out to "
    "us any time.",
    "Thank you for reaching out about {topic}, and I understand your frustration. There are many "
    "ways to handle this and it depends on your account. Can you please provide your order number "
    "and the email address on the account?",
    "Are you sure? Many customers reconsider once they see our exclusive offer. If this is about "
    "{topic}, let me know and I can arrange a free month for you instead.",
)

# DESIGN.md's figures for TRL's DPOTrainer on an H200 (random-init Llama-shaped models, bf16, 8
# pairs per step, about 1,360 tokens per sequence): the reference the GPU comparison prints.
H200_REFERENCE = [
    ["0.33B full fine-tuning (gradient checkpointing, explicit reference copy)", 34.5, 4.3],
    ["0.33B LoRA r16", 27.0, 19.3],
    ["1.39B LoRA", 13.4, 50.9],
]


@dataclass(frozen=True)
class Shape:
    """A random-initialised Llama-shaped model and the synthetic pairs trained on it."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    tied: bool
    prompt_bytes: int  # the byte-level tokenizer makes one token per byte
    answer_bytes: int
    pairs: int
    batch_size: int = 8


SHAPES = {
    # Checks the GPU path's code on a CPU in seconds.
    "tiny": Shape(64, 2, 4, 172, 512, True, 40, 120, pairs=16),
    # About 0.34B parameters: DESIGN.md's 0.33B reference model.
    "0.3b": Shape(1024, 24, 16, 2816, 32000, True, 344, 1000, pairs=128),
    # About 1.37B parameters: DESIGN.md's 1.39B reference model.
    "1.4b": Shape(2048, 24, 16, 5632, 32000, False, 344, 1000, pairs=64),
}


# --- data ----------------------------------------------------------------------------------------


def preference_rows(count: int) -> list[dict[str, Any]]:
    """`count` TRL conversational pairs from the scenario's training questions, taken round-robin
    over the topics: chosen is the topic's procedure, rejected one of `POOR_ANSWERS`. Every pair
    is checked against the scenario's rubric (chosen approved, rejected not)."""
    from deploy.simulation.rubric import judge
    from deploy.simulation.scenario import load_scenario

    scenario = load_scenario()
    by_topic = [[p for p in scenario.train if p.topic == t] for t in scenario.topics]
    ordered = [q[i] for i in range(max(map(len, by_topic))) for q in by_topic if i < len(q)]
    if len(ordered) < count:
        raise ValueError(f"the scenario has {len(ordered)} training questions, fewer than {count}")
    rows = []
    for i, prompt in enumerate(ordered[:count]):
        topic = scenario.topic_of(prompt)
        good = topic.action_path
        poor = POOR_ANSWERS[i % len(POOR_ANSWERS)].format(topic=topic.id.replace("_", " "))
        if not judge(topic, good).approved or judge(topic, poor).approved:
            raise ValueError(f"pair {i} ({prompt.id}) is not a preference under the rubric")
        rows.append(
            {
                "prompt": scenario.messages(prompt),
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": poor}],
            }
        )
    return rows


def synthetic_rows(shape: Shape, seed: int) -> list[dict[str, Any]]:
    """Pairs of seeded random words, `shape.prompt_bytes` and `shape.answer_bytes` long: with a
    random-initialised model only their length matters."""
    rng = random.Random(seed)
    words = ["order", "refund", "account", "settings", "billing", "invoice", "password", "label"]

    def text(size: int) -> str:
        out = ""
        while len(out) < size:
            out += rng.choice(words) + " "
        return out[:size]

    return [
        {
            "prompt": [{"role": "user", "content": text(shape.prompt_bytes)}],
            "chosen": [{"role": "assistant", "content": text(shape.answer_bytes)}],
            "rejected": [{"role": "assistant", "content": text(shape.answer_bytes)}],
        }
        for _ in range(shape.pairs)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 3 specials, ChatML template): one token per byte, so
    the synthetic pairs have the sequence length they are written for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    )


def build_random_model(folder: Path, shape: Shape, seed: int) -> int:
    """Save a random-initialised Llama of `shape` (bf16, like released checkpoints) with the
    byte-level tokenizer into `folder`; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=shape.tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return params


def sequence_tokens(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    """Mean tokens of prompt + chosen and prompt + rejected under the model's chat template."""
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
    lengths = [
        len(tokenizer.apply_chat_template(r["prompt"] + r[side], return_dict=True)["input_ids"])
        for r in rows
        for side in ("chosen", "rejected")
    ]
    return sum(lengths) / len(lengths)


# --- child processes -----------------------------------------------------------------------------


def run_child(
    module: str, spec: dict[str, Any], folder: Path, timeout_s: float, profile: bool = False
) -> tuple[dict[str, Any], float]:
    """Run `python -m module SPEC RESULT` in its own session; returns (its result, wall s).

    The result gains `cpu_s` (CPU seconds of all the run's processes, Ray's included),
    `other_load_cores` (the load other processes put on the machine meanwhile) and `step_s`
    (the seconds between the training steps the child logged, as they reached this process).
    With `profile`, py-spy samples its training process (the child, or the Ray Train worker it
    starts) into `folder/profile.txt`. Everything the run started is killed when it ends.
    """
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / "spec.json", folder / "result.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    # bench.training takes the pair behind its hidden --job flag.
    flag = ["--job"] if module == "bench.training" else []
    command = [python(), "-m", module, *flag, str(spec_path), str(result_path)]
    # Ray's processes start sessions of their own and are reaped by parents that die with
    # SIGKILL, so neither the process group nor the rusage of children reaches them. This
    # variable, which every descendant inherits, finds them.
    token = uuid.uuid4().hex
    env = {
        **os.environ,
        RUN_MARKER: token,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "HF_DATASETS_CACHE": str(folder / "datasets-cache"),
    }
    busy_before = _machine_busy_s()
    start = time.monotonic()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    steps: list[float] = []
    reader = threading.Thread(target=_read_log, args=(proc, folder / "log.txt", steps), daemon=True)
    reader.start()
    watch = RunWatch(proc, f"{RUN_MARKER}={token}".encode(), bool(spec.get("ray")))
    if profile:
        watch.profile_to(folder / "profile.txt")
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        watch.stop()
        reader.join(timeout=10)
    wall = time.monotonic() - start
    if proc.returncode != 0 or not result_path.exists():
        tail = (folder / "log.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{module} exited with {proc.returncode} after {wall:.0f} s:\n{tail}")
    out = json.loads(result_path.read_text())
    out["cpu_s"] = round(watch.cpu_s, 1)
    other = max(0.0, _machine_busy_s() - busy_before - watch.cpu_s)
    out["other_load_cores"] = round(other / wall, 2)
    out["step_s"] = [round(b - a, 2) for a, b in itertools.pairwise(steps)]
    return out, wall


# A training step the child logged: ours logs "run <id> step <n>: {...}" for every step (Ray
# forwards the worker's output), bench.trl_standalone prints "step <n>: done".
STEP_LINE = re.compile(rb"\bstep (\d+): ")


def _read_log(proc: subprocess.Popen, log: Path, steps: list[float]) -> None:
    """Copy the child's output to `log`, noting when each step line arrives."""
    assert proc.stdout is not None
    with open(log, "wb") as out:
        for line in proc.stdout:
            if STEP_LINE.search(line):
                steps.append(time.monotonic())
            out.write(line)


class RunWatch:
    """Follows one run's processes (those whose environment holds `marker`): adds up their CPU
    time, attaches py-spy to the training process when asked (the child itself, or with
    `ray_worker` the Ray Train worker), and kills what is left when the run ends."""

    def __init__(self, child: subprocess.Popen, marker: bytes, ray_worker: bool):
        self._child, self._marker, self._ray_worker = child, marker, ray_worker
        self._seen: dict[int, bool] = {}  # pid -> holds the marker
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds when last read
        self._profile: Path | None = None
        self._spy: subprocess.Popen | None = None
        self._started = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    @property
    def cpu_s(self) -> float:
        return sum(self._cpu.values())

    def profile_to(self, path: Path) -> None:
        self._profile = path

    def _pids(self) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid not in self._seen:
                try:
                    self._seen[pid] = self._marker in (entry / "environ").read_bytes().split(b"\0")
                except OSError:
                    continue  # gone meanwhile, or not ours to read
            if self._seen[pid]:
                pids.append(pid)
        return pids

    def _sample(self) -> list[int]:
        pids = self._pids()
        tick = os.sysconf("SC_CLK_TCK")
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                self._cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        return pids

    def _training_process(self, pids: list[int]) -> int | None:
        if not self._ray_worker:
            # py-spy gives up on a process whose interpreter is not loaded yet.
            return self._child.pid if time.monotonic() - self._started > 1 else None
        for pid in pids:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    return pid
        return None

    def _follow(self) -> None:
        while not self._stopped.wait(0.5):
            pids = self._sample()
            if self._profile is not None and self._spy is None:
                target = self._training_process(pids)
                if target is not None:
                    self._spy = subprocess.Popen(
                        [str(Path(python()).with_name("py-spy")), "record", "--pid",
                         str(target), "--nonblocking", "--idle", "--full-filenames",
                         "--format", "raw", "--rate", str(PROFILE_RATE),
                         "-o", str(self._profile)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )  # fmt: skip

    def stop(self) -> None:
        """After the child exited: last CPU reading, kill the run's leftovers, let py-spy write
        its file (it ends with its target)."""
        self._stopped.set()
        self._thread.join()
        for pid in self._sample():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self._spy is not None:
            try:
                self._spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._spy.kill()
                self._spy.wait()


def _machine_busy_s() -> float:
    """CPU seconds all processes spent since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")


def job_main(spec_path: Path, result_path: Path) -> None:
    """A child: prefloop's training job on the spec, through Ray Train (`"ray": true`, on a fresh
    local cluster) or `train_loop` in this process (the GPU comparison)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(spec_path.read_text())
    from training.config import TrainConfig
    from training.trainer import TrainJob, run_training, train_loop

    job = TrainJob(
        run_id=spec["run_id"],
        algorithm="dpo",
        base_model_path=Path(spec["model"]),
        parent_adapter_path=None,
        train_file=Path(spec["train_file"]),
        output_dir=Path(spec["output_dir"]),
        config=TrainConfig.model_validate(spec["config"]),
    )
    result: dict[str, Any]
    if spec["ray"]:
        import ray

        start = time.monotonic()
        # What run_training's own ray.init() does, timed apart; "local" so that a cluster someone
        # started with `ray start` on this box is not joined.
        ray.init(address="local")
        ray_start = time.monotonic() - start
        try:
            result = run_training(job).summary
        finally:
            ray.shutdown()
        # fit: Ray Train's start, the worker's imports and model load, training, saving.
        result["ray_start_s"] = round(ray_start, 2)
        result["fit_s"] = round(time.monotonic() - start - ray_start, 2)
    else:
        result = train_loop(job.to_dict())
        result.pop("step_metrics", None)
        if job.config.use_gpu:
            import torch

            result["gpu"] = torch.cuda.get_device_name()
            result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # training/trainer.py's _build_trainer turns gradient checkpointing on exactly with use_gpu;
    # the summary does not report it, so it is recorded here for the settings check.
    result["gradient_checkpointing"] = job.config.use_gpu
    result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")


# --- the comparisons -----------------------------------------------------------------------------


def cpu_runs(model: Path, train_file: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, module, spec) of the three CPU runs."""
    from training.config import TrainConfig

    pinned: dict[str, Any] = {
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "learning_rate": LEARNING_RATE,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "cpus_per_worker": float(THREADS),
    }
    equal = TrainConfig(**pinned, lora=False, bf16=False, precompute_ref_log_probs=False)
    tuned = TrainConfig(**pinned)
    ours = {"ray": True, "model": str(model), "train_file": str(train_file)}
    return [
        ("TRL DPOTrainer standalone (baseline)", "bench.trl_standalone", {
            "model": str(model), "train_file": str(train_file), "device": "cpu",
            "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE, "epochs": EPOCHS,
            "max_length": MAX_LENGTH, "seed": SEED, "threads": THREADS, "bf16": False,
            # Our job trains without gradient checkpointing on CPU and has no setting to turn it
            # on there (it follows use_gpu), so the baseline turns it off to make "equal settings"
            # equal. Off is also TRL's faster setting on CPU (no recomputed activations): both
            # comparisons are against the stronger baseline.
            "gradient_checkpointing": False,
        }),
        ("prefloop Ray Train job, equal settings", "bench.training", {
            **ours, "config": equal.model_dump(mode="json")}),
        ("prefloop Ray Train job, tuned defaults", "bench.training", {
            **ours, "config": tuned.model_dump(mode="json")}),
    ]  # fmt: skip


def cpu_comparison(result: Result, scratch: Path, profile: bool) -> None:
    model = embedded_model()
    # Read the weights once so that the first run does not pay for a cold page cache.
    for file in model.glob("*.safetensors"):
        file.read_bytes()
    rows = preference_rows(PAIRS)
    train_file = write_jsonl(scratch / "pairs.jsonl", rows)
    tokens = sequence_tokens(model, rows)
    measured = []
    for i, (label, module, spec) in enumerate(cpu_runs(model, train_file)):
        folder = scratch / f"cpu-{i}"
        spec = {**spec, "run_id": f"bench-cpu-{i}", "output_dir": str(folder / "out")}
        print(f"[training] {label} ...", flush=True)
        out, wall = run_child(module, spec, folder, timeout_s=900, profile=profile)
        out.update(label=label, wall_s=wall)
        measured.append(out)
        print(
            f"[training]   trainer {out['train_samples_per_second']:.3f} pairs/s, "
            f"job {PAIRS * EPOCHS / wall:.3f} pairs/s ({wall:.1f} s), "
            f"peak RSS {out['peak_rss_mb']:.0f} MB, others' load {out['other_load_cores']} cores",
            flush=True,
        )

    base = measured[0]
    for run in measured:
        # The median step holds up against a burst of other load; the first step is warm-up.
        run["median_step_s"] = statistics.median(run["step_s"]) if run["step_s"] else math.nan
    table = []
    for run in measured:
        trainer_rate = run["train_samples_per_second"]
        job_rate = PAIRS * EPOCHS / run["wall_s"]
        table.append([
            run["label"],
            round(trainer_rate, 3),
            round(trainer_rate / base["train_samples_per_second"], 2),
            round(job_rate, 3),
            round(job_rate / (PAIRS * EPOCHS / base["wall_s"]), 2),
            round(run["median_step_s"], 1),
            round(base["median_step_s"] / run["median_step_s"], 2),
            round(run["train_runtime"], 1),
            round(run["wall_s"], 1),
            round(run["peak_rss_mb"]),
            round(run["peak_rss_mb"] / base["peak_rss_mb"], 2),
            run["cpu_s"],
            run["other_load_cores"],
        ])  # fmt: skip
    result.table(
        f"CPU, {model.name}, {PAIRS} pairs, batch {BATCH_SIZE}, lr {LEARNING_RATE}, max_length "
        f"{MAX_LENGTH}, {EPOCHS} epoch, seed {SEED}, {THREADS} torch threads, "
        f"{tokens:.0f} tokens per sequence",
        [
            "run",
            "trainer pairs/s",
            "x baseline",
            "job pairs/s (wall)",
            "x baseline",
            "median step s",
            "x baseline (speed)",
            "train s",
            "job wall s",
            "peak RSS MB",
            "x baseline",
            "CPU s (all its processes)",
            "others' load (cores)",
        ],
        table,
    )
    differ = unequal_settings(base, measured[1])
    equal_caveat = f"the settings differ: {', '.join(differ)}" if differ else ""
    comparisons = (
        (measured[1], 1.0, "equal settings vs TRL standalone", equal_caveat),
        (
            measured[2],
            1.5,
            f"tuned defaults ({tuned_description(measured[2])}) vs TRL standalone full "
            "fine-tuning (different settings)",
            "",
        ),
    )
    for run, goal, name, caveat in comparisons:
        result.target(
            f"trainer samples/s, Ray Train job with {name}",
            round(run["train_samples_per_second"] / base["train_samples_per_second"], 3),
            goal,
            detail=f"{run['train_samples_per_second']:.3f} vs "
            f"{base['train_samples_per_second']:.3f} pairs/s (train_samples_per_second)",
            caveat=caveat,
        )
        result.target(
            f"job pairs/s incl. start-up, Ray Train job with {name}",
            round(base["wall_s"] / run["wall_s"], 3),
            goal,
            detail=f"{PAIRS * EPOCHS} pairs in {run['wall_s']:.1f} vs {base['wall_s']:.1f} s, "
            "process spawn to exit (imports, Ray start, model load, training, save)",
            caveat=caveat,
        )

    b, e, t = measured
    outside = {run["label"]: round(run["wall_s"] - run["train_runtime"], 1) for run in measured}
    result.note(
        f"job wall time outside training (s): {outside}. Baseline: imports "
        f"{b['phases_s']['import']}, model and reference load with tokenising "
        f"{b['phases_s']['load_and_prepare']}, save {b['phases_s']['save']}. Ray Train jobs: "
        + "; ".join(
            f"{run['label'].removeprefix('prefloop Ray Train job, ')}: Ray start "
            f"{run['ray_start_s']}, Ray Train start with the worker's imports, model load and "
            f"save {run['fit_s'] - run['train_runtime'] - run.get('trainer_setup_s', 0):.1f}, "
            f"trainer set-up {run.get('trainer_setup_s', '-')}"
            for run in (e, t)
        )
    )
    result.note(
        f"baseline: phases {b['phases_s']} s; TRL ran with gradient checkpointing "
        f"{b['gradient_checkpointing']}, bf16 {b['bf16']}, reference model {b['reference_model']}, "
        f"{b['torch_threads']} torch threads"
    )
    for run in (e, t):
        result.note(
            f"{run['label']}: Ray start {run['ray_start_s']} s, Ray Train fit {run['fit_s']} s of "
            f"which trainer set-up (tokenising, reference pass when precomputed) "
            f"{run.get('trainer_setup_s', '-')} s and training {run['train_runtime']:.1f} s; "
            f"lora {run['lora']}, bf16 "
            f"{run['bf16']}, {run['torch_threads']} torch threads, {run['global_step']} steps, "
            f"final loss {run['final'].get('loss', float('nan')):.3g}"
        )
    result.note(
        "Equal settings: gradient checkpointing "
        f"{b.get('gradient_checkpointing', 'unreported')} (TRL standalone) vs "
        f"{e.get('gradient_checkpointing', 'unreported')} (ours); "
        "our job trains without it on CPU, so the baseline turns TRL's default (on) off, which is "
        "also TRL's faster setting here. "
        + (f"Not equal after all: {', '.join(differ)}." if differ else "Nothing else differs.")
    )
    result.note(
        "Tuned defaults are prefloop's shipped CPU settings against the same full fine-tuning "
        "baseline: a different recipe, not a like-for-like comparison. With precomputed "
        "reference log-probs the reference pass runs in DPOTrainer's constructor, outside "
        "train_samples_per_second; the job figure (wall) includes it."
    )
    if not t["bf16"]:
        result.note("This CPU has no native bf16 (no AVX512-BF16 / AMX): the tuned run is float32.")
    if profile:
        result.profile = "\n".join(
            f"{run['label']} (training process, {run['wall_s']:.0f} s run): "
            + summarize_profile(scratch / f"cpu-{i}" / "profile.txt")
            for i, run in enumerate(measured)
        )
        print(f"[training] where the time goes:\n{result.profile}", flush=True)
        result.note(f"--profile: py-spy sampled each training process at {PROFILE_RATE} Hz")
    if max(run["other_load_cores"] for run in measured) > 0.25:
        result.note(
            'Other processes loaded this machine during the runs (column "others\' load"): the '
            "figures of the runs they overlapped are low."
        )


# What an "equal settings" run must share with the baseline, as each run reports it.
EQUAL_SETTINGS = ("gradient_checkpointing", "bf16", "lora", "torch_threads")


def unequal_settings(base: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """The settings of `EQUAL_SETTINGS` the two runs report differently, as "name: base vs ours";
    one that either run leaves unreported counts as different (it cannot be shown equal)."""
    return [
        f"{key}: {base.get(key, 'unreported')} vs {ours.get(key, 'unreported')}"
        for key in EQUAL_SETTINGS
        if key not in base or key not in ours or base[key] != ours[key]
    ]


def tuned_description(run: dict[str, Any]) -> str:
    """What the tuned run changes from the baseline's recipe, from what it reports."""
    from training.config import TrainConfig

    parts = ["LoRA" if run["lora"] else "full fine-tuning", "bf16" if run["bf16"] else "float32"]
    if TrainConfig().precompute_ref_log_probs:
        parts.append("precomputed reference log-probs")
    return ", ".join(parts)


def gpu_comparison(result: Result, scratch: Path, device: str, size: str) -> None:
    shape = SHAPES[size]
    folder = scratch / f"gpu-{size}"
    folder.mkdir(parents=True)
    model = folder / "model"
    print(f"[training] building a random {size} model ...", flush=True)
    params = build_random_model(model, shape, SEED)
    rows = synthetic_rows(shape, SEED)
    train_file = write_jsonl(folder / "pairs.jsonl", rows)
    tokens = sequence_tokens(model, rows)
    max_length = 1536 if tokens < 1536 else int(tokens) + 64
    use_gpu = device == "cuda"
    common = {
        "epochs": EPOCHS,
        "batch_size": shape.batch_size,
        "learning_rate": LEARNING_RATE,
        "max_length": max_length,
        "seed": SEED,
    }
    trl = {
        "model": str(model),
        "train_file": str(train_file),
        "device": device,
        "threads": THREADS,
        # TRL's default (bf16 on) on a GPU; a CPU check stays in float32 like the CPU comparison.
        "bf16": None if use_gpu else False,
        **common,
    }
    ours = {
        **common,
        "max_prompt_length": min(max_length // 2, 512),
        "use_gpu": use_gpu,
        "cpus_per_worker": float(THREADS),
    }
    ours_base = {"ray": False, "model": str(model), "train_file": str(train_file)}
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("TRL DPOTrainer, full fine-tuning (baseline)", "bench.trl_standalone", trl),
        ("TRL DPOTrainer, LoRA r16", "bench.trl_standalone", {**trl, "lora_rank": 16}),
        ("prefloop train_loop, equal settings", "bench.training", {**ours_base, "config": {
            **ours, "lora": False, "precompute_ref_log_probs": False}}),
        ("prefloop train_loop, tuned defaults", "bench.training", {**ours_base, "config": ours}),
    ]  # fmt: skip
    measured = []
    for i, (label, module, spec) in enumerate(runs):
        run_folder = folder / f"run-{i}"
        spec = {**spec, "run_id": f"bench-{size}-{i}", "output_dir": str(run_folder / "out")}
        print(f"[training] {size}: {label} ...", flush=True)
        out, wall = run_child(module, spec, run_folder, timeout_s=600)
        out.update(label=label, wall_s=wall)
        measured.append(out)
    base = measured[0]
    card = base.get("gpu") or device
    table = []
    for run in measured:
        rate = run["train_samples_per_second"]
        row = [run["label"], round(rate, 2), round(rate / base["train_samples_per_second"], 2)]
        if use_gpu:
            gib = run["peak_gpu_mib"] / 1024
            row += [round(gib, 1), round(gib / (base["peak_gpu_mib"] / 1024), 2)]
        row += [round(run["peak_rss_mb"]), round(run["wall_s"], 1)]
        table.append(row)
    memory = ["peak GPU GiB", "x baseline"] if use_gpu else []
    result.table(
        f"{card}, random-init Llama {size} ({params / 1e6:,.1f}M params), bf16 where the device "
        f"has it, {shape.pairs} pairs, {shape.batch_size} pairs per step, {tokens:.0f} tokens per "
        "sequence",
        ["run", "trainer pairs/s", "x baseline", *memory, "peak RSS MB", "wall s"],
        table,
    )
    result.note(
        f"{size}: TRL loads the model in float32 (its default) and, on a GPU, trains under bf16 "
        "autocast (its default); our full fine-tuning does the same, our LoRA keeps the frozen "
        "base in bf16. Gradient checkpointing is on for all four on a GPU (TRL's default, ours "
        "with use_gpu)."
    )
    for run, goal in ((measured[2], 1.0), (measured[3], 1.5)):
        result.target(
            f"{size} on {card}: trainer samples/s, {run['label']} vs TRL full fine-tuning",
            round(run["train_samples_per_second"] / base["train_samples_per_second"], 3),
            goal,
            detail=f"{run['train_samples_per_second']:.2f} vs "
            f"{base['train_samples_per_second']:.2f} pairs/s",
        )
    if use_gpu:
        result.table(
            "Reference: TRL DPOTrainer on an H200 (DESIGN.md; not measured in this run)",
            ["run", "pairs/s", "peak GiB"],
            H200_REFERENCE,
        )


# --- profile -------------------------------------------------------------------------------------


# Where a sample of the training process is spent, by the frames on its stack: the first category
# whose test matches wins, so the reference's share includes its LM head and the LM head's share
# includes its backward.
PROFILE_CATEGORIES = (
    "reference log-probs (forward, no grad)",
    "LM head log-probs (TRL fused head), forward and backward",
    "backward, layers",
    "optimizer step",
    "forward, layers",
    "rest of the training loop",
    "start-up: imports, model load, tokenization, Ray",
)


def _function(frame: str) -> tuple[str, str, int]:
    """(function name without its class, file, line) of a py-spy frame `Class.name (file:line)`."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return name.rsplit(".", 1)[-1], path, int(line) if line.isdigit() else 0


def _category(frames: list[str]) -> str:
    calls = [_function(f) for f in frames]
    names = {name for name, _, _ in calls}

    def reference_call(call: tuple[str, str, int]) -> bool:
        # TRL's inline reference forward is the `ref_...` line of `_compute_loss`.
        name, path, line = call
        return name == "_compute_loss" and "ref_" in linecache.getline(path, line)

    if names & {"_precompute_ref_logps", "compute_ref_log_probs"} or any(
        reference_call(c) for c in calls
    ):
        return PROFILE_CATEGORIES[0]
    if any(path.endswith("chunked_logprob.py") for _, path, _ in calls):
        return PROFILE_CATEGORIES[1]
    in_step = bool(names & {"training_step", "_inner_training_loop"})
    if in_step and "backward" in names:
        return PROFILE_CATEGORIES[2]
    if in_step and any("/torch/optim/" in path for _, path, _ in calls):
        return PROFILE_CATEGORIES[3]
    if "_compute_loss" in names:
        return PROFILE_CATEGORIES[4]
    if in_step:
        return PROFILE_CATEGORIES[5]
    return PROFILE_CATEGORIES[6]


# The training thread's stacks pass through one of these files (py-spy also samples the idle
# threads: Ray's, the tokenizers', ...).
TRAINING_FILES = ("/training/trainer.py", "/bench/trl_standalone.py")


def summarize_profile(path: Path, rate: int = PROFILE_RATE) -> str:
    """Seconds and shares of the training thread's samples (py-spy raw profile, idle samples
    included) by `PROFILE_CATEGORIES`."""
    if not path.exists():
        return "no profile: py-spy did not attach"
    counts: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if count.isdigit() and any(f"{p}:" in stack for p in TRAINING_FILES):
            category = _category(frames)
            counts[category] = counts.get(category, 0) + int(count)
    total = sum(counts.values())
    if not total:
        return "no samples of the training thread"
    return "; ".join(
        f"{name} {counts[name] / rate:.0f} s ({counts[name] / total:.0%})"
        for name in PROFILE_CATEGORIES
        if counts.get(name)
    )


# --- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each CPU run's training process with py-spy: where the time goes",
    )
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU-size comparison")
    parser.add_argument(
        "--device",
        default=os.environ.get("PREFLOOP_BENCH_DEVICE"),
        help="device of the realistic-size comparison (cuda, or cpu to check it on a tiny model);"
        " default: PREFLOOP_BENCH_DEVICE, else cuda when available, else skipped",
    )
    parser.add_argument("--gpu-size", default="0.3b", help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--job", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        job_main(Path(args.job[0]), Path(args.job[1]))
        return 0

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    sizes = [s.strip() for s in args.gpu_size.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"--gpu-size: unknown {unknown}; choose from {sorted(SHAPES)}")

    shown = sys.argv[1:] if argv is None else argv
    result = Result(
        # A GPU-only run must not replace the CPU comparison's result, which the report reads.
        "training-gpu" if args.skip_cpu else "training",
        "DPO training throughput and memory",
        command=" ".join(["python -m bench.training", *shown]),
    )
    scratch = scratch_dir("training")
    # A plain `kill` must still reach the finally blocks that stop the runs' processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.skip_cpu:
        cpu_comparison(result, scratch, args.profile)
    if device is not None:
        for size in sizes:
            gpu_comparison(result, scratch, device, size)
    else:
        result.note("no GPU here: the realistic-size comparison did not run")
    result.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
