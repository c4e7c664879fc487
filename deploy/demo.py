"""`make demo`: the whole loop on the embedded model, driven only through the public HTTP API.

    python -m deploy.demo          (settings from PREFLOOP_...; runs in <data_dir>/demo, fresh)

1. serve the embedded model with the scheduler running;
2. measure the simulated users' approval on the held-out prompts;
3. simulated users chat (n=2 comparisons and thumbs) and vote by the scenario's rubric until the
   scheduler has enough pairs, trains on Ray Train (SFT then DPO by default; SFT -> reward model
   -> PPO with PREFLOOP_TRAIN__ALGORITHM=rlhf), gates and promotes the result, while a steady
   client keeps chatting to count failed requests around the swap;
4. measure approval again; print a report and write report.json and report.png beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from deploy.bootstrap import ensure_embedded_model
from deploy.simulation.scenario import load_scenario
from deploy.simulation.users import ApprovalReport, make_client, measure_approval, run_traffic
from service.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("prefloop.demo")
SEED = 7
# Four samples per held-out prompt: 32 prompts x 4 = 128 judged answers per measurement.
SAMPLES_PER_PROMPT = 4
TRAFFIC_ROUND = 32  # conversations between two looks at the scheduler
# Half the conversations compare two answers, half rate one; the users who rate an answer down
# write the answer they wanted (the shop's procedure from the scenario), as support agents
# reviewing the bot would. Comparisons alone only rank what the model already says.
PAIRWISE_SHARE = 0.5
CORRECTION_SHARE = 1.0
MAX_ROUNDS = 20  # the demo gives up instead of running forever
# A DPO cycle takes a few minutes here; the RLHF path's three jobs (SFT, reward model, PPO) more.
CYCLE_TIMEOUT_S = 1800
SWAP_WAIT_S = 30
# Where Ray keeps the current session's worker logs (under RAY_TMPDIR when that is set).
RAY_WORKER_LOGS = Path(os.environ.get("RAY_TMPDIR", "/tmp/ray")) / "session_latest" / "logs"


@dataclass
class SteadyClient:
    """One chat request after another, to see what a user sees while versions change."""

    base_url: str
    headers: dict[str, str]
    results: list[tuple[float, int, str]] = field(default_factory=list)  # (time, status, version)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {
            "messages": [{"role": "user", "content": "How do I cancel my subscription?"}],
            "max_tokens": 24,
            "temperature": 0.0,
        }
        with httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post("/v1/chat/completions", json=body)
                    version = r.json().get("system_fingerprint", "") if r.status_code == 200 else ""
                    self.results.append((time.time(), r.status_code, version))
                except httpx.HTTPError:
                    self.results.append((time.time(), 0, ""))
                time.sleep(0.2)

    def wait_for(self, version: str, timeout_s: float) -> None:
        """Until a response from `version` arrived (the replicas follow a promotion)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline and not any(v == version for _, _, v in self.results):
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()


def demo_settings() -> Settings:
    base = load_settings()
    model = base.model_path or ensure_embedded_model(base.data_dir)
    demo_dir = base.data_dir / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    return load_settings(data_dir=demo_dir, model_path=model, database_url=None)


def _headers(settings: Settings) -> dict[str, str]:
    admin = [k for k in settings.all_api_keys if "admin" in k.scopes]
    if settings.auth_enabled and not admin:
        raise SettingsError("the demo needs an API key with the admin scope")
    return {"Authorization": f"Bearer {admin[0].key.get_secret_value()}"} if admin else {}


async def drive(settings: Settings, ctx: Any) -> dict[str, Any]:
    from service.runs import recent_runs

    scenario = load_scenario()
    base_url = f"http://127.0.0.1:{settings.port}"
    headers = _headers(settings)
    key = headers.get("Authorization", "")[7:] or None
    report: dict[str, Any] = {"heldout_prompts": len(scenario.heldout)}
    async with make_client(base_url, key) as client:
        before = await measure_approval(
            client, scenario, scenario.heldout, SAMPLES_PER_PROMPT, SEED
        )
        print(
            f"approval before: {before.approval:.1%} of {before.samples} held-out answers "
            f"(mean {before.mean_words:.0f} words)",
            flush=True,
        )
        traffic = []
        cycle_started = time.time()
        for round_no in range(MAX_ROUNDS):
            if any(r.status != "skipped" for r in recent_runs(ctx.store)):
                break  # a cycle is queued or running: leave it the CPU
            stats = await run_traffic(
                client,
                scenario,
                TRAFFIC_ROUND,
                concurrency=8,
                seed=SEED + round_no,
                pairwise_share=PAIRWISE_SHARE,
                correction_share=CORRECTION_SHARE,
            )
            traffic.append(stats)
            print(
                f"traffic round {round_no + 1}: {stats.completed} conversations, "
                f"{stats.approved}/{stats.answers} answers approved, votes {stats.votes}",
                flush=True,
            )
        # The steady client starts once training is done, so it does not take the training's CPU;
        # it still covers the gate (its canary loads a second engine) and the swap.
        shown: set[str] = set()
        await asyncio.to_thread(_wait_for_cycle, ctx, shown, "train")
        steady = SteadyClient(base_url, headers)
        steady_thread = threading.Thread(target=steady.run, daemon=True)
        steady_thread.start()
        run = await asyncio.to_thread(_wait_for_cycle, ctx, shown)
        if run is not None and run.status == "promoted":
            await asyncio.to_thread(steady.wait_for, run.candidate_version_id, SWAP_WAIT_S)
        steady.stop()
        steady_thread.join()
        after: ApprovalReport | None = None
        if run is not None and run.status == "promoted":
            after = await measure_approval(
                client, scenario, scenario.heldout, SAMPLES_PER_PROMPT, SEED
            )
            print(
                f"approval after: {after.approval:.1%} (mean {after.mean_words:.0f} words)",
                flush=True,
            )
    report.update(_summarise(ctx, run, before, after, traffic, steady, cycle_started))
    return report


def _wait_for_cycle(ctx: Any, shown: set[str], stage: str | None = None):
    """The first cycle once it finished (or, with `stage`, once that stage is done); prints each
    stage as it ends (those in `shown` were printed already)."""
    from service.runs import recent_runs

    deadline = time.time() + CYCLE_TIMEOUT_S
    while time.time() < deadline:
        for run in recent_runs(ctx.store):
            if run.status == "skipped":
                continue
            for name, seconds in run.stages.items():
                if name not in shown:
                    shown.add(name)
                    print(f"cycle {run.id}: {name} done ({seconds:.0f} s)", flush=True)
            if run.finished_at is not None or (stage is not None and stage in run.stages):
                return run
        time.sleep(1)
    return None


def _summarise(ctx, run, before, after, traffic, steady, cycle_started) -> dict[str, Any]:
    out: dict[str, Any] = {
        "approval_before": before.approval,
        "approval_after": after.approval if after else None,
        "words_before": before.mean_words,
        "words_after": after.mean_words if after else None,
        "conversations": sum(t.completed for t in traffic),
        "traffic_failures": sum(t.failures for t in traffic),
        "steady_requests": len(steady.results),
        "steady_failures": sum(1 for _, status, _ in steady.results if status != 200),
    }
    if run is None:
        out["run"] = None
        return out
    version = ctx.registry.get(run.candidate_version_id) if run.candidate_version_id else None
    gate = version.metrics.get("gate", {}) if version else {}
    out["run"] = {
        "id": run.id,
        "algorithm": run.algorithm,
        "status": run.status,
        "error": run.error,
        "stages_s": run.stages,
        "candidate": run.candidate_version_id,
        "steps": run.step_metrics,
        "heldout": gate.get("heldout"),
        "reward_check": gate.get("reward_model"),
        "canary": gate.get("canary"),
    }
    reward_id = (version.metrics.get("reward_model") if version else None) or None
    if reward_id:
        measured = ctx.registry.get(reward_id).metrics.get("train", {}).get("reward_model", {})
        out["run"]["reward_model"] = {"id": reward_id, **measured}
    out["cycle_s"] = round((run.finished_at.timestamp() - run.started_at.timestamp()), 1)
    out["feedback_to_served_s"] = round(run.finished_at.timestamp() - cycle_started, 1)
    if run.status == "promoted":
        promoted_at = ctx.registry.history(1)[0].created_at.timestamp()
        first_new = next(
            (
                t
                for t, status, v in steady.results
                if status == 200 and v == run.candidate_version_id
            ),
            None,
        )
        out["swap_s"] = round(first_new - promoted_at, 2) if first_new else None
        out["failed_during_swap"] = sum(
            1 for t, status, _ in steady.results if abs(t - promoted_at) < 10 and status != 200
        )
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    run = report.get("run") or {}
    steps = run.get("steps") or []
    ppo = run.get("algorithm") == "rlhf"
    keys = (
        ("score", "kl", "kl_coef", "clipfrac")
        if ppo
        else ("loss", "rewards/accuracies", "rewards/margins")
    )
    for key in keys:
        points = [(i + 1, s[key]) for i, s in enumerate(steps) if key in s]
        if points:
            curves.plot(*zip(*points, strict=True), label=key, marker=".")
    curves.set(
        title="PPO (normalised reward, KL per answer)" if ppo else "DPO training",
        xlabel="iteration" if ppo else "step",
    )
    curves.legend()
    labels = ["base"] + (
        [report["run"]["candidate"]] if report.get("approval_after") is not None else []
    )
    values = [report["approval_before"]] + (
        [report["approval_after"]] if report.get("approval_after") is not None else []
    )
    bars.bar([label[:18] for label in labels], [v * 100 for v in values], color=["grey", "teal"])
    bars.set(title="held-out approval by version", ylabel="% approved", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_report(report: dict[str, Any]) -> None:
    run = report.get("run") or {}
    before, after = report["approval_before"], report.get("approval_after")
    lines = [
        "",
        "prefloop demo report",
        "--------------------",
        f"held-out approval before: {before:.1%}",
        f"held-out approval after:  {after:.1%}  ({(after - before) * 100:+.1f} points)"
        if after is not None
        else "held-out approval after:  (no new version served)",
        f"training run: {run.get('id')} {run.get('status')}"
        + (f" ({run.get('error')})" if run.get("error") else ""),
        *_algorithm_lines(run),
        f"cycle time: {report.get('cycle_s')} s (stages {run.get('stages_s')})",
        f"first vote to new version serving: {report.get('feedback_to_served_s')} s",
        f"swap time (promotion -> first response from it): {report.get('swap_s')} s",
        f"requests failed during the swap: {report.get('failed_during_swap')}; "
        f"in the whole demo: {report['steady_failures'] + report['traffic_failures']} of "
        f"{report['steady_requests']} steady + the traffic's requests",
    ]
    print("\n".join(lines), flush=True)


def _algorithm_lines(run: dict[str, Any]) -> list[str]:
    if run.get("algorithm") != "rlhf":
        return [f"held-out preference accuracy: {(run.get('heldout') or {}).get('accuracy')}"]
    rm, gate = run.get("reward_model") or {}, run.get("reward_check") or {}
    last = (run.get("steps") or [{}])[-1]
    return [
        f"reward model {rm.get('id')}: held-out accuracy {rm.get('heldout_accuracy')} on "
        f"{rm.get('heldout_pairs')} pairs (longer answer wins: {rm.get('longer_wins_accuracy')})",
        f"PPO last iteration: reward {last.get('reward')}, KL {last.get('kl')} nats per answer, "
        f"KL coefficient {last.get('kl_coef')}, answer tokens {last.get('answer_tokens')}",
        f"gate: reward-model win rate {gate.get('win_rate')} against the served version, "
        f"KL {gate.get('kl')} nats per answer, length change {gate.get('length_change')}",
        f"PPO's own effect (against the policy it started from): win rate "
        f"{gate.get('win_rate_reference')}, score {gate.get('reference_score')} -> "
        f"{gate.get('candidate_score')}, KL {gate.get('kl_reference')} nats per answer, length "
        f"change {gate.get('length_change_reference')}",
    ]


def log_to_file(path: Path) -> None:
    """Send what Ray, vLLM, transformers and this process log (everything written to file
    descriptor 2) to `path`; the demo's progress and report stay on standard output. Ray's
    workers (replicas, engines, training jobs) log to Ray's session directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.close(log)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main() -> int:
    try:
        settings = demo_settings()
    except SettingsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    log = settings.data_dir / "demo.log"
    log_to_file(log)
    print(f"demo in {settings.data_dir}; logs: {log}, Ray's workers: {RAY_WORKER_LOGS}", flush=True)
    started = time.monotonic()
    try:
        return run(settings, started)
    except Exception:
        logging.getLogger("prefloop.demo").exception("the demo failed")
        print(f"demo failed after {time.monotonic() - started:.0f} s; see {log}", flush=True)
        return 1


def run(settings: Settings, started: float) -> int:
    from deploy.loop import cycle_context
    from service import deployment
    from training.scheduler import Scheduler

    deployment.deploy(settings, log_to_driver=False)
    ctx = cycle_context(settings)
    ctx.settings.scheduler.poll_s = 2.0
    scheduler = Scheduler(ctx)
    scheduler.start()
    try:
        print(
            f"prefloop is serving on port {settings.port} "
            f"({time.monotonic() - started:.0f} s to start)",
            flush=True,
        )
        report = asyncio.run(drive(settings, ctx))
    finally:
        scheduler.stop()
        deployment.shutdown()
    report["demo_s"] = round(time.monotonic() - started, 1)
    out = settings.data_dir
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / "report.png")
    print_report(report)
    print(f"demo took {report['demo_s']} s; report: {out / 'report.json'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
