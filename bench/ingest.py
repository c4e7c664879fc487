"""Feedback ingest through the full HTTP stack: Ray Serve's proxy -> the policy replica -> FastAPI
-> the group-commit writer -> the store, against the same Ray Serve stack without storage.

Three variants run one after the other in one Ray/Serve session, each at route prefix `/`:

- `sqlite`: prefloop's real application (`service.deployment.application`, vLLM engine included)
  on its default store (SQLite, WAL, synchronous=FULL);
- `bare`: a Ray Serve FastAPI deployment with the same routes that authenticates and validates
  events exactly as prefloop does (`Authenticator`, `parse_event`, `FeedbackBatchRequest`) and
  answers the same ack without storing: DESIGN.md's baseline;
- `postgres`: prefloop's real application on PostgreSQL (a database of its own, dropped after).

Each variant takes closed-loop load from one asyncio/aiohttp generator (keep-alive connections,
the same for every variant) at rising concurrency, on `POST /v1/feedback` (one event per request)
and `POST /v1/feedback/batch` (`--batch-size` events per request). Events reference real
generations: a few `n=2` chat requests through the API seed each store. After the load, a fresh
`Store` counts the feedback rows, which must equal the events acknowledged with 201.

    flock /tmp/prefloop-bench.lock .venv/bin/python -m bench.ingest
    flock /tmp/prefloop-bench.lock .venv/bin/python -m bench.ingest --profile  # + py-spy summary

Needs the embedded model (`make setup`) and PostgreSQL on 127.0.0.1:5432 (`--variants
sqlite,bare` skips it). The default run takes about 5 minutes.
"""

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from bench.common import Result, embedded_model, free_port, percentile, scratch_dir, wait_http

API_KEY = "sk-bench-ingest-0123456789abcdef"
APP_PREFIX = "bench-ingest"
# Four conversations, each asked twice with n=2: thumbs go to any choice, pairwise votes compare
# the two choices of one response or two responses to the same conversation.
SEED_PROMPTS = [
    "Name one colour of the sky.",
    "Say hello in French.",
    "What is two plus two?",
    "Give one word for a happy dog.",
]
SEED_REPEATS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the baseline: same routes, auth and validation, nothing stored --------------------------


def bare_app(keys: list[Any]) -> Any:
    """prefloop's feedback routes with the storage cut out: the principal and scope
    dependencies, `parse_event`, the Idempotency-Key check and the error handlers are prefloop's
    own; the ack gets a fresh id instead of a row."""
    from fastapi import Body, Depends, FastAPI, Header, Response

    from service.auth import Authenticator, Principal
    from service.errors import Unprocessable, install_error_handlers
    from service.feedback import parse_event, with_header_key
    from service.protocol import (
        BatchItemResult,
        FeedbackAck,
        FeedbackBatchRequest,
        FeedbackBatchResponse,
    )

    authenticator = Authenticator(keys)
    app = FastAPI(title="bare feedback")
    install_error_handlers(app)

    def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        return authenticator(authorization)

    def voter(caller: Annotated[Principal, Depends(principal)]) -> Principal:
        return caller.require("feedback")

    Voter = Annotated[Principal, Depends(voter)]

    def ack() -> FeedbackAck:
        return FeedbackAck(id=f"fb-{uuid.uuid4().hex}", created=int(time.time()))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/feedback", status_code=201)
    async def post_feedback(
        raw: Annotated[dict, Body()],
        who: Voter,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> FeedbackAck:
        with_header_key(parse_event(raw), idempotency_key)
        return ack()

    @app.post("/v1/feedback/batch")
    async def post_feedback_batch(batch: FeedbackBatchRequest, who: Voter) -> FeedbackBatchResponse:
        results = []
        for i, item in enumerate(batch.events):
            try:
                parse_event(item, prefix=f"events.{i}.")
            except Unprocessable as bad:
                results.append(
                    BatchItemResult(index=i, status=bad.status, error=bad.body()["error"])
                )
                continue
            results.append(BatchItemResult(index=i, status=201, feedback=ack()))
        return FeedbackBatchResponse(data=results)

    return app


def bare_application(keys: list[Any], max_ongoing_requests: int) -> Any:
    """The baseline as a Serve application, deployed with the policy replica's options."""
    from ray import serve

    @serve.ingress()
    class BareFeedback:
        def __init__(self, keys: list[Any]):
            self._app = bare_app(keys)

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

    deployment = serve.deployment(
        name="feedback",
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    )(BareFeedback)
    return deployment.bind(keys)


# --- processes and CPU --------------------------------------------------------------------------


def _cmdline(pid: int | str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def find_pid(title_prefix: str) -> int | None:
    """Our process (below this one) whose title (Ray sets `ray::<actor>`) starts with
    `title_prefix`."""
    procs = snapshot()
    for pid in procs:
        if _cmdline(pid).startswith(title_prefix) and _ancestor(pid, procs) == os.getpid():
            return pid
    return None


def snapshot() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds so far), for every process."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry.name)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK
    return stats


def _ancestor(pid: int, procs: dict[int, tuple[int, float]]) -> int:
    """This process (if `pid` is below it), kthreadd (2: a kernel thread), or 0/1."""
    while pid > 2 and pid != os.getpid():
        pid = procs.get(pid, (0, 0.0))[0]
    return pid


def split_cpu(before: dict, after: dict) -> tuple[float, float, tuple[float, int]]:
    """CPU seconds between two snapshots: (this script and everything below it: Ray, replicas,
    engines; PostgreSQL's server processes and kernel threads, which do storage work for us;
    the busiest other process as (seconds, pid))."""
    root, ours, services, busiest = os.getpid(), 0.0, 0.0, (0.0, 0)
    for pid, (_, cpu) in after.items():
        delta = cpu - before.get(pid, (0, 0.0))[1]
        if delta <= 0:
            continue
        ancestor = _ancestor(pid, after)
        if ancestor == root:
            ours += delta
        elif ancestor == 2 or _cmdline(pid).startswith("postgres"):  # 2: kthreadd
            services += delta
        else:
            busiest = max(busiest, (delta, pid))
    return ours, services, busiest


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])
    return total - values[3] - values[4], total


# --- the load generator ------------------------------------------------------------------------


@dataclass
class Run:
    variant: str
    endpoint: str  # "single" | "batch"
    concurrency: int
    duration_s: float  # how long new requests are sent
    elapsed_s: float = 0.0  # first request sent to last answer read
    requests: int = 0  # answered
    events: int = 0  # acknowledged with 201
    errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # cores in use, per process
    busiest_outside: str = ""  # the other process that took the most CPU meanwhile

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    def latency_ms(self, q: float) -> float:
        return round(percentile(self.latencies, q) * 1000, 1)

    @property
    def replica_ms_per_event(self) -> float | None:
        """The replica's CPU per acknowledged event: storing's cost is prefloop's minus bare's."""
        if not self.events or "replica" not in self.cpu:
            return None
        return round(self.cpu["replica"] * 1000 / self.events_per_s, 2)


async def closed_loop(
    run: Run,
    url: str,
    make_body: Callable[[], bytes] | None,
    count_acks: Callable[[int, bytes], int],
    pids: dict[str, int | None],
) -> Run:
    """`run.concurrency` keep-alive connections, each sending its next request as soon as the
    previous answer is read, for `run.duration_s`; then the requests in flight finish. Rates are
    taken from the first request sent to the last answer read, so every request counts whole
    (a batch request takes seconds under load: a fixed window would cut them). No body: GET."""
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=run.concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as s:
        start = last = time.perf_counter()
        t_end = start + run.duration_s

        async def worker() -> None:
            nonlocal last
            while (sent := time.perf_counter()) < t_end:
                try:
                    request = s.post(url, data=make_body()) if make_body else s.get(url)
                    async with request as resp:
                        status, payload = resp.status, await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    run.errors[type(exc).__name__] += 1
                    continue
                last = time.perf_counter()
                run.latencies.append(last - sent)
                run.requests += 1
                run.events += count_acks(status, payload)
                if status not in (200, 201):
                    run.errors[f"HTTP {status}: {payload[:120].decode(errors='replace')}"] += 1

        async def sample_cpu() -> None:
            # Cores in use while requests are sent: the client's event-loop thread (all of its
            # work), Ray's HTTP proxy, the replica, PostgreSQL and kernel threads, the whole
            # machine, and what is left: other people's work on a shared box.
            client0, before, busy0 = time.thread_time(), snapshot(), machine_busy()
            await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
            client1, after, busy1 = time.thread_time(), snapshot(), machine_busy()
            ours, services, (top_s, top_pid) = split_cpu(before, after)
            cores = os.cpu_count() or 1
            machine = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * cores
            run.cpu["client"] = (client1 - client0) / run.duration_s
            for name, pid in pids.items():
                if pid in after:
                    run.cpu[name] = (after[pid][1] - before.get(pid, (0, 0.0))[1]) / run.duration_s
            run.cpu["db+kernel"] = services / run.duration_s
            run.cpu["machine"] = machine
            run.cpu["outside"] = max(0.0, machine - (ours + services) / run.duration_s)
            run.busiest_outside = (
                f"{_cmdline(top_pid)[:60]} ({top_s / run.duration_s:.2f})"
                if top_s / run.duration_s >= 0.05
                else "processes that came and went"
            )

        await asyncio.gather(sample_cpu(), *(worker() for _ in range(run.concurrency)))
    run.elapsed_s = last - start
    return run


def single_ack(status: int, _: bytes) -> int:
    return 1 if status == 201 else 0


def batch_acks(status: int, payload: bytes) -> int:
    if status != 200:
        return 0
    return sum(1 for item in json.loads(payload)["data"] if item["status"] == 201)


class Events:
    """Valid events on the seeded generations: 3 thumbs to 1 pairwise, each with a unique
    idempotency key (clients send one to make retries safe, and it costs the store a lookup)."""

    def __init__(self, generations: list[tuple[str, int]], tag: str):
        self._gens = generations  # (response id, conversation number)
        by_conv: dict[int, list[str]] = {}
        for gen_id, conv in generations:
            by_conv.setdefault(conv, []).append(gen_id)
        self._pairs = [ids for ids in by_conv.values() if len(ids) > 1]
        self._tag = tag
        self._counter = itertools.count()

    def event(self) -> str:
        i = next(self._counter)
        key = f"{self._tag}-{i}"
        if i % 4 == 3:
            ids = self._pairs[i % len(self._pairs)]
            # Alternate: the two choices of one response, then two responses to one conversation.
            a, b = ((ids[0], 0), (ids[0], 1)) if i % 8 == 3 else ((ids[0], 0), (ids[1], 1))
            return (
                f'{{"type":"pairwise","winner":"{"ab"[i % 2]}",'
                f'"a":{{"response_id":"{a[0]}","choice_index":{a[1]}}},'
                f'"b":{{"response_id":"{b[0]}","choice_index":{b[1]}}},'
                f'"user_id":"u-{i % 97}","idempotency_key":"{key}"}}'
            )
        gen_id = self._gens[i % len(self._gens)][0]
        rating = "up" if i % 3 else "down"
        return (
            f'{{"type":"thumbs","response_id":"{gen_id}","choice_index":{i % 2},'
            f'"rating":"{rating}","user_id":"u-{i % 97}","idempotency_key":"{key}"}}'
        )

    def single(self) -> bytes:
        return self.event().encode()

    def batch(self, size: int) -> Callable[[], bytes]:
        def body() -> bytes:
            return ('{"events":[' + ",".join(self.event() for _ in range(size)) + "]}").encode()

        return body


async def seed(base_url: str) -> list[tuple[str, int]]:
    """Real chat completions with n=2 through the API, concurrently (the engine batches them);
    returns (response id, conversation number) for each."""
    import aiohttp

    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=headers) as s:

        async def chat(conv: int) -> tuple[str, int]:
            body = {
                "messages": [{"role": "user", "content": SEED_PROMPTS[conv]}],
                "n": 2,
                "max_tokens": 8,
            }
            async with s.post(f"{base_url}/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                return (await resp.json())["id"], conv

        jobs = [chat(c) for c in range(len(SEED_PROMPTS)) for _ in range(SEED_REPEATS)]
        return list(await asyncio.gather(*jobs))


# --- profiling ---------------------------------------------------------------------------------


def py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    """py-spy sampling every thread of `pid` into collapsed stacks at `out`; non-blocking, so the
    process is not paused at each sample."""
    binary = Path(sys.executable).parent / "py-spy"  # installed in the same environment
    options = ["--rate", "200", "--format", "raw", "--nonblocking", "--threads"]
    cmd = [str(binary), "record", "--pid", str(pid), "--duration", str(int(seconds)), *options]
    return subprocess.Popen(
        [*cmd, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


# Where a replica's time goes: a stack counts toward every marker it contains (inclusive).
MARKERS = {
    "store transaction (Store.write_batch, in the writer's thread)": "Store.write_batch (",
    "  reads shared by the transaction's events (FeedbackWrite.prefetch)": "prefetch (",
    "  feedback INSERT (Session.flush)": "Session.flush (",
    "  COMMIT": "_commit_impl (",
    "event validation (parse_event)": "parse_event (",
    "FastAPI app (routing, dependencies, body, response)": "FastAPI.__call__ (",
    "  sync dependencies (auth) through the thread pool": "run_in_threadpool (",
    "Ray Serve's request handling around the app": "handle_request_with_rejection (",
    "  the replica's disconnect watch (an actor call to the proxy)": "fetch_until_disconnect (",
    "Ray metrics": "Metric._record (",
    "version follower (Registry.served)": "Registry.served (",
}


def summarize(raw: Path, label: str, top: int = 6) -> str:
    """py-spy's collapsed stacks -> share of busy samples per thread, per marker, per package of
    the innermost frame, and the busiest innermost frames."""
    stacks: list[tuple[str, int]] = []
    for line in raw.read_text().splitlines() if raw.exists() else []:
        stack, _, samples = line.rpartition(" ")
        if samples.isdigit():
            stacks.append((stack, int(samples)))
    total = sum(n for _, n in stacks)
    if not total:
        return f"{label}: no samples (could py-spy attach?)"
    threads: Counter = Counter()
    packages: Counter = Counter()
    leaves: Counter = Counter()
    for stack, n in stacks:
        head, _, frames = stack.partition(";")
        # "thread (123): Thread-1 (_run_user_code_event_loop)" -> "Thread-N (_run_user_code_...)"
        name = head.partition("): ")[2] or "unnamed (native)"
        threads["".join("N" if c.isdigit() else c for c in name)] += n
        leaf = frames.rsplit(";", 1)[-1] if frames else "no Python frame (native code)"
        leaves[leaf] += n
        packages[leaf.rpartition("(")[2].split("/")[0].removesuffix(")").split(".py")[0]] += n

    def shares(counter: Counter) -> str:
        return ", ".join(f"{k} {n / total:.0%}" for k, n in counter.most_common(top))

    lines = [f"{label}: {total} samples of busy threads", f"  by thread: {shares(threads)}"]
    for what, marker in MARKERS.items():
        share = sum(n for s, n in stacks if marker in s) / total
        if share >= 0.01:
            lines.append(f"  {what}: {share:.0%}")
    lines.append(f"  innermost frame by package: {shares(packages)}")
    lines.append(f"  busiest innermost frames: {shares(leaves)}")
    return "\n".join(lines)


# --- the variants --------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    database_url: str | None  # None: nothing stored
    runs: list[Run] = field(default_factory=list)
    stored: int | None = None  # feedback rows counted after the load
    profile: str | None = None
    probe: Run | None = None  # GET /healthz on the bare app: the stack without a request body
    # Acknowledged in runs that are not figures (profiled or repeated ones): stored all the same.
    extra_acks: int = 0

    @property
    def acked(self) -> int:
        return sum(r.events for r in self.runs) + self.extra_acks

    def find(self, endpoint: str, concurrency: int) -> Run | None:
        return next(
            (r for r in self.runs if (r.endpoint, r.concurrency) == (endpoint, concurrency)), None
        )


def settings_for(variant: Variant, scratch: Path, model: Path) -> Any:
    from service.settings import ApiKey, EngineSettings, Settings

    return Settings(
        data_dir=scratch / variant.name,
        database_url=variant.database_url,
        model_path=model,
        api_keys=[ApiKey.model_validate({"key": API_KEY, "name": "bench"})],
        ray_address="local",
        engine=EngineSettings(kv_cache_space_gib=1),
    )


# Cores taken by processes that are not this benchmark's above which a run is repeated once,
# at most MAX_REPEATS times in all (the time budget).
DISTURBED = 0.25
MAX_REPEATS = 4


def show(run: Run, remark: str = "") -> None:
    batch = run.endpoint == "batch"
    rate = f"{run.events_per_s:6.0f} events/s" if batch else f"{run.requests_per_s:6.0f} req/s"
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    errors = f"  errors {dict(run.errors)}" if run.errors else ""
    print(
        f"[ingest] {run.variant:8} {run.endpoint:6} c={run.concurrency:<3} "
        f"{rate}  p50 {run.latency_ms(50)} ms  p99 {run.latency_ms(99)} "
        f"ms  cores: {cpu}{errors}{'  ' + remark if remark else ''}",
        flush=True,
    )


def measure(variant: Variant, base_url: str, events: Events, args: argparse.Namespace) -> None:
    app = f"{APP_PREFIX}-{variant.name}"
    pids = {"proxy": find_pid("ray::ProxyActor"), "replica": find_pid(f"ray::ServeReplica:{app}:")}
    plans: list[tuple[str, str, Callable[[], bytes], Callable[[int, bytes], int], float]] = [
        ("single", f"{base_url}/v1/feedback", events.single, single_ack, args.duration),
        (
            "batch",
            f"{base_url}/v1/feedback/batch",
            events.batch(args.batch_size),
            batch_acks,
            args.batch_duration,
        ),
    ]

    def load(endpoint: str, concurrency: int, duration: float) -> Run:
        _, url, body, acks, _ = next(plan for plan in plans if plan[0] == endpoint)
        run = Run(variant.name, endpoint, concurrency, duration)
        return asyncio.run(closed_loop(run, url, body, acks, pids))

    # Warm-up (connections, first-call costs): not figures, but its events are stored.
    variant.extra_acks += load("single", 8, args.warmup).events + load("batch", 1, 0.1).events
    for endpoint, _, _, _, duration in plans:
        for conc in args.concurrency if endpoint == "single" else args.batch_concurrency:
            run = load(endpoint, conc, duration)
            if run.cpu.get("outside", 0.0) > DISTURBED and args.repeats_left > 0:
                args.repeats_left -= 1
                # Other work on the shared box took CPU this run needed: run it once more and
                # keep the less disturbed of the two (both runs' events count as acknowledged).
                show(run, f"disturbed by {run.busiest_outside}: repeated")
                worse, run = sorted(
                    (run, load(endpoint, conc, duration)), key=lambda r: -r.cpu.get("outside", 0)
                )
                variant.extra_acks += worse.events
            variant.runs.append(run)
            show(run)
    if variant.database_url is None:
        variant.probe = Run(variant.name, "GET /healthz", 8, args.batch_duration)
        asyncio.run(closed_loop(variant.probe, f"{base_url}/healthz", None, single_ack, pids))
        show(variant.probe)
    if args.profile:
        variant.profile = profile_single(variant, base_url, events, args, pids)


def profile_single(
    variant: Variant, base_url: str, events: Events, args: argparse.Namespace, pids: dict
) -> str:
    """One more single-event run at 8 connections with py-spy on the replica and the proxy."""
    out = args.scratch / f"profile-{variant.name}"
    out.mkdir()
    spies = {
        name: (py_spy(pid, args.duration, out / f"{name}.txt"), out / f"{name}.txt")
        for name, pid in pids.items()
        if pid is not None
    }
    time.sleep(1.0)  # py-spy attaches
    run = Run(variant.name, "single", 8, args.duration)
    asyncio.run(closed_loop(run, f"{base_url}/v1/feedback", events.single, single_ack, pids))
    variant.extra_acks += run.events
    parts = [
        f"{variant.name}, one event per request, 8 connections, under py-spy (200 Hz): "
        f"{run.requests_per_s:.0f} req/s, CPU (cores) "
        + ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    ]
    for name, (proc, path) in spies.items():
        try:
            proc.wait(timeout=args.duration + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        parts.append(summarize(path, f"{name} process"))
    text = "\n".join(parts)
    print(text, flush=True)
    return text


def create_pg_database(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"prefloop_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    host = admin_url.split("://", 1)[1].rsplit("/", 1)[0]
    return name, f"postgresql+psycopg://{host}/{name}"


def drop_pg_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_variant(variant: Variant, scratch: Path, model: Path, port: int, args, ids) -> list:
    """Deploy one variant at `/`, seed it (prefloop) or reuse `ids` (bare), load it, count the
    stored rows, and delete the app; returns the generation ids it used."""
    from ray import serve

    from service import deployment
    from service.store import Feedback, Store

    base_url = f"http://127.0.0.1:{port}"
    app = f"{APP_PREFIX}-{variant.name}"
    settings = settings_for(variant, scratch, model)
    started = time.monotonic()
    if variant.database_url is None:
        serve.run(
            bare_application(settings.all_api_keys, settings.max_ongoing_requests),
            name=app,
            route_prefix="/",
        )
        wait_http(f"{base_url}/healthz", 120)
    else:
        deployment.prepare_store(settings)
        serve.run(deployment.application(settings), name=app, route_prefix="/")
        wait_http(f"{base_url}/readyz", 300)
    print(f"[ingest] {variant.name}: deployed in {time.monotonic() - started:.0f} s", flush=True)
    try:
        if variant.database_url is not None:
            ids = asyncio.run(seed(base_url))
        elif not ids:  # same shape as real ids: validation costs the same
            ids = [(f"chatcmpl-{uuid.uuid4().hex}", c % len(SEED_PROMPTS)) for c in range(8)]
        measure(variant, base_url, Events(ids, f"{variant.name}-{uuid.uuid4().hex[:6]}"), args)
    finally:
        serve.delete(app)
    if variant.database_url is not None:
        store = Store(variant.database_url)  # a fresh connection, after the replica is gone
        try:
            variant.stored = store.count(Feedback)
        finally:
            store.close()
    return ids


# --- the report --------------------------------------------------------------------------------


CPU_COLUMNS = ("client", "proxy", "replica", "db+kernel", "machine", "outside")


def report(result: Result, variants: list[Variant], args: argparse.Namespace) -> None:
    bare = next((v for v in variants if v.database_url is None), None)
    stored = [v for v in variants if v.database_url is not None]
    for endpoint, caption in (
        ("single", "one event per request (POST /v1/feedback)"),
        ("batch", f"batch endpoint (POST /v1/feedback/batch, {args.batch_size} events a request)"),
    ):
        rows = [
            [v.name, r.concurrency, round(r.events_per_s), round(r.requests_per_s, 1)]
            + [r.latency_ms(50), r.latency_ms(99), None if v is bare else _ratio(bare, r)]
            + [sum(r.errors.values()), r.replica_ms_per_event]
            + [round(r.cpu.get(k, 0.0), 2) for k in CPU_COLUMNS]
            for v in variants
            for r in v.runs
            if r.endpoint == endpoint
        ]
        columns = ["variant", "connections", "events/s", "requests/s", "p50 ms", "p99 ms"]
        columns += ["vs bare", "errors", "replica CPU ms/event"]
        columns += [f"{k} CPU" for k in CPU_COLUMNS]
        result.table(f"{caption}, closed loop", columns, rows)
    result.table(
        "durability: events acknowledged with 201 vs feedback rows a fresh Store counts after",
        ["variant", "acknowledged", "rows", "difference"],
        [
            [v.name, v.acked, v.stored, None if v.stored is None else v.stored - v.acked]
            for v in stored
        ],
    )

    for v in stored:
        for conc in (8, 32):
            run, base = v.find("single", conc), bare.find("single", conc) if bare else None
            if run is not None and base is not None:
                result.target(
                    f"{v.name}: single events/s vs no storage, {conc} connections",
                    _ratio(bare, run),
                    0.90,
                    detail=f"{run.events_per_s:.0f} vs {base.events_per_s:.0f} req/s; p99 "
                    f"{run.latency_ms(99)} vs {base.latency_ms(99)} ms",
                )
        batches = [r for r in v.runs if r.endpoint == "batch"]
        if batches:
            best = max(batches, key=lambda r: r.events_per_s)
            result.target(
                f"{v.name}: batch endpoint events/s (best of {len(batches)} concurrencies)",
                round(best.events_per_s),
                5000,
                unit="events/s",
                detail=f"at {best.concurrency} connections, p99 {best.latency_ms(99)} ms",
            )
        result.target(
            f"{v.name}: acknowledged events missing from (or extra in) the store",
            None if v.stored is None else abs(v.stored - v.acked),
            0,
            direction="<=",
            unit="events",
            detail=f"{v.acked} acknowledged with 201, {v.stored} rows",
        )

    for v in stored:
        pairs = [(r, bare.find(r.endpoint, r.concurrency) if bare else None) for r in v.runs]
        costs = [
            f"{r.endpoint} c={r.concurrency} {r.replica_ms_per_event - b.replica_ms_per_event:.2f}"
            for r, b in pairs
            if b and r.replica_ms_per_event is not None and b.replica_ms_per_event is not None
        ]
        if costs:
            result.note(
                f"{v.name}: storing costs the replica this much CPU per event (ms, prefloop's "
                "replica CPU per event minus the bare one's, same endpoint and connections): "
                + ", ".join(costs)
            )
    singles = [r for r in (bare.runs if bare else []) if r.endpoint == "single"]
    top = max(singles, key=lambda r: r.events_per_s, default=None)
    if top is not None and top.cpu.get("client"):
        result.note(
            f"Client: at the bare endpoint's best single-event rate ({top.requests_per_s:.0f} "
            f"req/s, {top.concurrency} connections) the load generator's event-loop thread used "
            f"{top.cpu['client']:.0%} of one core, i.e. about "
            f"{top.requests_per_s / top.cpu['client']:,.0f} req/s per core: it is not the "
            "ceiling, though on 2 cores it shares the machine with the proxy and the replica."
        )
    if bare is not None and bare.probe is not None:
        probe = bare.probe
        top_rate = f"{top.requests_per_s:.0f} req/s" if top else "-"
        result.note(
            f"Without a request body (GET /healthz on the bare app, 8 connections) the same "
            f"stack and client answered {probe.requests_per_s:.0f} req/s (p50 "
            f"{probe.latency_ms(50)} ms, p99 {probe.latency_ms(99)} ms; client "
            f"{probe.cpu.get('client', 0):.2f}, proxy {probe.cpu.get('proxy', 0):.2f}, replica "
            f"{probe.cpu.get('replica', 0):.2f} cores), against {top_rate} for single feedback "
            "events."
        )
    result.note(
        "CPU columns, in cores while requests are sent: the client's event-loop thread, Ray "
        "Serve's HTTP proxy (ray::ProxyActor), the replica process, PostgreSQL's server "
        f"processes and kernel threads (storage work), the whole machine (of {os.cpu_count()}), "
        "and outside = the rest of the machine's use that is not this benchmark's (other work "
        f"on the box; a run with more than {DISTURBED} outside is repeated once, up to "
        f"{MAX_REPEATS} runs, and the less disturbed kept)."
    )
    disturbed = [
        f"{r.variant} {r.endpoint} c={r.concurrency} ({r.cpu['outside']:.2f}: {r.busiest_outside})"
        for v in variants
        for r in v.runs
        if r.cpu.get("outside", 0.0) > DISTURBED
    ]
    if disturbed:
        result.note(
            "Disturbed by other work (outside cores: busiest other process): "
            + "; ".join(disturbed)
        )
    result.note(
        "Events: 3 thumbs to 1 pairwise, each with its own idempotency key, on generations "
        f"seeded by {len(SEED_PROMPTS) * SEED_REPEATS} real chat requests (n=2, max_tokens 8) "
        "through each prefloop app's API; the bare app validates the same event bodies. "
        f"Each run sends for {args.duration:g} s (single events) or {args.batch_duration:g} s "
        "(batches), then lets the requests in flight finish; rates are events acknowledged from "
        f"the first request to the last answer. {args.warmup:g} s of warm-up per variant."
    )
    result.note(
        "DESIGN.md's figures for a bare endpoint (wrk: 303 req/s at 8 connections, p99 49 ms; "
        "398 at 32) came from another client and request; the ratios here compare prefloop "
        "with the bare app under the same client, machine and Serve session."
    )
    profiles = [v.profile for v in variants if v.profile]
    if profiles:
        result.profile = "\n\n".join(profiles)


def _ratio(bare: Variant | None, run: Run) -> float | None:
    """`run`'s events/s over the bare endpoint's at the same endpoint and concurrency."""
    base = bare.find(run.endpoint, run.concurrency) if bare else None
    if base is None or not base.events:
        return None
    return round(run.events_per_s / base.events_per_s, 3)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--variants",
        default="sqlite,bare,postgres",
        help="comma-separated, run in this order: sqlite, bare, postgres",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="connections, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="s of load per single run")
    parser.add_argument("--batch-duration", type=float, default=5.0, help="s per batch run")
    # Each batch connection keeps batch-size events in flight: 8 x 100 already queue seconds of
    # writes on prefloop, and every run waits for its requests in flight to finish.
    parser.add_argument("--batch-concurrency", default="1,8", help="connections for batches")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="s of unmeasured load per variant first"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="events per batch request")
    parser.add_argument(
        "--pg-admin-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="where to create (and drop) the benchmark's database",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one more single-event run per variant under py-spy"
    )
    args = parser.parse_args()
    args.repeats_left = MAX_REPEATS
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.batch_concurrency = [int(c) for c in args.batch_concurrency.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - {"sqlite", "bare", "postgres"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from sqlite, bare, postgres")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = Result(
        "ingest", "Feedback ingest", " ".join(["python -m bench.ingest", *sys.argv[1:]])
    )
    scratch = args.scratch = scratch_dir("ingest")
    model = embedded_model()
    pg_name = None
    variants = []
    import ray
    from ray import serve

    try:
        for name in args.variants:
            if name == "sqlite":
                url: str | None = f"sqlite:///{scratch / 'sqlite' / 'prefloop.db'}"
            elif name == "postgres":
                pg_name, url = create_pg_database(args.pg_admin_url)
            else:
                url = None
            variants.append(Variant(name, url))
        port = free_port()
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, namespace=APP_PREFIX
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ids: list = []
        for variant in variants:
            ids = run_variant(variant, scratch, model, port, args, ids)
        report(result, variants, args)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        if pg_name is not None:
            drop_pg_database(args.pg_admin_url, pg_name)
        shutil.rmtree(scratch, ignore_errors=True)
    result.write()


if __name__ == "__main__":
    main()
