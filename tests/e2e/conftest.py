"""The real service for end-to-end tests: one Ray Serve deployment per test module.

Each start costs about 40 s (Ray, Serve, then the vLLM engine loading the embedded model), so the
`service` fixture is module-scoped and every test in a module shares it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.settings import EngineSettings, Settings
from service.store import Store
from tests.conftest import KEYS

READY_TIMEOUT_S = 300


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


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory) as svc:
        yield svc


def chats_per_replica() -> dict[str, float]:
    """Chat requests answered per replica (Ray worker), from Ray's metrics export of this node."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return {
        sample.labels["WorkerId"]: sample.value
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text)
        for sample in family.samples
        if sample.name == "ray_prefloop_requests_total"
        and sample.labels.get("route") == "/v1/chat/completions"
    }
