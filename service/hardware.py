"""What the hardware computes natively, for the defaults that depend on it (the engine's and the
trainer's dtype). torch is imported inside: this module imports fast."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Dtype = Literal["bfloat16", "float16", "float32", "auto"]


def bf16_native(gpu: bool) -> bool:
    """Whether bf16 runs natively: `torch.cuda.is_bf16_supported()` on a GPU; on a CPU,
    AVX512-BF16 or AMX on x86, the `bf16` feature on Arm. Without them bf16 is emulated, and
    both vLLM and training get slower in it, not faster."""
    import torch

    if gpu:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def engine_dtype(configured: Dtype | None) -> Dtype:
    """The dtype vLLM runs in: the configured one, else bfloat16 where it is native, float32
    elsewhere."""
    if configured is not None:
        return configured
    import torch

    return "bfloat16" if bf16_native(gpu=torch.cuda.is_available()) else "float32"
