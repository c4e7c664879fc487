"""The real service for end-to-end tests, and the load and checks several of them share.

Each start costs 40-60 s (Ray, Serve, then the vLLM engine loading the embedded model), so tests
share deployments: the modules of `serving/` one (`service`), those of `loop/` another
(`loop_service`); the modules that need a deployment of their own shape start it themselves.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from service.settings import EngineSettings, LimitsSettings, Settings
from service.store import Feedback, Store
from tests.conftest import CHAT_KEY, KEYS, auth

READY_TIMEOUT_S = 300
VOTERS = 4
# Between a voter's votes: four voters without a pause kept both cores busy, and a replacement
# policy replica then took 125 s instead of about 40 s to load its engine.
VOTE_PAUSE_S = 0.1


@dataclass(frozen=True)
class Service:
    settings: Settings
    store: Store

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{base_url}/readyz not ready after {timeout_s} s: {last}")


@contextmanager
def running_service(
    tmp_path_factory: pytest.TempPathFactory, **overrides: Any
) -> Iterator[Service]:
    """Deploy the service on a Ray cluster of its own (even if `ray start` left one running on
    this machine) with a fresh SQLite store; `overrides` are settings."""
    from deploy.bootstrap import ensure_embedded_model
    from service import deployment

    settings = Settings(
        **{
            "port": free_port(),
            "database_url": f"sqlite:///{tmp_path_factory.mktemp('e2e-db') / 'prefloop.db'}",
            "model_path": ensure_embedded_model(Settings().data_dir),
            "api_keys": KEYS,
            "health_check_period_s": 1,
            "ray_address": "local",
            "engine": EngineSettings(kv_cache_space_gib=1, max_num_seqs=32),
            # The seeded-prefill test sends 44 long prompts with n=4 at once, which on two cores
            # wait for the engine longer than the default 30 s deadline (tests/service/
            # test_admission.py tests the deadline).
            "limits": LimitsSettings(queue_timeout_s=300),
            **overrides,
        }
    )
    store = Store(settings.resolved_database_url)
    try:
        deployment.deploy(settings)
        svc = Service(settings, store)
        wait_ready(svc.base_url)
        yield svc
    finally:
        store.close()
        deployment.shutdown()


def chats_per_replica(export_urls: Iterable[str] | None = None) -> dict[str, float]:
    """Chat requests answered per replica (Ray worker), from Ray's metrics export at
    `export_urls` (every node's, on a cluster of several), by default this node's."""
    from prometheus_client.parser import text_string_to_metric_families

    if export_urls is None:
        import ray

        node = next(n for n in ray.nodes() if n["Alive"])
        export_urls = [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"]
    return {
        sample.labels["WorkerId"]: sample.value
        for url in export_urls
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
        for sample in family.samples
        if sample.name == "ray_prefloop_requests_total"
        and sample.labels.get("route") == "/v1/chat/completions"
    }


@dataclass
class Vote:
    key: str
    response_id: str
    status: int
    id: str | None
    sent: float


class VoteLoad:
    """`VOTERS` threads that vote on the given answers at `base_url`, each vote with an
    idempotency key of its own, until the context exits."""

    def __init__(self, base_url: str, response_ids: list[str]):
        self.base_url, self.response_ids = base_url, response_ids
        self.votes: list[Vote] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(VOTERS)]

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.base_url, headers=auth(CHAT_KEY), timeout=30) as c:
            n = 0
            while not self._stop.is_set():
                key = f"fault-{worker}-{n}-{uuid.uuid4().hex[:8]}"
                rid = self.response_ids[n % len(self.response_ids)]
                sent = time.monotonic()
                body = {"type": "thumbs", "response_id": rid, "rating": "up"}
                try:
                    r = c.post("/v1/feedback", json=body, headers={"Idempotency-Key": key})
                    # 202: acknowledged and journaled (the store did not answer in time).
                    ack = r.json().get("id") if r.status_code in (200, 201, 202) else None
                    self.votes.append(Vote(key, rid, r.status_code, ack, sent))
                except (httpx.HTTPError, ValueError):
                    self.votes.append(Vote(key, rid, 0, None, sent))
                n += 1
                time.sleep(VOTE_PAUSE_S)

    def acknowledged(self) -> list[Vote]:
        return [v for v in self.votes if v.id is not None]

    def recovered(self, since: float) -> bool:
        """The last vote of every voter, sent after `since`, was acknowledged."""
        recent = [v for v in self.votes[-VOTERS:] if v.sent > since]
        return bool(recent) and all(v.id for v in recent)

    def __enter__(self) -> VoteLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def answers(base_url: str) -> bool:
    """One short chat succeeds."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    try:
        r = httpx.post(
            f"{base_url}/v1/chat/completions", json=body, headers=auth(CHAT_KEY), timeout=30
        )
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def assert_votes_kept(store: Store, base_url: str, acked: list[Vote]) -> None:
    """Every acknowledged vote is stored exactly once under the id it was acknowledged with, and
    a retry with its idempotency key answers with that id."""
    assert acked, "no vote was acknowledged"
    ids = {v.id for v in acked}
    assert len(ids) == len(acked), "two acknowledgements share an id"
    # Votes acknowledged as journaled (202) are stored once the journal is replayed, within
    # seconds of the store answering again.
    deadline = time.monotonic() + 60
    while True:
        with store.reading() as s:
            stored = s.scalar(
                select(func.count()).select_from(Feedback).where(Feedback.id.in_(ids))
            )
            by_key = s.scalar(
                select(func.count())
                .select_from(Feedback)
                .where(Feedback.idempotency_key.in_({v.key for v in acked}))
            )
        if stored == len(ids) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert stored == len(ids), f"{len(ids) - (stored or 0)} acknowledged votes are not stored"
    assert by_key == len(ids), f"{by_key} rows for {len(ids)} idempotency keys"
    with httpx.Client(base_url=base_url, headers=auth(CHAT_KEY), timeout=30) as c:
        for vote in acked[-3:]:
            body = {"type": "thumbs", "response_id": vote.response_id, "rating": "up"}
            r = c.post("/v1/feedback", json=body, headers={"Idempotency-Key": vote.key})
            assert r.status_code in (200, 202) and r.json()["id"] == vote.id, r.text
