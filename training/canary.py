"""Canary generation: load a candidate's weights in vLLM, the engine that would serve them, and
check that it answers with text. Runs in a child process (the engine inside it) so the engine's
memory goes away with it.

    python -m training.canary WEIGHTS_DIR TOKENIZER_DIR "prompt"     (prints {"text": ...})
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


class CanaryError(RuntimeError):
    pass


def run_canary(weights: Path, tokenizer: Path, prompt: str, timeout_s: float = 300) -> str:
    """The canary's answer; raises `CanaryError` when vLLM cannot load or run the weights."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # The engine core and its worker in this child process instead of two more, each of which
        # imports torch and vLLM again: 43.4 s -> 19.4 s for the embedded model on 2 CPU cores.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "training.canary", str(weights), str(tokenizer), prompt],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CanaryError(f"vLLM could not run the candidate (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])["text"]


def _main(weights: str, tokenizer: str, prompt: str) -> None:
    from vllm import LLM, SamplingParams

    from service.hardware import engine_dtype
    from service.settings import load_settings

    llm = LLM(
        model=weights,
        tokenizer=tokenizer,
        dtype=engine_dtype(load_settings().engine.dtype),
        max_model_len=1024,
        enforce_eager=True,
        enable_chunked_prefill=False,
        max_num_batched_tokens=1024,
    )
    messages: list[Any] = [{"role": "user", "content": prompt}]
    out = llm.chat(
        messages,
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )
    print(json.dumps({"text": out[0].outputs[0].text}), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:4])
