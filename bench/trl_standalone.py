"""TRL's `DPOTrainer` run standalone, as a user of TRL would run it: the baseline of
`bench.training`.

One run per process, so the peak RSS (and on a GPU the peak allocated GPU memory) it reports is
its own. The spec pins only what the comparison must hold equal (data, model, batch size,
learning rate, max_length, epochs, seed, dtype on CPU, torch threads, and gradient checkpointing
where the spec names it); everything else is TRL's default: the model is given as a path, so TRL
loads it (float32) and builds the reference model the same way, and reference log-probs are
computed at every step.

    python -m bench.trl_standalone SPEC.json RESULT.json

SPEC.json: {"model": dir, "train_file": jsonl, "output_dir": dir, "device": "cpu" | "cuda",
"batch_size", "learning_rate", "epochs", "max_length", "seed", "threads",
"bf16": bool | null (null: TRL's default), "gradient_checkpointing": bool | null (null or absent:
TRL's default, on), "lora_rank": int | null}. RESULT.json receives the
trainer's metrics, the phases' seconds, peak RSS and, on a GPU, the card and its peak memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def run(spec: dict[str, Any]) -> dict[str, Any]:
    start = time.monotonic()
    import torch

    # The same thread count our Ray Train worker uses (train.cpus_per_worker), so the comparison
    # is about the trainer and not about how many cores each side may use.
    torch.set_num_threads(int(spec["threads"]))
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepLine(TrainerCallback):
        """One line per step, which bench.training timestamps as it arrives (TRL logs every
        10 steps by default; this changes nothing in the training)."""

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            print(f"step {state.global_step}: done", flush=True)

    imported = time.monotonic()
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines() if line]
    pinned: dict[str, Any] = {
        "output_dir": str(Path(spec["output_dir"]) / "trainer"),
        "per_device_train_batch_size": spec["batch_size"],
        "learning_rate": spec["learning_rate"],
        "num_train_epochs": spec["epochs"],
        "max_length": spec["max_length"],
        "seed": spec["seed"],
        "use_cpu": spec["device"] == "cpu",
        # Integrations and checkpoints are the environment's business, not the trainer's.
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    if spec.get("bf16") is not None:
        pinned["bf16"] = spec["bf16"]
    if spec.get("gradient_checkpointing") is not None:
        pinned["gradient_checkpointing"] = spec["gradient_checkpointing"]
    peft_config = None
    if spec.get("lora_rank"):
        from peft import LoraConfig

        rank = int(spec["lora_rank"])
        peft_config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = DPOTrainer(
        model=spec["model"],
        args=DPOConfig(**pinned),
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
        callbacks=[StepLine()],
    )
    built = time.monotonic()
    output = trainer.train()
    trained = time.monotonic()
    trainer.save_model(str(Path(spec["output_dir"]) / "model"))
    saved = time.monotonic()

    result: dict[str, Any] = {
        **{k: v for k, v in output.metrics.items() if isinstance(v, int | float)},
        "global_step": output.global_step,
        "rows": len(rows),
        "bf16": bool(trainer.args.bf16),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        "lora": peft_config is not None,
        "reference_model": type(trainer.ref_model).__name__ if trainer.ref_model else None,
        "torch_threads": torch.get_num_threads(),
        "phases_s": {
            "import": round(imported - start, 2),
            "load_and_prepare": round(built - imported, 2),
            "train": round(trained - built, 2),
            "save": round(saved - trained, 2),
        },
        # ru_maxrss is KiB on Linux.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if spec["device"] == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(spec), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
