"""sha256 of files and folders: the provenance of models and snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(folder: Path, skip: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Every file below `folder` (names in `skip` left out): relative path -> sha256 and size."""
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }
