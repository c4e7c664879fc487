"""`make demo`: the whole loop on the embedded model, driven only through the public HTTP API.

    python -m deploy.demo [--cycles 3]   (settings from PREFLOOP_...; in <data_dir>/demo, fresh)

1. serve the embedded model with the scheduler running;
2. measure the simulated users' approval on the held-out prompts;
3. simulated users chat (n=2 comparisons and thumbs) and vote by the scenario's rubric until the
   scheduler has enough new pairs, trains on Ray Train (SFT then DPO by default; SFT -> reward
   model -> PPO with PREFLOOP_TRAIN__ALGORITHM=rlhf), gates and promotes the result, while a
   steady client keeps chatting to count failed requests around the swap;
4. measure approval of what serves now; repeat 3-4 (new feedback on the new version each time);
   print a report and write report.json and report.png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from deploy.simulation.users import make_client, measure_approval, run_traffic
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
# Three cycles in a row show whether a second and third cycle on the new version's feedback keep
# what the first learned.
CYCLES = 3
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


async def drive(settings: Settings, ctx: Any, cycles: int) -> dict[str, Any]:
    """Approval of the base, then `cycles` times: traffic until the scheduler starts a cycle,
    the cycle (a steady client chatting through its gate and swap), approval of what serves now."""
    scenario = load_scenario()
    base_url = f"http://127.0.0.1:{settings.port}"
    headers = _headers(settings)
    key = headers.get("Authorization", "")[7:] or None
    report: dict[str, Any] = {
        "heldout_prompts": len(scenario.heldout),
        "samples_per_prompt": SAMPLES_PER_PROMPT,
        "cycles": [],
    }
    rounds = 0  # traffic rounds so far: each round's seed differs from every earlier one's
    async with make_client(base_url, key) as client:
        served = await _approval(client, scenario, "base", "approval of the base")
        report["base"] = served
        for number in range(1, cycles + 1):
            cycle, rounds = await _one_cycle(ctx, client, base_url, headers, scenario, rounds)
            cycle["number"] = number
            run = cycle["run"]
            if run is not None and run["status"] == "promoted":
                served = await _approval(
                    client, scenario, run["candidate"], f"approval after cycle {number}"
                )
            cycle["served"] = served
            report["cycles"].append(cycle)
            if run is None:
                break  # no cycle finished in time: the next would not either
    return report


async def _approval(client: Any, scenario: Any, version: str, label: str) -> dict[str, Any]:
    """The held-out approval of the version serving now, printed and as the report keeps it."""
    measured = await measure_approval(client, scenario, scenario.heldout, SAMPLES_PER_PROMPT, SEED)
    print(
        f"{label}: {measured.approval:.1%} of {measured.samples} held-out answers "
        f"(mean {measured.mean_words:.0f} words)",
        flush=True,
    )
    return {
        "version": version,
        "approval": measured.approval,
        "by_topic": measured.by_topic,
        "words": measured.mean_words,
        "samples": measured.samples,
        "failures": measured.failures,
    }


async def _one_cycle(
    ctx: Any,
    client: Any,
    base_url: str,
    headers: dict[str, str],
    scenario: Any,
    rounds: int,
) -> tuple[dict[str, Any], int]:
    """Traffic until the scheduler starts a cycle, then that cycle to its end; (what the report
    keeps of it, traffic rounds so far)."""
    from service.runs import recent_runs

    earlier = {r.id for r in recent_runs(ctx.store)}
    traffic = []
    started = time.time()
    for _ in range(MAX_ROUNDS):
        if any(r.status != "skipped" and r.id not in earlier for r in recent_runs(ctx.store)):
            break  # a cycle is queued or running: leave it the CPU
        stats = await run_traffic(
            client,
            scenario,
            TRAFFIC_ROUND,
            concurrency=8,
            seed=SEED + rounds,
            pairwise_share=PAIRWISE_SHARE,
            correction_share=CORRECTION_SHARE,
        )
        rounds += 1
        traffic.append(stats)
        print(
            f"traffic round {rounds}: {stats.completed} conversations, "
            f"{stats.approved}/{stats.answers} answers approved, votes {stats.votes}",
            flush=True,
        )
    # The steady client starts once training is done, so it does not take the training's CPU;
    # it still covers the gate (its canary loads weights into an engine) and the swap.
    shown: set[str] = set()
    await asyncio.to_thread(_wait_for_cycle, ctx, earlier, shown, "train")
    steady = SteadyClient(base_url, headers)
    steady_thread = threading.Thread(target=steady.run, daemon=True)
    steady_thread.start()
    run = await asyncio.to_thread(_wait_for_cycle, ctx, earlier, shown)
    if run is not None and run.status == "promoted":
        await asyncio.to_thread(steady.wait_for, run.candidate_version_id, SWAP_WAIT_S)
    steady.stop()
    steady_thread.join()
    return _summarise(ctx, run, traffic, steady, started), rounds


def _wait_for_cycle(ctx: Any, earlier: set[str], shown: set[str], stage: str | None = None):
    """The first cycle not in `earlier` once it finished (or, with `stage`, once that stage is
    done); prints each stage as it ends (those in `shown` were printed already)."""
    from service.runs import recent_runs

    deadline = time.time() + CYCLE_TIMEOUT_S
    while time.time() < deadline:
        for run in recent_runs(ctx.store):
            if run.status == "skipped" or run.id in earlier:
                continue
            for name, seconds in run.stages.items():
                if name not in shown:
                    shown.add(name)
                    print(f"cycle {run.id}: {name} done ({seconds:.0f} s)", flush=True)
            if run.finished_at is not None or (stage is not None and stage in run.stages):
                return run
        time.sleep(1)
    return None


def _summarise(ctx, run, traffic, steady, traffic_started) -> dict[str, Any]:
    out: dict[str, Any] = {
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
    out["feedback_to_served_s"] = round(run.finished_at.timestamp() - traffic_started, 1)
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


def _served(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, approval measurement) of the base and of each cycle's outcome."""
    return [("base", report["base"])] + [
        (f"cycle {c['number']}", c["served"]) for c in report["cycles"]
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((approval, words), (stages, curves)) = plt.subplots(2, 2, figsize=(12, 8))
    served = _served(report)
    labels = [label for label, _ in served]
    x = range(len(served))
    for topic in report["base"]["by_topic"]:
        values = [m["by_topic"].get(topic, 0.0) * 100 for _, m in served]
        approval.plot(x, values, marker=".", linewidth=0.8, alpha=0.6, label=topic)
    overall = [m["approval"] * 100 for _, m in served]
    approval.plot(x, overall, marker="o", color="black", linewidth=2.5, label="all held-out")
    approval.set(title="held-out approval of the version serving", ylabel="%", ylim=(0, 100))
    approval.set_xticks(list(x), labels)
    approval.legend(fontsize=7)
    words.bar(labels, [m["words"] for _, m in served], color="teal")
    words.set(title="mean answer length", ylabel="words")
    bottom = [0.0] * len(report["cycles"])
    names = [f"cycle {c['number']}" for c in report["cycles"]]
    for stage in dict.fromkeys(s for c in report["cycles"] for s in _stages(c)):
        seconds = [_stages(c).get(stage, 0.0) for c in report["cycles"]]
        stages.bar(names, seconds, bottom=bottom, label=stage)
        bottom = [b + s for b, s in zip(bottom, seconds, strict=True)]
    stages.set(title="cycle stages", ylabel="seconds")
    stages.legend(fontsize=7)
    ppo = any((c["run"] or {}).get("algorithm") == "rlhf" for c in report["cycles"])
    key = "score" if ppo else "rewards/accuracies"
    for cycle in report["cycles"]:
        points = [(i + 1, s[key]) for i, s in enumerate(_steps(cycle)) if key in s]
        if points:
            curves.plot(*zip(*points, strict=True), marker=".", label=f"cycle {cycle['number']}")
    curves.set(
        title="PPO: normalised reward per iteration" if ppo else "DPO: reward accuracy per step",
        xlabel="iteration" if ppo else "step",
    )
    curves.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _stages(cycle: dict[str, Any]) -> dict[str, float]:
    return (cycle["run"] or {}).get("stages_s") or {}


def _steps(cycle: dict[str, Any]) -> list[dict[str, float]]:
    return (cycle["run"] or {}).get("steps") or []


def print_report(report: dict[str, Any]) -> None:
    served = _served(report)
    base = report["base"]["approval"]
    answers = report["heldout_prompts"] * report["samples_per_prompt"]
    lines = [
        "",
        "prefloop demo report",
        "--------------------",
        f"held-out approval ({answers} answers to {report['heldout_prompts']} questions per "
        "measurement) of the version serving:",
    ]
    previous = base
    for label, m in served:
        change = (
            ""
            if label == "base"
            else f"{(m['approval'] - base) * 100:+.1f} on the base, "
            f"{(m['approval'] - previous) * 100:+.1f} on the cycle before; "
        )
        previous = m["approval"]
        lines.append(
            f"  {label:<8} {m['version'][:22]:<22} {m['approval']:6.1%}  "
            f"({change}mean {m['words']:.0f} words)"
        )
    lines.append("by topic (% approved):")
    for topic in report["base"]["by_topic"]:
        values = " -> ".join(f"{m['by_topic'].get(topic, 0.0) * 100:.0f}" for _, m in served)
        lines.append(f"  {topic:<24} {values}")
    for cycle in report["cycles"]:
        run = cycle["run"] or {}
        lines += [
            f"cycle {cycle['number']}: run {run.get('id')} {run.get('status')}"
            + (f" ({run.get('error')})" if run.get("error") else ""),
            *[f"  {line}" for line in _algorithm_lines(run)],
            f"  {cycle['conversations']} conversations; cycle {cycle.get('cycle_s')} s "
            f"(stages {run.get('stages_s')})",
            f"  first vote to new version serving {cycle.get('feedback_to_served_s')} s; swap "
            f"{cycle.get('swap_s')} s; requests failed during the swap: "
            f"{cycle.get('failed_during_swap')}",
        ]
    failed = sum(c["steady_failures"] + c["traffic_failures"] for c in report["cycles"])
    steady = sum(c["steady_requests"] for c in report["cycles"])
    lines.append(f"requests failed in the whole demo: {failed} ({steady} steady + the traffic's)")
    print("\n".join(lines), flush=True)


def _algorithm_lines(run: dict[str, Any]) -> list[str]:
    if run.get("algorithm") != "rlhf":
        heldout = run.get("heldout") or {}
        if heldout.get("accuracy") is None or not heldout.get("pairs"):
            return ["held-out preference accuracy: not measured (no held-out pairs)"]
        return [
            f"held-out preference accuracy: {heldout['accuracy']:.2f} on {heldout['pairs']} pairs "
            f"(mean reward margin {heldout.get('margin', 0.0):.2f})"
        ]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--cycles", type=int, default=CYCLES, help=f"training cycles in a row (default {CYCLES})"
    )
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error(f"--cycles {args.cycles}: at least 1")
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
        return run(settings, started, args.cycles)
    except Exception:
        logging.getLogger("prefloop.demo").exception("the demo failed")
        print(f"demo failed after {time.monotonic() - started:.0f} s; see {log}", flush=True)
        return 1


def run(settings: Settings, started: float, cycles: int) -> int:
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
        report = asyncio.run(drive(settings, ctx, cycles))
    finally:
        scheduler.stop()
        # Ray's driver prints its processes' complaints while Serve stops (the controller's
        # graceful shutdown cut short) to standard output: they belong in the log.
        with contextlib.redirect_stdout(sys.stderr):
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
