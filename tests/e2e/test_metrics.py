"""`/metrics` with two replicas: the totals of the whole cluster, not of the replica that answered.

Two replicas (two vLLM engines) behind Serve's proxy; chats and votes go through the proxy; the
scrape through the proxy must count every one of them, and Ray's own export must show that both
replicas took part (otherwise one replica's registry would give the same totals).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, CHAT_KEY, auth
from tests.e2e.conftest import Service, chats_per_replica, running_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray]

CHATS = 16
CHAT_ROUTE = "/v1/chat/completions"
# Ray's pipeline reports every second here (10 s by default), so the totals settle within this.
SETTLE_S = 60


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    import ray

    from service.deployment import APP_NAME

    ray.init(
        address="local",
        namespace=APP_NAME,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    try:
        with running_service(tmp_path_factory, replicas=2) as svc:
            yield svc
    finally:
        ray.shutdown()  # also when the service never started


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


def chat(svc: Service, i: int) -> str:
    r = httpx.post(
        f"{svc.base_url}{CHAT_ROUTE}",
        json={"messages": [{"role": "user", "content": f"Say a number: {i}"}], "max_tokens": 4},
        headers=auth(CHAT_KEY),
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_metrics_report_the_totals_of_every_replica(two_replicas: Service) -> None:
    svc = two_replicas
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: chat(svc, i), range(CHATS)))
    votes = ids[: CHATS // 2]
    for response_id in votes:
        r = httpx.post(
            f"{svc.base_url}/v1/feedback",
            json={"type": "thumbs", "response_id": response_id, "rating": "up"},
            headers=auth(CHAT_KEY),
            timeout=30,
        )
        assert r.status_code == 201, r.text

    deadline, text = time.monotonic() + SETTLE_S, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{svc.base_url}/metrics", headers=auth(ADMIN_KEY), timeout=30).text
        chats = total(text, "prefloop_requests_total", route=CHAT_ROUTE, status="200")
        ups = total(text, "prefloop_feedback_total", kind="thumbs", value="up")
        if chats >= CHATS and ups >= len(votes):
            break
        time.sleep(1)
    assert total(text, "prefloop_requests_total", route=CHAT_ROUTE, status="200") == CHATS, text
    assert total(text, "prefloop_feedback_total", kind="thumbs", value="up") == len(votes), text
    completion = total(text, "prefloop_tokens_total", kind="completion")
    assert 0 < completion <= CHATS * 4, text
    # One sample per label set: Ray's worker and node labels were summed away.
    chat_samples = [
        labels
        for labels, _ in samples(text, "prefloop_requests_total")
        if labels.get("route") == CHAT_ROUTE
    ]
    assert chat_samples == [{"route": CHAT_ROUTE, "status": "200"}], chat_samples

    per_replica = chats_per_replica()
    assert len(per_replica) == 2, f"chats answered by {len(per_replica)} replica(s): {per_replica}"
    assert sum(per_replica.values()) == CHATS
