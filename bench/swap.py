"""Hot swap under load: prefloop's promotion against a Ray Serve rolling restart.

    python -m bench.swap [--replicas 2] [--clients 4] [--samples 100] [--max-swaps 8]

prefloop runs with `--replicas` policy replicas (vLLM on the embedded model) while `--clients`
users stream chat answers without pause. After a warm-up (every replica's first requests pay
first-call costs), a steady window collects `--samples` requests. Then two new versions (the base
weights, published and approved twice: what is timed is the swap, not what the weights say) are
promoted in turn through the admin API, one swap after another, until the swaps' windows together
hold `--samples` requests (at most `--max-swaps` swaps).

When is "every replica serving it"? A poller asks `/v1/models` every 50 ms; a replica answers
with the version its engine runs, which changes once the swap reloaded the weights, and the proxy
spreads the polls over the replicas at random. A swap is done at the first answer naming the new
version after which every answer named it, provided CONSECUTIVE answers in a row did (a replica
still on the old version would have shown among them). Ray's metrics export confirms it replica
by replica: each replica's `ray_prefloop_swaps_total{version=...}` (per WorkerId) must rise.

A swap's window runs from the promote call until the later of "done" and the first chat answer
from the new version, plus SETTLE_S: every request that overlaps it counts, including those that
waited on the reload or ran on the fresh weights. Latency is compared as p99 during the swaps
(their windows pooled) over p99 of the steady window; a p99 needs P99_MIN_SAMPLES requests in
each, and with fewer the comparison uses p95 (or the maximum) and names the counts, and the
target's verdict stays open.

The baseline is the naive way to change a model under Ray Serve: redeploy the application
(`serve.run` with new arguments) and let Serve replace the replicas one by one. Here the
redeployed replicas read a second store whose served version is the next one, while the old
replicas keep the store they follow, so no replica swaps in place. It runs once (a restart takes
tens of seconds), against the same steady window.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx

from bench.common import Result, embedded_model, free_port, percentile, scratch_dir
from bench.load import ChatLoad, Sample

SWAP_GOAL_S = 2.0
P99_GOAL = 1.5
POLL_S = 0.05
# Answers in a row that must name the new version before a swap counts as done: about 1 s of
# polls, so each of two replicas is asked about 10 times (a replica left out by chance: 1e-3).
CONSECUTIVE = 20
SETTLE_S = 1.0  # after the swap and the first answer from the new version, still in the window
GAP_S = 2.0  # between two swaps, so that the next one starts from steady load
WARMUP_S = 10.0
STEADY_MAX_S = 90.0  # the steady window ends here even short of --samples requests
SWAP_DEADLINE_S = 600.0  # a rolling restart of two replicas on two cores takes minutes
METRICS_WAIT_S = 10.0  # Ray's metrics reach the export within a report interval (1 s here)
# Fewest requests for each statistic: below P95_MIN_SAMPLES only the maximum is shown.
P99_MIN_SAMPLES = 100
P95_MIN_SAMPLES = 20


def publish_copy(registry: Any, version_id: str) -> None:
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


# --- what the poller and the users saw -----------------------------------------------------------


def swap_done(
    polls: list[tuple[float, str]], t0: float, new: str, consecutive: int = CONSECUTIVE
) -> float | None:
    """When every replica served `new`: the first poll after `t0` of the final run of answers
    naming it, once that run is `consecutive` answers long; None until then."""
    after = [(t, v) for t, v in polls if t >= t0]
    run: list[float] = []
    for t, version in reversed(after):
        if version != new:
            break
        run.append(t)
    return run[-1] if len(run) >= consecutive else None


def first_answer(samples: list[Sample], t0: float, new: str) -> float | None:
    """When the first chat answer from `new` ended, among requests that ended after `t0`."""
    return min((s.end for s in samples if s.ok and s.version == new and s.end >= t0), default=None)


def window_end(
    samples: list[Sample], polls: list[tuple[float, str]], t0: float, new: str, **kw: Any
) -> float | None:
    """The end of a swap's window: the later of "done" and the first answer from `new`, plus
    SETTLE_S; None while either is still to come."""
    done, first = swap_done(polls, t0, new, **kw), first_answer(samples, t0, new)
    return None if done is None or first is None else max(done, first) + SETTLE_S


def overlapping(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """The requests in flight at any moment of [start, end]."""
    return [s for s in samples if s.end >= start and s.start <= end]


def tail_latency(steady: list[float], during: list[float]) -> dict[str, Any]:
    """The highest statistic both windows have enough requests for (p99, p95, else the maximum)
    of each, their ratio, and the counts."""
    fewest = min(len(steady), len(during))
    stat, q = ("p99", 99) if fewest >= P99_MIN_SAMPLES else ("p95", 95)
    if fewest < P95_MIN_SAMPLES:
        stat, q = "max", 100
    low, high = percentile(steady, q), percentile(during, q)
    return {
        "stat": stat,
        "steady_s": low,
        "during_s": high,
        "ratio": high / low if low and not math.isnan(low) else math.nan,
        "steady_n": len(steady),
        "during_n": len(during),
    }


def failures(samples: list[Sample], start: float, end: float) -> int:
    """Requests that failed and ended within [start, end]."""
    return sum(1 for s in samples if not s.ok and start <= s.end <= end)


def confirmed_replicas(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], version: str
) -> int:
    """Replicas (Ray workers) whose swap counter for `version` rose between two readings of
    `ray_prefloop_swaps_total`, each keyed by (WorkerId, version)."""
    return sum(
        1
        for (worker, v), count in after.items()
        if v == version and count > before.get((worker, v), 0.0)
    )


def parse_swap_counters(text: str) -> dict[tuple[str, str], float]:
    """(WorkerId, version) -> swaps, from a Prometheus exposition of Ray's metrics export."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.labels.get("WorkerId", ""), sample.labels.get("version", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_prefloop_swaps_total"
    }


async def swap_counters() -> dict[tuple[str, str], float]:
    """Every alive node's export of Ray's metrics, reduced to the swap counters."""
    import ray

    nodes = [n for n in await asyncio.to_thread(ray.nodes) if n.get("Alive")]
    counters: dict[tuple[str, str], float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for node in nodes:
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            try:
                counters.update(parse_swap_counters((await client.get(url)).text))
            except httpx.HTTPError:
                continue
    return counters


# --- the measurement ---------------------------------------------------------------------------


async def poll_versions(url: str, polls: list[tuple[float, str]], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            try:
                r = await client.get("/v1/models")
                polls.append((time.time(), r.json()["data"][0]["version"]))
            except (httpx.HTTPError, KeyError, ValueError):
                polls.append((time.time(), ""))
            await asyncio.sleep(POLL_S)


async def until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def warm_up_and_steady(load: ChatLoad, samples: int) -> tuple[float, float]:
    """Load until every user's first requests are behind it (WARMUP_S and at least two requests
    per user), then a steady window until `samples` requests ended in it (at most
    STEADY_MAX_S); returns the window (start, end)."""
    started = time.time()
    await until(
        lambda: time.time() - started >= WARMUP_S and len(load.samples) >= 2 * load.clients,
        STEADY_MAX_S,
    )
    start = time.time()
    await until(lambda: sum(s.start >= start for s in load.samples) >= samples, STEADY_MAX_S)
    return start, time.time()


def steady_samples(load: ChatLoad, start: float, end: float) -> list[Sample]:
    """Requests sent and answered within the steady window."""
    return [s for s in load.samples if s.start >= start and s.end <= end]


async def one_swap(
    load: ChatLoad,
    polls: list[tuple[float, str]],
    change: Callable[[], Awaitable[None]],
    new: str,
    replicas: int | None,
) -> dict[str, Any]:
    """`change()` to `new`, then wait for its window to close and its requests to finish; with
    `replicas`, read Ray's swap counters before and after to confirm every replica swapped."""
    before = await swap_counters() if replicas else {}
    t0 = time.time()
    await change()
    call_s = time.time() - t0

    def closed() -> bool:
        end = window_end(load.samples, polls, t0, new)
        oldest = load.oldest_pending()
        return end is not None and time.time() > end and (oldest is None or oldest > end)

    finished = await until(closed, SWAP_DEADLINE_S)
    end = window_end(load.samples, polls, t0, new) if finished else time.time()
    done, first = swap_done(polls, t0, new), first_answer(load.samples, t0, new)
    confirmed = None
    if replicas:
        after: dict[tuple[str, str], float] = {}

        async def read() -> bool:
            after.update(await swap_counters())
            return confirmed_replicas(before, after, new) >= replicas

        deadline = time.time() + METRICS_WAIT_S
        while not await read() and time.time() < deadline:
            await asyncio.sleep(0.5)
        confirmed = confirmed_replicas(before, after, new)
    window = overlapping(load.samples, t0, end or time.time())
    return {
        "version": new,
        "t0": t0,
        "end": end,
        "call_s": call_s,
        "swap_s": None if done is None else done - t0,
        "first_answer_s": None if first is None else first - t0,
        "confirmed": confirmed,
        "window": window,
        "failed": sum(not s.ok for s in window),
    }


async def run(args: argparse.Namespace, result: Result) -> None:
    import ray

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
    # Ray's metrics reach the export every second (10 s by default): the per-replica check.
    ray.init(
        address="local",
        namespace=deployment.APP_NAME,
        include_dashboard=False,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    deployment.deploy(settings)
    result.note(f"{args.replicas} replicas up in {time.monotonic() - started:.0f} s")
    registry = Registry(Store(settings.resolved_database_url), data)
    load = ChatLoad(url, clients=args.clients, max_tokens=args.max_tokens)
    polls: list[tuple[float, str]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_versions(url, polls, stop))
    swaps: list[dict[str, Any]] = []
    try:
        for version in ("v-a", "v-b"):
            publish_copy(registry, version)
        load.start()
        steady_window = await warm_up_and_steady(load, args.samples)

        async def promote(version: str) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60) as admin:
                r = await admin.post(f"/v1/admin/versions/{version}/promote")
                r.raise_for_status()

        while len(swaps) < args.max_swaps:
            version = ("v-a", "v-b")[len(swaps) % 2]
            swaps.append(
                await one_swap(load, polls, partial(promote, version), version, args.replicas)
            )
            show_swap(len(swaps), swaps[-1])
            if sum(len(s["window"]) for s in swaps) >= args.samples:
                break
            await asyncio.sleep(GAP_S)

        # The baseline: a second store serving the next version, and a redeploy onto it.
        rolled = settings.model_copy(update={"database_url": f"sqlite:///{data / 'rolling.db'}"})

        def prepare_rolling() -> None:
            deployment.prepare_store(rolled)
            rolling_registry = Registry(Store(rolled.resolved_database_url), data)
            publish_copy(rolling_registry, "v-redeployed")
            rolling_registry.promote("v-redeployed", actor="bench")

        # In a thread: copying the weights must not stall the users' event loop.
        await asyncio.to_thread(prepare_rolling)

        async def redeploy() -> None:
            await asyncio.to_thread(deployment.run_applications, rolled)

        await asyncio.sleep(GAP_S)
        naive = await one_swap(load, polls, redeploy, "v-redeployed", None)
        show_swap(0, naive)
    finally:
        stop.set()
        await asyncio.gather(load.stop(), poller)
        deployment.shutdown()
        registry.store.close()
    report(result, args, steady_samples(load, *steady_window), swaps, naive, load.samples)


def show_swap(number: int, swap: dict[str, Any]) -> None:
    label = f"swap {number}" if number else "rolling restart"
    print(
        f"[swap] {label} to {swap['version']}: every replica after {_round(swap['swap_s'])} s, "
        f"first answer after {_round(swap['first_answer_s'])} s, {len(swap['window'])} requests "
        f"in the window, {swap['failed']} failed, replicas confirmed {swap['confirmed']}",
        flush=True,
    )


def report(
    result: Result,
    args: argparse.Namespace,
    steady: list[Sample],
    swaps: list[dict[str, Any]],
    naive: dict[str, Any],
    samples: list[Sample],
) -> None:
    """The tables and targets from the steady window's requests, each swap's figures, the
    rolling restart's, and every request the users sent."""
    steady_latencies = [s.latency for s in steady if s.ok]
    during = [s for swap in swaps for s in swap["window"]]
    ours = tail_latency(steady_latencies, [s.latency for s in during if s.ok])
    theirs = tail_latency(steady_latencies, [s.latency for s in naive["window"] if s.ok])
    result.table(
        f"{args.replicas} replicas, {args.clients} users streaming {args.max_tokens}-token "
        "answers without pause; each swap's window runs from the call to the later of every "
        f"replica on the new version and its first answer, plus {SETTLE_S:g} s",
        [
            "swap",
            "to every replica on it (s)",
            "first answer from it (s)",
            "call took (s)",
            "replicas that swapped (Ray metrics)",
            "requests in the window",
            "failed requests",
        ],
        [
            [
                f"prefloop promote {i} ({swap['version']})",
                _round(swap["swap_s"]),
                _round(swap["first_answer_s"]),
                _round(swap["call_s"]),
                f"{swap['confirmed']} of {args.replicas}",
                len(swap["window"]),
                swap["failed"],
            ]
            for i, swap in enumerate(swaps, 1)
        ]
        + [
            [
                "Ray Serve rolling restart",
                _round(naive["swap_s"]),
                _round(naive["first_answer_s"]),
                _round(naive["call_s"]),
                "- (new replicas)",
                len(naive["window"]),
                naive["failed"],
            ]
        ],
    )
    result.table(
        "latency: the steady window (after a warm-up) against the swaps' windows pooled",
        ["how", "statistic", "steady requests", "steady (ms)", "requests during", "during (ms)",
         "ratio"],
        [
            ["prefloop promote", ours["stat"], ours["steady_n"], _ms(ours["steady_s"]),
             ours["during_n"], _ms(ours["during_s"]), _round(ours["ratio"])],
            ["Ray Serve rolling restart", theirs["stat"], theirs["steady_n"],
             _ms(theirs["steady_s"]), theirs["during_n"], _ms(theirs["during_s"]),
             _round(theirs["ratio"])],
        ],
    )  # fmt: skip

    # A swap that never finished counts as infinitely slow, not as missing.
    times = [math.inf if s["swap_s"] is None else round(s["swap_s"], 3) for s in swaps]
    unconfirmed = [
        f"swap {i}: {swap['confirmed']} of {args.replicas}"
        for i, swap in enumerate(swaps, 1)
        if (swap["confirmed"] or 0) < args.replicas
    ]
    if unconfirmed:
        result.note("Ray's metrics did not show every replica swapping: " + "; ".join(unconfirmed))
    result.target(
        "promote -> every replica serving it",
        None,
        SWAP_GOAL_S,
        "<=",
        "s",
        detail=f"{len(swaps)} swaps with {args.replicas} replicas",
        rounds=times,
        # The polls' "every replica" is only as good as the replicas they reached: a met verdict
        # also needs each replica's own swap counter to have risen.
        caveat=(
            "Ray's metrics did not show every replica swapping: " + "; ".join(unconfirmed)
            if unconfirmed and all(t <= SWAP_GOAL_S for t in times)
            else ""
        ),
    )
    # Every request that ended from the first promote to the end of the last window, the gaps
    # between windows included.
    phase = (swaps[0]["t0"], swaps[-1]["end"] or math.inf) if swaps else None
    result.target(
        "failed requests from the first promote to the end of the last swap",
        None if phase is None else failures(samples, *phase),
        0,
        "<=",
        "requests",
        detail=f"{len(during)} requests in {len(swaps)} swap windows",
    )
    result.target(
        f"{ours['stat']} latency during the swaps / steady state",
        None if math.isnan(ours["ratio"]) else round(ours["ratio"], 3),
        P99_GOAL,
        "<=",
        detail=f"{ours['during_n']} requests during, {ours['steady_n']} steady",
        caveat=(
            ""
            if ours["stat"] == "p99"
            else f"{ours['stat']} of {ours['during_n']} requests during and {ours['steady_n']} "
            f"steady: a p99 needs {P99_MIN_SAMPLES} in each"
        ),
    )
    finished = [t for t in times if t != math.inf]
    if finished and naive["swap_s"]:
        result.note(
            f"the rolling restart took {naive['swap_s'] / max(finished):.1f}x as long as the "
            f"slowest promote ({naive['swap_s']:.1f} s vs {max(finished):.2f} s) with "
            f"{naive['failed']} failed requests in its window vs "
            f"{sum(s['failed'] for s in swaps)} in all the promotes' windows"
        )
    result.note(
        f"every replica on it: the first /v1/models answer naming the new version after which "
        f"{CONSECUTIVE} or more answers in a row named it (polls every {POLL_S * 1000:.0f} ms; "
        "the proxy spreads them over the replicas), confirmed per replica by Ray's metrics "
        "export (ray_prefloop_swaps_total by WorkerId); promotes alternate between two versions "
        f"until the windows hold {args.samples} requests, at most {args.max_swaps} swaps"
    )


def _round(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 2)


def _ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value * 1000, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # "Every replica" needs more than one: two, though on a 2-core box two vLLM CPU engines
    # share the cores (each pins its threads), so answers are slower than with one.
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--samples", type=int, default=P99_MIN_SAMPLES, help="requests per latency window"
    )
    parser.add_argument("--max-swaps", type=int, default=8, help="most promotions to pool")
    args = parser.parse_args()
    result = Result("swap", "Hot swap under load", command="python -m bench.swap")
    asyncio.run(run(args, result))
    result.write()


if __name__ == "__main__":
    main()
