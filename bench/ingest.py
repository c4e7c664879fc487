"""Feedback ingest through the full HTTP stack: Ray Serve's proxy -> the API replica -> FastAPI
-> the group-commit writer -> the store, against the same Ray Serve stack without storage.

Three variants in one Ray/Serve session:

- `sqlite`: prefloop's real applications (`service.deployment.run_applications`: the API replica
  that takes the votes, and the policy replica with its vLLM engine that makes the generations)
  on its default store (SQLite, WAL, synchronous=FULL), at route prefix `/`;
- `bare`: a Ray Serve FastAPI deployment with the same routes that authenticates and validates
  events exactly as prefloop does (`Authenticator`, `parse_event`, `FeedbackBatchRequest`) and
  answers the same ack without storing: DESIGN.md's baseline, at `/bare` for the whole run;
- `postgres`: prefloop's real application on PostgreSQL (a database of its own, dropped after),
  at `/` once `sqlite` is gone (one vLLM engine at a time on the box).

Each stored variant is measured beside the bare app in `--rounds` rounds that alternate which side
goes first (ABBA): in every round each side takes closed-loop load from one asyncio/aiohttp
generator (keep-alive connections, the same for every side) at each concurrency, on
`POST /v1/feedback` (one event per request) and `POST /v1/feedback/batch` (`--batch-size` events
per request). A ratio to the bare app is taken per round, and a target's verdict rests on the
spread of its rounds. Events reference real generations: a few `n=2` chat requests through the
API seed each store. After the load, a fresh `Store` counts the feedback rows, which must equal
the events acknowledged with 201.

    flock /tmp/prefloop-bench.lock .venv/bin/python -m bench.ingest
    flock /tmp/prefloop-bench.lock .venv/bin/python -m bench.ingest --profile  # + py-spy summary

Needs the embedded model (`make setup`) and PostgreSQL on 127.0.0.1:5432 (`--variants
sqlite,bare` skips it). The default run takes about 5.5 minutes.
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

from bench.common import (
    Result,
    embedded_model,
    free_port,
    mean,
    percentile,
    scratch_dir,
    wait_http,
)

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
    dependencies, the event's validation, the Idempotency-Key check and the error handlers are
    prefloop's own; the ack gets a fresh id instead of a row."""
    from fastapi import Depends, FastAPI, Header, Response, Security
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    from service.auth import Authenticator, Principal
    from service.errors import Unprocessable, install_error_handlers
    from service.feedback import parse_event, with_header_key
    from service.protocol import (
        BatchItemResult,
        FeedbackAck,
        FeedbackBatchRequest,
        FeedbackBatchResponse,
        FeedbackEvent,
    )

    authenticator = Authenticator(keys)
    bearer = HTTPBearer(auto_error=False)
    app = FastAPI(title="bare feedback")
    install_error_handlers(app)

    def principal(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    ) -> Principal:
        return authenticator(credentials.credentials if credentials else None)

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
        event: FeedbackEvent,
        who: Voter,
        response: Response,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
    ) -> FeedbackAck:
        with_header_key(event, idempotency_key)
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
    round: int = 0  # which round of the variant's runs (-1: warm-up)

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
    # The bare app's figures are taken in rounds beside each stored variant's: which one.
    beside: str | None = None
    bare: "Variant | None" = None  # a stored variant's baseline, measured in the same rounds
    base_url: str = ""
    app: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} (beside {self.beside})" if self.beside else self.name

    @property
    def acked(self) -> int:
        return sum(r.events for r in self.runs) + self.extra_acks

    def find(self, endpoint: str, concurrency: int, round_: int | None = None) -> Run | None:
        """The run of that endpoint and concurrency (of that round, when given)."""
        return next(
            (
                r
                for r in self.runs
                if (r.endpoint, r.concurrency) == (endpoint, concurrency)
                and round_ in (None, r.round)
            ),
            None,
        )

    def series(self, endpoint: str, concurrency: int) -> list[Run]:
        """Every round's run of that endpoint and concurrency, in round order."""
        runs = [r for r in self.runs if (r.endpoint, r.concurrency) == (endpoint, concurrency)]
        return sorted(runs, key=lambda r: r.round)

    def cells(self, endpoint: str) -> list[int]:
        """The concurrencies this variant ran `endpoint` at, in the order first run."""
        return list(dict.fromkeys(r.concurrency for r in self.runs if r.endpoint == endpoint))


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
# Seconds of the single-event run under py-spy (--profile): enough samples to rank frames.
PROFILE_S = 8.0
# Where the bare app answers while a stored variant is deployed at `/`.
BARE_PREFIX = "/bare"


def round_orders(rounds: int, sides: list[Variant]) -> list[list[Variant]]:
    """The order the sides run in, per round: as given, then reversed, alternately (ABBA over
    every two rounds), so that neither side always has the warmer or the later turn."""
    return [list(sides) if r % 2 == 0 else list(reversed(sides)) for r in range(rounds)]


def show(run: Run, remark: str = "") -> None:
    batch = run.endpoint == "batch"
    rate = f"{run.events_per_s:6.0f} events/s" if batch else f"{run.requests_per_s:6.0f} req/s"
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    errors = f"  errors {dict(run.errors)}" if run.errors else ""
    print(
        f"[ingest] {run.variant:8} r{run.round} {run.endpoint:6} c={run.concurrency:<3} "
        f"{rate}  p50 {run.latency_ms(50)} ms  p99 {run.latency_ms(99)} "
        f"ms  cores: {cpu}{errors}{'  ' + remark if remark else ''}",
        flush=True,
    )


def process_ids(side: Variant, other: Variant | None) -> dict[str, int | None]:
    """The processes whose CPU a run of `side` reports: Ray's proxy, its replica, and the replica
    of the app deployed beside it but idle meanwhile (its background work shares the cores)."""
    pids = {
        "proxy": find_pid("ray::ProxyActor"),
        "replica": find_pid(f"ray::ServeReplica:{side.app}:"),
    }
    if other is not None:
        pids["idle app"] = find_pid(f"ray::ServeReplica:{other.app}:")
    return pids


def measure(sides: list[Variant], events: dict[str, Events], args: argparse.Namespace) -> None:
    """`args.rounds` rounds over every endpoint and concurrency; in each, every side runs once,
    in the order of `round_orders`. A run disturbed by other work on the box is repeated once
    (while the repeat budget lasts) and the less disturbed of the two kept."""
    pids = {
        side.label: process_ids(side, next((o for o in sides if o is not side), None))
        for side in sides
    }
    plans: dict[str, tuple[str, Callable[[Events], Callable[[], bytes]], Callable, float]] = {
        "single": ("/v1/feedback", lambda e: e.single, single_ack, args.duration),
        "batch": (
            "/v1/feedback/batch",
            lambda e: e.batch(args.batch_size),
            batch_acks,
            args.batch_duration,
        ),
    }

    def load(side: Variant, endpoint: str, concurrency: int, duration: float, r: int) -> Run:
        path, body, acks, _ = plans[endpoint]
        run = Run(side.name, endpoint, concurrency, duration, round=r)
        url = f"{side.base_url}{path}"
        return asyncio.run(closed_loop(run, url, body(events[side.label]), acks, pids[side.label]))

    # Warm-up (connections, first-call costs): not figures, but its events are stored.
    for side in sides:
        side.extra_acks += load(side, "single", 8, args.warmup, -1).events
        side.extra_acks += load(side, "batch", 1, 0.1, -1).events
    cells = [("single", c) for c in args.concurrency]
    cells += [("batch", c) for c in args.batch_concurrency]
    for r, order in enumerate(round_orders(args.rounds, sides)):
        for endpoint, conc in cells:
            duration = plans[endpoint][3]
            for side in order:
                run = load(side, endpoint, conc, duration, r)
                if run.cpu.get("outside", 0.0) > DISTURBED and args.repeats_left > 0:
                    args.repeats_left -= 1
                    # Other work on the shared box took CPU this run needed: run it once more
                    # and keep the less disturbed of the two (both runs' events are stored).
                    show(run, f"disturbed by {run.busiest_outside}: repeated")
                    worse, run = sorted(
                        (run, load(side, endpoint, conc, duration, r)),
                        key=lambda x: -x.cpu.get("outside", 0),
                    )
                    side.extra_acks += worse.events
                side.runs.append(run)
                show(run)
    for side in sides:
        # The bare app is probed and profiled once: beside the first stored variant (or alone).
        first = side.database_url is not None or side.beside == getattr(args, "profiled_bare", None)
        if side.database_url is None and first:
            side.probe = Run(side.name, "GET /healthz", 8, args.batch_duration)
            url = f"{side.base_url}/healthz"
            asyncio.run(closed_loop(side.probe, url, None, single_ack, pids[side.label]))
            show(side.probe)
        if args.profile and first:
            side.profile = profile_single(side, events[side.label], args, pids[side.label])


def profile_single(
    variant: Variant, events: Events, args: argparse.Namespace, pids: dict[str, int | None]
) -> str:
    """One more single-event run at 8 connections with py-spy on the replica and the proxy."""
    out = args.scratch / f"profile-{variant.name}"
    out.mkdir()
    spies = {
        name: (py_spy(pid, PROFILE_S, out / f"{name}.txt"), out / f"{name}.txt")
        for name, pid in pids.items()
        if pid is not None and name != "idle app"
    }
    time.sleep(1.0)  # py-spy attaches
    run = Run(variant.name, "single", 8, PROFILE_S)
    url = f"{variant.base_url}/v1/feedback"
    asyncio.run(closed_loop(run, url, events.single, single_ack, pids))
    variant.extra_acks += run.events
    parts = [
        f"{variant.name}, one event per request, 8 connections, under py-spy (200 Hz): "
        f"{run.requests_per_s:.0f} req/s, CPU (cores) "
        + ", ".join(f"{k} {v:.2f}" for k, v in run.cpu.items())
    ]
    for name, (proc, path) in spies.items():
        try:
            proc.wait(timeout=PROFILE_S + 30)
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


def deploy_bare(port: int, scratch: Path, model: Path) -> str:
    """The bare app at BARE_PREFIX, for the whole run; returns its app name."""
    from ray import serve

    app = f"{APP_PREFIX}-bare"
    settings = settings_for(Variant("bare", None), scratch, model)
    started = time.monotonic()
    serve.run(
        bare_application(settings.all_api_keys, settings.max_ongoing_requests),
        name=app,
        route_prefix=BARE_PREFIX,
    )
    wait_http(f"http://127.0.0.1:{port}{BARE_PREFIX}/healthz", 120)
    print(f"[ingest] bare: deployed in {time.monotonic() - started:.0f} s", flush=True)
    return app


def run_pair(
    variant: Variant,
    bare: Variant | None,
    scratch: Path,
    model: Path,
    port: int,
    args: argparse.Namespace,
) -> None:
    """Deploy a stored variant at `/`, seed it, measure it in rounds beside the bare app (already
    deployed at BARE_PREFIX), count the stored rows, and delete it."""

    from service import deployment
    from service.store import Feedback, Store

    variant.base_url = f"http://127.0.0.1:{port}"
    variant.app = f"{APP_PREFIX}-{variant.name}"
    settings = settings_for(variant, scratch, model)
    started = time.monotonic()
    deployment.prepare_store(settings)
    deployment.run_applications(settings, name=variant.app)
    wait_http(f"{variant.base_url}/readyz", 300)
    print(f"[ingest] {variant.name}: deployed in {time.monotonic() - started:.0f} s", flush=True)
    try:
        ids = asyncio.run(seed(variant.base_url))
        # The bare app validates events on the same generations: the same bodies, the same cost.
        sides = [variant] + ([bare] if bare is not None else [])
        events = {s.label: Events(ids, f"{s.label}-{uuid.uuid4().hex[:6]}") for s in sides}
        measure(sides, events, args)
    finally:
        deployment.delete_applications(variant.app)
    store = Store(variant.database_url or "")  # a fresh connection, after the replica is gone
    try:
        variant.stored = store.count(Feedback)
    finally:
        store.close()


# --- the report --------------------------------------------------------------------------------


CPU_COLUMNS = ("client", "proxy", "replica", "idle app", "db+kernel", "machine", "outside")


def summary_row(variant: Variant, runs: list[Run]) -> list[Any]:
    """One table row for a variant's rounds at one endpoint and concurrency: mean events/s and
    its spread, mean requests/s, latency percentiles over every round's requests, the mean of the
    per-round ratios to the bare app (and their spread), errors, mean replica CPU per event, and
    mean cores per process."""
    rates = [r.events_per_s for r in runs]
    ratios = [x for x in (_ratio(variant.bare, r) for r in runs) if x is not None]
    latencies = [t for r in runs for t in r.latencies]
    costs = [r.replica_ms_per_event for r in runs]
    return [
        variant.label,
        runs[0].concurrency,
        len(runs),
        round(mean(rates) or 0.0),
        f"{min(rates):.0f}-{max(rates):.0f}",
        round(mean(r.requests_per_s for r in runs) or 0.0, 1),
        round(percentile(latencies, 50) * 1000, 1),
        round(percentile(latencies, 99) * 1000, 1),
        _round(mean(ratios), 3),
        f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else None,
        sum(sum(r.errors.values()) for r in runs),
        _round(mean(costs), 2),
        *[round(mean(r.cpu.get(k, 0.0) for r in runs) or 0.0, 2) for k in CPU_COLUMNS],
    ]


def report(result: Result, variants: list[Variant], args: argparse.Namespace) -> None:
    stored = [v for v in variants if v.database_url is not None]
    bares = [v for v in variants if v.database_url is None]
    for endpoint, caption in (
        ("single", "one event per request (POST /v1/feedback)"),
        ("batch", f"batch endpoint (POST /v1/feedback/batch, {args.batch_size} events a request)"),
    ):
        rows = [
            summary_row(v, v.series(endpoint, conc)) for v in variants for conc in v.cells(endpoint)
        ]
        columns = ["variant", "connections", "rounds", "events/s (mean)", "events/s (spread)"]
        columns += ["requests/s", "p50 ms", "p99 ms", "vs bare (mean)", "vs bare (spread)"]
        columns += ["errors", "replica CPU ms/event"]
        columns += [f"{k} CPU" for k in CPU_COLUMNS]
        result.table(
            f"{caption}, closed loop, rounds alternating which side goes first", columns, rows
        )
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
            runs = v.series("single", conc)
            ratios = [x for x in (_ratio(v.bare, r) for r in runs) if x is not None]
            if not ratios:
                continue
            base = v.bare.series("single", conc) if v.bare else []
            result.target(
                f"{v.name}: single events/s vs no storage, {conc} connections",
                None,
                0.90,
                rounds=ratios,
                detail=f"mean {mean(r.events_per_s for r in runs):.0f} vs "
                f"{mean(r.events_per_s for r in base) or 0:.0f} events/s over {len(ratios)} "
                "rounds, each round's ratio taken beside the bare app's run of that round",
            )
        batch_cells = v.cells("batch")
        if batch_cells:
            best = max(
                batch_cells, key=lambda c: mean(r.events_per_s for r in v.series("batch", c)) or 0
            )
            runs = v.series("batch", best)
            result.target(
                f"{v.name}: batch endpoint events/s (the best of {len(batch_cells)} concurrencies "
                "by its mean)",
                None,
                5000,
                unit="events/s",
                rounds=[round(r.events_per_s) for r in runs],
                detail=f"at {best} connections over {len(runs)} rounds",
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
        costs = []
        for endpoint in ("single", "batch"):
            for conc in v.cells(endpoint):
                ours = mean(r.replica_ms_per_event for r in v.series(endpoint, conc))
                base = v.bare.series(endpoint, conc) if v.bare else []
                theirs = mean(r.replica_ms_per_event for r in base)
                if ours is not None and theirs is not None:
                    costs.append(f"{endpoint} c={conc} {ours - theirs:.2f}")
        if costs:
            result.note(
                f"{v.name}: storing costs the replica this much CPU per event (ms, prefloop's "
                "replica CPU per event minus the bare one's, same endpoint and connections, "
                "means over the rounds): " + ", ".join(costs)
            )
    singles = [r for b in bares for r in b.runs if r.endpoint == "single"]
    top = max(singles, key=lambda r: r.events_per_s, default=None)
    if top is not None and top.cpu.get("client"):
        result.note(
            f"Client: at the bare endpoint's best single-event rate ({top.requests_per_s:.0f} "
            f"req/s, {top.concurrency} connections) the load generator's event-loop thread used "
            f"{top.cpu['client']:.0%} of one core, i.e. about "
            f"{top.requests_per_s / top.cpu['client']:,.0f} req/s per core: it is not the "
            "ceiling, though on 2 cores it shares the machine with the proxy and the replica."
        )
    probe = next((b.probe for b in bares if b.probe is not None), None)
    if probe is not None:
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
        f"Rounds: {args.rounds}, alternating which side goes first (prefloop then bare, then "
        "bare then prefloop, ...), every endpoint and connection count in each round. The bare "
        f"app stays deployed at {BARE_PREFIX} while each stored variant is at /, so both sides "
        "of a round share the machine, the Serve session and the idle neighbour; a target is "
        "met only when every round's figure clears its goal, missed when none does, and not "
        "settled otherwise."
    )
    result.note(
        "CPU columns, in cores while requests are sent, means over the rounds: the client's "
        "event-loop thread, Ray Serve's HTTP proxy (ray::ProxyActor), the replica under load, "
        "the other app's replica (idle meanwhile), PostgreSQL's server processes and kernel "
        f"threads (storage work), the whole machine (of {os.cpu_count()}), and outside = the "
        "rest of the machine's use that is not this benchmark's (other work on the box; a run "
        f"with more than {DISTURBED} outside is repeated once, up to {MAX_REPEATS} runs, and "
        "the less disturbed kept)."
    )
    disturbed = [
        f"{r.variant} r{r.round} {r.endpoint} c={r.concurrency} "
        f"({r.cpu['outside']:.2f}: {r.busiest_outside})"
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
        f"the first request to the last answer. {args.warmup:g} s of warm-up per side and pair."
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
    """`run`'s events/s over the bare endpoint's at the same endpoint, concurrency and round."""
    base = bare.find(run.endpoint, run.concurrency, run.round) if bare else None
    if base is None or not base.events:
        return None
    return round(run.events_per_s / base.events_per_s, 3)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--variants",
        default="sqlite,bare,postgres",
        help="comma-separated: sqlite and postgres run one after the other, each in rounds "
        "beside bare (when named)",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="connections, comma-separated")
    # Four rounds of 2.5 s instead of one of 8 s: about 1.5x the time of a single pass, and a
    # spread to judge the ratio by.
    parser.add_argument("--rounds", type=int, default=4, help="rounds per pair (ABBA order)")
    parser.add_argument("--duration", type=float, default=2.5, help="s of load per single run")
    parser.add_argument("--batch-duration", type=float, default=2.0, help="s per batch run")
    # Each batch connection keeps batch-size events in flight: 8 x 100 already queue seconds of
    # writes on prefloop, and every run waits for its requests in flight to finish.
    parser.add_argument("--batch-concurrency", default="1,8", help="connections for batches")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="s of unmeasured load per side and pair first"
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
    args = parser.parse_args(argv)
    args.repeats_left = MAX_REPEATS
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.batch_concurrency = [int(c) for c in args.batch_concurrency.split(",")]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - {"sqlite", "bare", "postgres"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from sqlite, bare, postgres")
    if args.rounds < 1:
        parser.error(f"--rounds: {args.rounds}; at least 1 (2 or more for a spread)")
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
    variants: list[Variant] = []
    import ray
    from ray import serve

    try:
        stored = []
        for name in (n for n in args.variants if n != "bare"):
            if name == "sqlite":
                url = f"sqlite:///{scratch / 'sqlite' / 'prefloop.db'}"
            else:
                pg_name, url = create_pg_database(args.pg_admin_url)
            stored.append(Variant(name, url))
        with_bare = "bare" in args.variants
        # The bare app is profiled once, in its rounds beside the first stored variant.
        args.profiled_bare = stored[0].name if stored else None
        port = free_port()
        ray.init(
            address="local", include_dashboard=False, log_to_driver=False, namespace=APP_PREFIX
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        bare_app_name = deploy_bare(port, scratch, model) if with_bare else ""

        def bare_beside(name: str | None) -> Variant:
            return Variant(
                "bare",
                None,
                beside=name,
                base_url=f"http://127.0.0.1:{port}{BARE_PREFIX}",
                app=bare_app_name,
            )

        for variant in stored:
            variant.bare = bare_beside(variant.name) if with_bare else None
            run_pair(variant, variant.bare, scratch, model, port, args)
            variants += [variant] + ([variant.bare] if variant.bare else [])
        if with_bare and not stored:
            # The bare app alone: ids of the same shape as real ones, so validation costs the
            # same.
            alone = bare_beside(None)
            ids = [(f"chatcmpl-{uuid.uuid4().hex}", c % len(SEED_PROMPTS)) for c in range(8)]
            measure([alone], {alone.label: Events(ids, f"bare-{uuid.uuid4().hex[:6]}")}, args)
            variants.append(alone)
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
