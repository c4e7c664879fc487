"""Hot swap under load: prefloop's promotion against a Ray Serve rolling restart.

    python -m bench.swap [--replicas 1] [--clients 4] [--steady-s 12]

prefloop runs with `--replicas` policy replicas (vLLM on the embedded model) while `--clients`
users stream chat answers without pause. A new version (the base weights, published and approved
as another version: what is timed is the swap, not what the weights say) is promoted through the
admin API, and the users' answers tell when every replica serves it, how many requests failed,
and their p99 latency around the swap against the steady state before it.

The baseline is the naive way to change a model under Ray Serve: redeploy the application
(`serve.run` with new arguments) and let Serve replace the replicas one by one. Here the
redeployed replicas read a second store whose served version is the next one, while the old
replicas keep the store they follow, so no replica swaps in place.

When is "every replica serving it"? A poller asks `/v1/models` every 50 ms; a replica answers
with the version its engine runs, which changes once the swap reloaded the weights. The figure is
the first answer naming the new version after which no answer named another (with several
replicas the proxy spreads the polls over them, so a replica still on the old version would show).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from typing import Any

import httpx

from bench.common import Result, embedded_model, free_port, percentile, scratch_dir
from bench.load import ChatLoad, Sample

SWAP_GOAL_S = 2.0
P99_GOAL = 1.5
SETTLE_S = 8.0  # load kept after every poll names the new version, to see the aftermath
POLL_S = 0.05


def publish_copy(registry, version_id: str) -> None:
    """Register the base weights as an approved version `version_id`."""
    base = registry.served().version
    source = registry.data_dir / "incoming" / version_id
    shutil.copytree(registry.weights_path(base), source / "weights")
    registry.publish(
        version_id=version_id,
        parent=base,
        source=source,
        kind="full",
        algorithm="dpo",
        snapshot_id=None,
        config={},
        metrics={},
    )
    registry.judge(version_id, approved=True, reason=None, metrics={})


def swap_figures(
    load: ChatLoad, polls: list[tuple[float, str]], t0: float, new: str
) -> dict[str, Any]:
    """What the poller and the users saw from `t0` (promotion or redeploy) on."""
    after = [(t, v) for t, v in polls if t >= t0]
    done = None
    for t, version in reversed(after):
        if version != new:
            break
        done = t
    end = done if done is not None else t0
    window = [s for s in load.samples if s.end >= t0 and s.start <= end]
    return {
        "swap_s": None if done is None else done - t0,
        "failed": sum(not s.ok for s in load.samples if s.end >= t0),
        "requests_during": len(window),
        "p99_during_s": percentile([s.latency for s in window if s.ok], 99),
    }


async def poll_versions(url: str, polls: list[tuple[float, str]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                r = await client.get("/v1/models")
                polls.append((time.time(), r.json()["data"][0]["version"]))
            except (httpx.HTTPError, KeyError, ValueError):
                polls.append((time.time(), ""))
            await asyncio.sleep(POLL_S)


async def measure(load: ChatLoad, change, new: str, steady_s: float):
    """Steady state, then `change()` (awaited), then until every poll names the new version
    for SETTLE_S; returns (steady samples, figures, seconds `change` took)."""
    load.samples.clear()
    polls: list[tuple[float, str]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_versions(load.base_url, polls, stop))
    load.start()
    await asyncio.sleep(steady_s)
    t0 = time.time()
    steady = load.between(t0 - steady_s, t0)
    await change()
    call_s = time.time() - t0
    deadline = time.time() + 240
    while time.time() < deadline:
        figures = swap_figures(load, polls, t0, new)
        if figures["swap_s"] is not None and time.time() - (t0 + figures["swap_s"]) > SETTLE_S:
            break
        await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(load.stop(), poller)
    return steady, swap_figures(load, polls, t0, new), call_s


def steady_p99(samples: list[Sample]) -> float:
    return percentile([s.latency for s in samples if s.ok], 99)


async def run(args: argparse.Namespace, result: Result) -> None:
    from ray import serve

    from service import deployment
    from service.registry import Registry
    from service.settings import load_settings
    from service.store import Store

    data = scratch_dir("swap")
    port = free_port()
    settings = load_settings(
        data_dir=data,
        model_path=embedded_model(),
        port=port,
        replicas=args.replicas,
        database_url=f"sqlite:///{data / 'promote.db'}",
    )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    deployment.deploy(settings)
    result.note(f"{args.replicas} replicas up in {time.monotonic() - started:.0f} s")
    registry = Registry(Store(settings.resolved_database_url), data)
    try:
        publish_copy(registry, "v-promoted")
        load = ChatLoad(url, clients=args.clients, max_tokens=args.max_tokens)

        async def promote() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as admin:
                r = await admin.post("/v1/admin/versions/v-promoted/promote")
                r.raise_for_status()

        steady, ours, call_s = await measure(load, promote, "v-promoted", args.steady_s)
        ours["call_s"] = call_s
        ours["steady_p99_s"] = steady_p99(steady)
        ours["steady_requests"] = len(steady)

        # The baseline: a second store serving the next version, and a redeploy onto it.
        rolled = settings.model_copy(update={"database_url": f"sqlite:///{data / 'rolling.db'}"})
        deployment.prepare_store(rolled)
        rolling_registry = Registry(Store(rolled.resolved_database_url), data)
        publish_copy(rolling_registry, "v-redeployed")
        rolling_registry.promote("v-redeployed", actor="bench")

        async def redeploy() -> None:
            await asyncio.to_thread(
                serve.run,
                deployment.application(rolled),
                name=deployment.APP_NAME,
                route_prefix="/",
                blocking=False,
            )

        steady, naive, call_s = await measure(load, redeploy, "v-redeployed", args.steady_s)
        naive["call_s"] = call_s
        naive["steady_p99_s"] = steady_p99(steady)
        naive["steady_requests"] = len(steady)
    finally:
        deployment.shutdown()
        registry.store.close()
    report(result, args, ours, naive)


def report(result: Result, args: argparse.Namespace, ours: dict, naive: dict) -> None:
    def row(name: str, f: dict) -> list:
        return [
            name,
            _round(f["swap_s"]),
            _round(f["call_s"]),
            f["failed"],
            f["requests_during"],
            _ms(f["steady_p99_s"]),
            _ms(f["p99_during_s"]),
            _round(f["p99_during_s"] / f["steady_p99_s"]),
        ]

    result.table(
        f"{args.replicas} replicas, {args.clients} users streaming {args.max_tokens}-token "
        "answers without pause",
        [
            "how",
            "to every replica on it (s)",
            "call took (s)",
            "failed requests",
            "requests during",
            "steady p99 (ms)",
            "p99 during (ms)",
            "p99 ratio",
        ],
        [row("prefloop promote", ours), row("Ray Serve rolling restart", naive)],
    )
    result.target("promote -> every replica serving it", ours["swap_s"], SWAP_GOAL_S, "<=", "s")
    result.target("failed requests during the swap", ours["failed"], 0, "<=", "requests")
    result.target(
        "p99 latency during the swap / steady state",
        ours["p99_during_s"] / ours["steady_p99_s"],
        P99_GOAL,
        "<=",
    )
    if ours["swap_s"] and naive["swap_s"]:
        result.note(
            f"the rolling restart took {naive['swap_s'] / ours['swap_s']:.1f}x as long "
            f"({naive['swap_s']:.1f} s vs {ours['swap_s']:.2f} s) with "
            f"{naive['failed']} failed requests vs {ours['failed']}"
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ms(value: float) -> float:
    return round(value * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # One engine per 2-core box: a vLLM CPU engine keeps one core busy for its scheduler and
    # pins its threads to the others, so a second engine on the same cores halts both (two
    # replicas here: 6-9 s per 8-token answer). Use more replicas where each has its cores.
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=12.0)
    args = parser.parse_args()
    result = Result("swap", "Hot swap under load", command="python -m bench.swap")
    asyncio.run(run(args, result))
    result.write()


if __name__ == "__main__":
    main()
