"""Cluster mode on one machine: two Ray nodes, PostgreSQL, the exact Serve config, a training job
on the second node, promotion, and the loss of that node.

One test, in order (each step needs the state the one before left):

1. Starts a Ray cluster of a head and a second node with the venv's `ray start`, then deploys
   `deploy/serve_config.yaml`, the file the RayService embeds, with `serve deploy` through the
   head's dashboard. The two policy replicas run one on each node.
2. Chats and votes through the proxy; `/metrics` must report exactly what was sent and stored
   (requests, tokens, feedback by kind and value) as one set of cluster totals, and Ray's export
   of each node must show that both replicas answered.
3. Runs a training cycle as a Ray job, as the CronJob does (`ray job submit ... -- prefloop
   train`), placed on the second node; the gate's thresholds are opened (a few pairs cannot show
   quality; test_loop.py says more) and auto-promotion is off, so the run ends `approved`.
4. Promotes it through the admin API: both replicas swap and answer with the new version.
5. Takes the second node down while clients vote: the service answers again, a replica Serve
   rescheduled onto the head answers chat with the promoted version, and every acknowledged vote
   is in PostgreSQL exactly once.

Decisions:

- Resources. Head: 2 CPUs, 2 GPUs. Second node: 3 CPUs, 1 GPU and `trainer: 1`. The config's
  policy replica asks 1 CPU and 1 GPU, so both replicas fit at first (Serve spreads them over the
  nodes) and both fit on the head after the loss. The GPUs are only declared: the CPU build of
  vLLM ignores the CUDA_VISIBLE_DEVICES that Ray sets. The job's driver asks for `trainer`, which
  only the second node has; its Ray Train worker asks 2 CPUs, which only that node has free.
- Proxy: `serve start --http-host 127.0.0.1 --http-port <free port>` runs before the deploy. Serve
  keeps the HTTP options it was started with and logs that the file's (0.0.0.0:8000, the pod
  network) were not applied, so the file is deployed unmodified while the proxies (one per node,
  sharing the port through SO_REUSEPORT) listen on loopback, on a port no other test holds.
- Settings come from the nodes' environment, as from the ConfigMap and Secret in the pods:
  a fresh PostgreSQL database, one data directory both nodes share, API keys, two replicas, a
  1 GiB KV cache per engine. PYTHONPATH is this checkout, so that what Ray starts runs the code
  under test (the venv's editable install may point at another checkout).
- Ray's token authentication is on (Ray's default once a token exists), with a token of the
  test's own that every client sends.
- Job placement: `--entrypoint-resources={"trainer": 1}` where the CronJob asks for a GPU (one
  is free on the head here too); the test reads the driver's node from the Jobs API.
- Node loss: SIGKILL of every process of the second node (its `ray start --block` leads a
  session of its own: raylet, agents, workers, the replica's engine), as when a machine or pod
  dies. By session, not process group: Ray gives each worker a group of its own. `ray stop`
  would stop every Ray node on the machine, other tests' too; teardown ends both nodes' sessions
  the same way.
- Addresses: the test's clients use 127.0.0.1 only (proxy, dashboard, each node's metrics
  export). Ray replaces `--node-ip-address=127.0.0.1` with this machine's own address for the
  traffic between its nodes, which stays on this machine.

It prints the cycle's time, each replica's swap, the recovery times and the votes:

    pytest tests/e2e/test_cluster.py -m e2e -s
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from service.runs import recent_runs
from service.settings import Settings
from service.store import Feedback, Store
from tests.conftest import ADMIN_KEY, CHAT_KEY, KEYS, auth
from tests.e2e.conftest import (
    VoteLoad,
    answers,
    assert_votes_kept,
    chats_per_replica,
    free_port,
    wait_ready,
)
from tests.e2e.loop.test_loop import QUESTIONS

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
SERVE_CONFIG = REPO / "deploy" / "serve_config.yaml"
BIN = Path(sys.executable).parent
CHAT_ROUTE = "/v1/chat/completions"
# Two engines loading at once on two cores, or one while the other serves and clients vote.
START_TIMEOUT_S = 600
CYCLE_TIMEOUT_S = 900
# Ray's pipeline reports every second here (RAY_metrics_report_interval_ms), so the totals
# settle within this.
SETTLE_S = 60
# Ray declares a node dead after about 15 s of failed health checks, then Serve starts the
# replacement, whose engine loads in about a minute.
RECOVERY_TIMEOUT_S = 400
# A swap reloads weights in place (0.6 s alone on an idle box; test_loop.py holds one replica to
# 2 s). Here two replicas reload at once on two cores, just after the training job: 1 to 5 s in
# the runs so far. A replica restart instead would take 40 s or more.
SWAP_LIMIT_S = 10.0
PROBE = {"role": "user", "content": "How do I cancel my subscription?"}


@dataclass
class Node:
    process: subprocess.Popen
    metrics_port: int
    id: str = ""

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def processes(self) -> list[psutil.Process]:
        """Every process of the node: the session its `ray start --block` leads."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.process.pid:
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found

    def kill(self) -> None:
        for proc in self.processes():
            try:
                proc.kill()
            except psutil.Error:
                continue
        self.process.wait()


@dataclass
class Cluster:
    head: Node
    worker: Node
    gcs_address: str
    dashboard: str
    http_port: int
    env: dict[str, str]
    store: Store

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """A command of the venv (`ray`, `serve`) as a client of this cluster."""
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def get(self, path: str) -> Any:
        return dashboard_get(self.dashboard, self.env, path)

    def replicas(self, app: str, deployment: str) -> list[dict]:
        """The deployment's replicas that are RUNNING, as Serve reports them."""
        apps = self.get("/api/serve/applications/")["applications"]
        if apps.get(app, {}).get("status") != "RUNNING":
            return []
        replicas = apps[app]["deployments"][deployment]["replicas"]
        return [r for r in replicas if r["state"] == "RUNNING"]


def dashboard_get(dashboard: str, env: dict[str, str], path: str) -> Any:
    """The head's dashboard REST API (Jobs, Serve, state), with the cluster's token."""
    r = httpx.get(f"{dashboard}{path}", headers=auth(env["RAY_AUTH_TOKEN"]), timeout=30)
    r.raise_for_status()
    return r.json()


def alive_nodes(dashboard: str, env: dict[str, str]) -> list[dict]:
    try:
        found = dashboard_get(dashboard, env, "/api/v0/nodes?detail=1")["data"]["result"]
    except httpx.HTTPError:  # the dashboard is still starting
        return []
    return [n for n in found["result"] if n["state"] == "ALIVE"]


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1)
    raise TimeoutError(f"{what}: not after {timeout_s} s")


def node_env(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> dict[str, str]:
    """The environment of both nodes and of every client of the cluster."""
    from deploy.bootstrap import ensure_embedded_model

    keys = [{"key": k.key.get_secret_value(), "name": k.name, "scopes": k.scopes} for k in KEYS]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PREFLOOP_", "RAY_"))}
    return {
        **inherited,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_metrics_report_interval_ms": "1000",
        "PREFLOOP_DATABASE_URL": postgres_url,
        "PREFLOOP_DATA_DIR": str(tmp_path_factory.mktemp("cluster-data")),
        "PREFLOOP_MODEL_PATH": str(ensure_embedded_model(Settings().data_dir)),
        "PREFLOOP_API_KEYS": json.dumps(keys),
        "PREFLOOP_REPLICAS": "2",
        "PREFLOOP_HEALTH_CHECK_PERIOD_S": "1",
        "PREFLOOP_ENGINE__KV_CACHE_SPACE_GIB": "1",
        "PREFLOOP_ENGINE__MAX_NUM_SEQS": "16",
        "PREFLOOP_SCHEDULER__ENABLED": "false",
        "PREFLOOP_SCHEDULER__AUTO_PROMOTE": "false",
        "PREFLOOP_TRAIN__EPOCHS": "1",
        "PREFLOOP_TRAIN__BATCH_SIZE": "4",
        "PREFLOOP_GATE__MIN_ACCURACY": "0",
        "PREFLOOP_GATE__MIN_MARGIN": "-1e9",
    }


def start_node(env: dict[str, str], temp_dir: Path, log: Path, *args: str) -> Node:
    metrics_port = free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--metrics-export-port={metrics_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        *args,
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Node(process, metrics_port)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Cluster]:
    env = node_env(tmp_path_factory, postgres_url)
    ray_dir = tmp_path_factory.mktemp("ray")
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    gcs_address, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
    nodes: list[Node] = []
    store = Store(postgres_url)
    try:
        head = start_node(
            env,
            ray_dir,
            ray_dir / "head.log",
            "--head",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--num-gpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        nodes.append(head)
        wait_for(lambda: alive_nodes(dashboard, env), 60, "the head")
        worker = start_node(
            env,
            ray_dir,
            ray_dir / "worker.log",
            f"--address={gcs_address}",
            "--num-cpus=3",
            "--num-gpus=1",
            '--resources={"trainer": 1}',
        )
        nodes.append(worker)
        alive = wait_for(
            lambda: len(found := alive_nodes(dashboard, env)) == 2 and found,
            60,
            "the second node",
        )
        head.id = next(
            n["node_id"] for n in alive if "node:__internal_head__" in n["resources_total"]
        )
        worker.id = next(n["node_id"] for n in alive if "trainer" in n["resources_total"])
        yield Cluster(head, worker, gcs_address, dashboard, http_port, env, store)
    finally:
        store.close()
        for node in nodes:
            node.kill()
        wait_for(
            lambda: not any(node.processes() for node in nodes), 30, "the nodes' processes ending"
        )


def deploy(cluster: Cluster) -> list[dict]:
    """`serve start` on loopback, then `serve deploy` of the config file; returns the policy
    replicas once both run."""
    started = cluster.cli(
        "serve",
        "start",
        f"--address={cluster.gcs_address}",
        "--http-host=127.0.0.1",
        f"--http-port={cluster.http_port}",
        "--proxy-location=EveryNode",
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    deployed = cluster.cli(
        "serve", "deploy", str(SERVE_CONFIG), f"--address={cluster.dashboard}", timeout=120
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    policy = wait_for(
        lambda: len(r := cluster.replicas("prefloop-policy", "policy")) == 2 and r,
        START_TIMEOUT_S,
        "two policy replicas running",
    )
    wait_for(lambda: cluster.replicas("prefloop", "api"), 60, "the API replica running")
    wait_ready(cluster.base_url)
    return policy


def chat(base_url: str, messages: list[dict], **params: Any) -> dict:
    r = httpx.post(
        f"{base_url}{CHAT_ROUTE}",
        headers=auth(CHAT_KEY),
        timeout=120,
        json={"messages": messages, "max_tokens": 32, **params},
    )
    assert r.status_code == 200, r.text
    return r.json()


def vote(base_url: str, body: dict) -> None:
    r = httpx.post(f"{base_url}/v1/feedback", json=body, headers=auth(CHAT_KEY), timeout=30)
    assert r.status_code == 201, r.text


def seed(cluster: Cluster) -> list[dict]:
    """Chats with two answers each and a vote on each (the shorter answer wins, as in
    test_loop.py), plus a thumbs-up on the first answer of half of them; returns the chats."""

    def ask(i: int) -> dict:
        q = QUESTIONS[i % len(QUESTIONS)]
        return chat(cluster.base_url, [{"role": "user", "content": q}], n=2, seed=i, temperature=1)

    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(ask, range(2 * len(QUESTIONS))))
    for i, body in enumerate(bodies):
        texts = [c["message"]["content"] for c in body["choices"]]
        winner = "a" if len(texts[0]) <= len(texts[1]) else "b"
        pair = {
            "type": "pairwise",
            "winner": winner,
            "a": {"response_id": body["id"], "choice_index": 0},
            "b": {"response_id": body["id"], "choice_index": 1},
        }
        vote(cluster.base_url, pair)
        if i % 2 == 0:
            vote(cluster.base_url, {"type": "thumbs", "response_id": body["id"], "rating": "up"})
    return bodies


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for got, value in samples(text, name)
        if all(got.get(k) == v for k, v in labels.items())
    )


def stored_feedback(store: Store) -> Counter[tuple[str, str]]:
    """Feedback rows by (kind, value), as `prefloop_feedback_total` labels them."""
    value = func.coalesce(Feedback.rating, Feedback.winner)
    with store.reading() as s:
        rows = s.execute(select(Feedback.kind, value, func.count()).group_by(Feedback.kind, value))
        return Counter({(kind, val): n for kind, val, n in rows})


def check_metrics(cluster: Cluster, bodies: list[dict], policy: list[dict]) -> None:
    """`/metrics` through the proxy: the cluster's totals equal what was sent and stored."""
    feedback = stored_feedback(cluster.store)
    usage: Counter[str] = Counter()
    for body in bodies:
        usage.update({k: body["usage"][f"{k}_tokens"] for k in ("prompt", "completion")})

    def metrics() -> str:
        r = httpx.get(f"{cluster.base_url}/metrics", headers=auth(ADMIN_KEY), timeout=30)
        assert r.status_code == 200, r.text
        return r.text

    def settled() -> str | None:
        text = metrics()
        chats = total(text, "prefloop_requests_total", route=CHAT_ROUTE, status="200")
        votes = total(text, "prefloop_feedback_total")
        return text if chats >= len(bodies) and votes >= feedback.total() else None

    text = wait_for(settled, SETTLE_S, "the metrics totals")
    assert total(text, "prefloop_requests_total", route=CHAT_ROUTE, status="200") == len(bodies)
    for (kind, value), n in feedback.items():
        assert total(text, "prefloop_feedback_total", kind=kind, value=value) == n, (kind, value)
    assert total(text, "prefloop_feedback_total") == feedback.total(), text
    for kind, n in usage.items():
        assert total(text, "prefloop_tokens_total", kind=kind) == n, (kind, text)
    # One sample per label set: Ray's worker and node labels were summed away.
    chat_samples = [
        labels
        for labels, _ in samples(text, "prefloop_requests_total")
        if labels.get("route") == CHAT_ROUTE
    ]
    assert chat_samples == [{"route": CHAT_ROUTE, "status": "200"}], chat_samples

    per_replica = chats_per_replica([cluster.head.metrics_url, cluster.worker.metrics_url])
    assert set(per_replica) == {r["worker_id"] for r in policy}, per_replica
    assert sum(per_replica.values()) == len(bodies), per_replica


def train_on_worker(cluster: Cluster) -> tuple[str, float, dict[str, float]]:
    """One cycle as a Ray job on the second node; returns its candidate, the job's seconds and
    the run's stage times."""
    submission = f"prefloop-train-{secrets.token_hex(4)}"
    started = time.monotonic()
    job = cluster.cli(
        "ray",
        "job",
        "submit",
        f"--address={cluster.dashboard}",
        f"--submission-id={submission}",
        '--entrypoint-resources={"trainer": 1}',
        "--",
        "prefloop",
        "train",
        timeout=CYCLE_TIMEOUT_S,
    )
    job_s = time.monotonic() - started
    assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
    info = cluster.get(f"/api/jobs/{submission}")
    assert info["status"] == "SUCCEEDED", info
    assert info["driver_node_id"] == cluster.worker.id, (info["driver_node_id"], cluster.head.id)
    run = recent_runs(cluster.store, limit=1)[0]
    assert run.status == "approved", run.error
    assert run.candidate_version_id
    return run.candidate_version_id, job_s, run.stages


def replica_samples(url: str, name: str, **labels: str) -> dict[str, list[tuple[dict, float]]]:
    """A Ray-exported family's samples matching `labels`, by replica (WorkerId)."""
    found: dict[str, list[tuple[dict, float]]] = {}
    text = httpx.get(url, timeout=10).text
    for got, value in samples(text, name):
        if all(got.get(k) == v for k, v in labels.items()):
            found.setdefault(got["WorkerId"], []).append((got, value))
    return found


def swap_bound_s(buckets: list[tuple[dict, float]]) -> float:
    """The upper bound of the histogram bucket one swap fell in."""
    return min(float(labels["le"]) for labels, count in buckets if count >= 1)


def promote_everywhere(
    cluster: Cluster, version: str, policy: list[dict]
) -> tuple[float, dict[str, float]]:
    """Promote through the admin API; returns the call's seconds and each replica's swap time
    (its histogram bucket's bound) once both swapped, and checks that both then answer with the
    new version."""
    started = time.monotonic()
    r = httpx.post(
        f"{cluster.base_url}/v1/admin/versions/{version}/promote",
        headers=auth(ADMIN_KEY),
        timeout=60,
    )
    promote_s = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["serving"] == version
    urls = [cluster.head.metrics_url, cluster.worker.metrics_url]
    workers = {rep["worker_id"] for rep in policy}

    def swapped() -> dict[str, float] | None:
        bounds = {}
        for url in urls:
            for worker, buckets in replica_samples(url, "ray_prefloop_swap_seconds_bucket").items():
                bounds[worker] = swap_bound_s(buckets)
        return bounds if set(bounds) == workers else None

    bounds = wait_for(swapped, SETTLE_S, "both replicas' swaps in Ray's export")
    assert max(bounds.values()) <= SWAP_LIMIT_S, bounds
    for url in urls:
        for worker, swaps in replica_samples(url, "ray_prefloop_swaps_total").items():
            assert [labels["version"] for labels, _ in swaps] == [version], (worker, swaps)

    before = chats_per_replica(urls)

    def both_answered() -> bool:
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda _: chat(cluster.base_url, [PROBE]), range(4)))
        assert {b["system_fingerprint"] for b in bodies} == {version}
        after = chats_per_replica(urls)
        return all(after.get(w, 0) > before.get(w, 0) for w in workers)

    wait_for(both_answered, SETTLE_S, "both replicas answering with the new version")
    return promote_s, bounds


@pytest.mark.timeout(2400)
def test_two_nodes_train_promote_and_lose_one(cluster: Cluster) -> None:
    t0 = time.monotonic()
    policy = deploy(cluster)
    deployed_s = time.monotonic() - t0
    assert {r["node_id"] for r in policy} == {cluster.head.id, cluster.worker.id}, policy

    bodies = seed(cluster)
    check_metrics(cluster, bodies, policy)

    version, job_s, stages = train_on_worker(cluster)
    promote_s, swap_s = promote_everywhere(cluster, version, policy)

    # The second node goes down under vote load.
    on_worker = {
        f"{app}/{dep}"
        for app, dep in (("prefloop", "api"), ("prefloop-policy", "policy"))
        for r in cluster.replicas(app, dep)
        if r["node_id"] == cluster.worker.id
    }
    known = {r["replica_id"] for r in policy}
    with VoteLoad(cluster.base_url, [b["id"] for b in bodies[:4]]) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        cluster.worker.kill()
        wait_for(
            lambda: load.recovered(since=killed_at + 1) and answers(cluster.base_url),
            RECOVERY_TIMEOUT_S,
            "chat and votes answered after the node loss",
        )
        answering_s = time.monotonic() - killed_at

        def rescheduled() -> list[dict] | None:
            running = cluster.replicas("prefloop-policy", "policy")
            new = [r for r in running if r["replica_id"] not in known]
            on_head = all(r["node_id"] == cluster.head.id for r in running)
            return new if len(running) == 2 and len(new) == 1 and on_head else None

        new = wait_for(rescheduled, RECOVERY_TIMEOUT_S, "a replacement replica on the head")[0]
        rescheduled_s = time.monotonic() - killed_at

        def new_replica_answered() -> bool:
            assert chat(cluster.base_url, [PROBE])["system_fingerprint"] == version
            return chats_per_replica([cluster.head.metrics_url]).get(new["worker_id"], 0) > 0

        wait_for(new_replica_answered, SETTLE_S, "the replacement replica answering")
        time.sleep(2)
    acked = load.acknowledged()
    refused = [v for v in load.votes if v.id is None]
    print(
        f"\n[cluster] deployed with two engines in {deployed_s:.0f} s"
        f"\n[cluster] cycle as a Ray job on the second node: {job_s:.0f} s, stages {stages}"
        f"\n[cluster] promoted {version}: the call took {promote_s:.2f} s; swap per replica "
        f"<= {sorted(swap_s.values())} s (histogram bucket bounds)"
        f"\n[cluster] second node SIGKILLed, holding {sorted(on_worker)}: chat and votes "
        f"answered again after {answering_s:.1f} s, a replacement replica ran on the head after "
        f"{rescheduled_s:.1f} s"
        f"\n[cluster] {len(load.votes)} votes sent, {len(acked)} acknowledged, {len(refused)} "
        f"refused or failed (statuses {sorted({v.status for v in refused})})"
    )
    assert_votes_kept(cluster.store, cluster.base_url, acked)
