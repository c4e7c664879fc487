"""Summaries of py-spy profiles (`py-spy record --format raw`: one collapsed stack per line,
`frame;frame;...;frame count`), for the "where the time goes" part of a benchmark result."""

from __future__ import annotations

from collections import Counter

from bench.common import ROOT


def summarize_collapsed(text: str, top: int = 15) -> str:
    """The functions with the most samples on top of the stack (own time) and anywhere on it
    (total time), as shares of all samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    if not samples:
        return "no samples"
    lines = [f"{samples} samples", "", "own time (top of the stack):"]
    lines += [f"  {n / samples:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total time (anywhere on the stack):"]
    lines += [f"  {n / samples:6.1%}  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`function (path/to/site-packages/pkg/mod.py:123)` -> `function (pkg/mod.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", f"{ROOT}/", "/lib/python"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name
