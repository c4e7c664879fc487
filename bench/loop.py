"""The loop: from the Nth preference pair arriving to a new version serving, stage by stage.

    python -m bench.loop [--pairs 64] [--profile]

prefloop serves the embedded model with its scheduler at the shipped settings (a cycle starts at
`scheduler.min_new_items`, 64 new pairs, DESIGN.md's target size; `--pairs` changes it, and only
64 gives the target's row). Simulated users (deploy/simulation, as in the demo) chat and vote
through the API until the scheduler queues a cycle; the cycle snapshots, trains on Ray Train (SFT
on the endorsed answers, then DPO, in one job), merges, registers, gates (held-out rewards and a
vLLM canary) and promotes; the replica swaps. The clock starts when the Nth training pair became
available (the newest feedback behind each pair of the snapshot, Nth in time order) and stops
when the replica answers `/v1/models` with the new version: measured, nothing projected.

With `--profile` the training job's worker is sampled with py-spy and the summary of where its
time goes goes into the result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, Result, embedded_model, free_port, scratch_dir

GOAL_S = 180.0
GOAL_PAIRS = 64
ROUND = 16  # conversations between two looks at the scheduler
SEED = 11


async def drive_until_queued(url: str, ctx: Any, result: Result) -> None:
    """Simulated users chat and vote (the demo's mix) until the scheduler queued a cycle."""
    from deploy.demo import CORRECTION_SHARE, PAIRWISE_SHARE
    from deploy.simulation.scenario import load_scenario
    from deploy.simulation.users import make_client, run_traffic
    from service.runs import recent_runs

    scenario = load_scenario()
    conversations = 0
    async with make_client(url, None) as client:
        for round_no in range(40):
            if any(r.status != "skipped" for r in recent_runs(ctx.store)):
                break
            stats = await run_traffic(
                client,
                scenario,
                ROUND,
                concurrency=8,
                seed=SEED + round_no,
                pairwise_share=PAIRWISE_SHARE,
                correction_share=CORRECTION_SHARE,
            )
            conversations += stats.completed
        else:
            raise RuntimeError("no cycle was queued after 40 rounds of traffic")
    result.note(f"{conversations} simulated conversations until the scheduler queued a cycle")


def nth_pair_time(ctx: Any, snapshot_id: str, n: int) -> float:
    """When the snapshot's Nth training pair became available (its newest feedback arrived)."""
    from sqlalchemy import select

    from service.store import Feedback, PreferenceSnapshot

    with ctx.store.reading() as session:
        snap = session.get(PreferenceSnapshot, snapshot_id)
        manifest = json.loads((ctx.settings.data_dir / snap.path / "manifest.json").read_text())
        arrived = dict(session.execute(select(Feedback.id, Feedback.created_at)).tuples().all())
    ready = sorted(
        max(_ts(arrived[fid]) for ids in entry.values() for fid in ids if fid in arrived)
        for entry in manifest["provenance"]["pairs_train"]
    )
    return ready[min(n, len(ready)) - 1]


def _ts(value: datetime) -> float:
    # SQLite hands back naive datetimes; the store writes UTC.
    from datetime import UTC

    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def wait_serving(url: str, version: str, timeout_s: float) -> float | None:
    """Poll /v1/models (answered by the replica's engine) until it names `version`."""
    deadline = time.time() + timeout_s
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.time() < deadline:
            try:
                if client.get("/v1/models").json()["data"][0]["version"] == version:
                    return time.time()
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.1)
    return None


def wait_finished(ctx: Any, timeout_s: float):
    from service.runs import recent_runs

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = [r for r in recent_runs(ctx.store) if r.status != "skipped"]
        if runs and runs[0].finished_at is not None:
            return runs[0]
        time.sleep(0.5)
    raise TimeoutError(f"the cycle did not finish within {timeout_s} s")


class WorkerProfile:
    """py-spy on the Ray Train worker (the process that imports and runs TRL) while it lives."""

    def __init__(self, out: Path):
        self.out = out
        self.proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._attach, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _attach(self) -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            found = subprocess.run(
                ["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True
            ).stdout.split()
            if found:
                self.proc = subprocess.Popen(
                    [
                        str(ROOT / ".venv" / "bin" / "py-spy"),
                        "record",
                        "--pid",
                        found[0],
                        "--rate",
                        "20",
                        "--format",
                        "raw",
                        "--output",
                        str(self.out),
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                self.proc.wait()
                return
            time.sleep(0.5)

    def summary(self, top: int = 15) -> str:
        from bench.profile import summarize_collapsed

        self._thread.join(30)
        if not self.out.exists():
            return "no profile: the training worker was not found"
        return summarize_collapsed(self.out.read_text(), top)


def run(args: argparse.Namespace, result: Result) -> None:
    from deploy.loop import cycle_context
    from service import deployment
    from service.settings import load_settings
    from training.scheduler import Scheduler

    data = scratch_dir("loop")
    port = free_port()
    settings = load_settings(data_dir=data, model_path=embedded_model(), port=port)
    url = f"http://127.0.0.1:{port}"
    deployment.deploy(settings)
    ctx = cycle_context(settings)
    n = ctx.settings.scheduler.min_new_items = args.pairs
    scheduler = Scheduler(ctx)
    scheduler.start()
    profile = WorkerProfile(data / "train.pyspy") if args.profile else None
    try:
        asyncio.run(drive_until_queued(url, ctx, result))
        if profile is not None:
            profile.start()
        run = wait_finished(ctx, 1200)
        served_at = (
            wait_serving(url, run.candidate_version_id, 60) if run.status == "promoted" else None
        )
    finally:
        scheduler.stop()
        deployment.shutdown()
    if run.status != "promoted" or served_at is None:
        result.note(f"the cycle ended {run.status}: {run.error}")
        result.target("Nth pair -> new version serving", None, GOAL_S, "<=", "s")
        return
    t_n = nth_pair_time(ctx, run.snapshot_id, n)
    promoted_at = _ts(ctx.registry.history(1)[0].created_at)
    stages = {
        "scheduler noticed": _ts(run.created_at) - t_n,
        "queued -> started": _ts(run.started_at) - _ts(run.created_at),
        **{name: float(seconds) for name, seconds in run.stages.items()},
        "bookkeeping": 0.0,
        "swap (promotion -> replica serving it)": served_at - promoted_at,
    }
    staged = sum(stages.values())
    total = served_at - t_n
    stages["bookkeeping"] = max(0.0, total - staged)
    summary = run.step_metrics[-1] if run.step_metrics else {}
    candidate = ctx.registry.get(run.candidate_version_id)
    train = candidate.metrics.get("train", {})
    result.table(
        f"{n} new pairs -> new version serving ({train.get('rows')} training rows, "
        f"{train.get('global_step')} steps, bf16 {train.get('bf16')})",
        ["stage", "seconds", "share"],
        [[name, round(s, 1), f"{s / total:.0%}"] for name, s in stages.items()]
        + [["total", round(total, 1), "100%"]],
    )
    if n == GOAL_PAIRS:
        result.target(f"{GOAL_PAIRS} new pairs -> new version serving", total, GOAL_S, "<=", "s")
    else:
        result.note(f"the target is for {GOAL_PAIRS} pairs: this run measured {n}, no target row")
    parts = ([("sft", train["sft"])] if "sft" in train else []) + [(candidate.algorithm, train)]
    result.note(
        "training job: "
        + "; ".join(
            f"{name} on {m.get('rows')} rows: {m.get('global_step')} steps, train_runtime "
            f"{m.get('train_runtime')} s ({m.get('train_samples_per_second')} samples/s)"
            for name, m in parts
        )
        + f"; the preference stage's setup (tokenising, reference pass) "
        f"{train.get('trainer_setup_s')} s; last step loss {summary.get('loss')}; gate (canary "
        f"beside the held-out rewards): {candidate.metrics.get('gate', {}).get('seconds')}"
    )
    if profile is not None:
        result.profile = profile.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--pairs", type=int, default=GOAL_PAIRS, help="new pairs that start a cycle"
    )
    parser.add_argument("--profile", action="store_true", help="sample the training worker")
    args = parser.parse_args()
    result = Result("loop", "The loop: Nth pair to new version serving", "python -m bench.loop")
    run(args, result)
    result.write()


if __name__ == "__main__":
    main()
