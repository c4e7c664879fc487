"""`make bench`: every benchmark, one after the other (they share the CPUs), then the report.

    python -m bench [names...]        (default: all of BENCHMARKS, in order)

A benchmark that fails does not stop the others; the report says which one failed. Those that
can profile run with `--profile`, so that the document says where the time goes where a target
is missed (the swap's targets are about waiting, which its own figures show).
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.common import RESULTS_DIR
from bench.report import ORDER, RECORDED_NAMES, write

# Every report section but the recorded ones (training-gpu: bench.training on a GPU machine).
BENCHMARKS = tuple(name for name in ORDER if name not in RECORDED_NAMES)
PROFILED = ("serving", "ingest", "training", "loop")


def main(argv: list[str]) -> int:
    names = tuple(argv) or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    for name in names:
        (RESULTS_DIR / f"{name}.json").unlink(missing_ok=True)
    status: dict[str, str] = {}
    started = time.monotonic()
    for name in names:
        print(f"== bench.{name}", flush=True)
        t0 = time.monotonic()
        flags = ["--profile"] if name in PROFILED else []
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", *flags])
        took = time.monotonic() - t0
        status[name] = "ok" if code == 0 else f"exited with {code} after {took:.0f} s"
        print(f"== bench.{name}: {status[name]} ({took:.0f} s)", flush=True)
    total = time.monotonic() - started
    out = write({"total_s": total, "status": status})
    print(f"all benchmarks: {total / 60:.1f} minutes; wrote {out}")
    return 0 if all(s == "ok" for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
