"""Faults and hostile load against the real service (Ray Serve + vLLM on the embedded model),
through Serve's proxy. Each test prints what it measured (docs/reliability.md).

- A 30 MB chat body is refused with 413 at once, and chats beside it keep their latency.
- A flood of chats past the replica's admission bound: the excess gets 503 with `Retry-After` at
  once, and the admitted chats complete.
- While clients vote, one process is killed with SIGKILL: the API replica, the policy replica (with
  its engine), or Serve's HTTP proxy. Afterwards the service answers chat and feedback again, every
  acknowledged vote is stored exactly once, and a retry of an acknowledged vote with its
  idempotency key answers with the same id.

    pytest tests/e2e/serving/test_faults.py -m e2e -p no:randomly -s
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import CHAT_KEY, auth
from tests.e2e.conftest import Service, VoteLoad, answers, assert_votes_kept
from tests.service.live import beside_big_bodies, chat_latencies

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

RECOVERY_TIMEOUT_S = 240


def ray_processes(marker: str) -> set[int]:
    """Processes of this test's own Ray cluster (our descendants) whose command line has `marker`
    (Ray titles its workers `ray::<actor class>`, Serve's replicas `ServeReplica:<app>:<name>`)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def response_ids(service: Service) -> Iterator[list[str]]:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    ids = [
        httpx.post(
            f"{service.base_url}/v1/chat/completions", json=body, headers=auth(CHAT_KEY), timeout=60
        ).json()["id"]
        for _ in range(4)
    ]
    yield ids


def chat_latency(svc: Service, n: int) -> list[float]:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
    return chat_latencies(svc.settings.port, n, body, timeout_s=60)


def test_oversized_body_is_refused_at_once_and_chats_keep_their_latency(service: Service) -> None:
    """A 30 MB chat body every half second while chats run: each refused at once, and the chats
    as fast as without them. (Back to back without a pause, the bodies are a bandwidth flood that
    keeps Serve's proxy busy reading bytes, which no limit in the app can prevent.)"""
    chat_latency(service, 3)  # warm-up
    alone = chat_latency(service, 10)
    beside, refusals = beside_big_bodies(
        service.settings.port, lambda: chat_latency(service, 10), declared=True, pause_s=0.5
    )
    times = sorted(elapsed for _, _, elapsed in refusals)
    p50_alone, p50_beside = statistics.median(alone), statistics.median(beside)
    print(
        f"\n[fault] 30 MB chat bodies: {len(refusals)} refused, time to 413 p50 "
        f"{statistics.median(times) * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms; a chat of 8 "
        f"tokens p50 {p50_alone * 1000:.0f} ms alone, {p50_beside * 1000:.0f} ms beside them"
    )
    assert refusals and all(status == 413 for status, _, _ in refusals), refusals[:3]
    assert all(body["error"]["code"] == "body_too_large" for _, body, _ in refusals)
    assert statistics.median(times) < 0.1, times
    assert p50_beside < 1.5 * p50_alone + 0.1, (p50_alone, p50_beside)


def test_a_flood_past_the_admission_bound_is_refused_at_once(service: Service) -> None:
    """As many chats as the bound at once, then three times as many: the excess is refused with
    503 and `Retry-After` long before an admitted chat is answered, and the admitted chats take
    about as long as they did without it."""
    bound = service.settings.limits.admitted_chats(service.settings.engine.max_num_seqs)
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 32}

    async def one(client: httpx.AsyncClient) -> tuple[int, str | None, float]:
        start = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, r.headers.get("Retry-After"), time.perf_counter() - start

    async def at_once(n: int) -> list[tuple[int, str | None, float]]:
        async with httpx.AsyncClient(
            base_url=service.base_url,
            headers=auth(CHAT_KEY),
            timeout=300,
            limits=httpx.Limits(max_connections=n),
        ) as client:
            return await asyncio.gather(*(one(client) for _ in range(n)))

    alone = sorted(t for status, _, t in asyncio.run(at_once(bound)) if status == 200)
    answers = asyncio.run(at_once(3 * bound))
    served = sorted(t for status, _, t in answers if status == 200)
    refused = sorted(t for status, _, t in answers if status == 503)
    print(
        f"\n[fault] {bound} chats at once: p50 {statistics.median(alone):.1f} s; {3 * bound} at "
        f"once against an admission bound of {bound}: {len(served)} served (p50 "
        f"{statistics.median(served):.1f} s), {len(refused)} refused with 503 (p50 "
        f"{statistics.median(refused) * 1000:.0f} ms, max {refused[-1] * 1000:.0f} ms)"
    )
    assert len(alone) == bound
    assert {status for status, _, _ in answers} == {200, 503}, answers
    assert all(retry is not None for status, retry, _ in answers if status == 503)
    assert len(served) >= bound
    assert statistics.median(refused) < statistics.median(served) / 5, (refused, served)
    assert statistics.median(served) < 1.5 * statistics.median(alone) + 1, (alone, served)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("target", "marker"),
    [
        ("API replica", "ServeReplica:prefloop:api"),
        ("policy replica", "ServeReplica:prefloop-policy:policy"),
        ("proxy", "ProxyActor"),
    ],
)
def test_kill_under_feedback_load(
    service: Service, response_ids: list[str], target: str, marker: str
) -> None:
    victims = ray_processes(marker)
    assert victims, f"no process of this Ray cluster matches {marker!r}"
    with VoteLoad(service.base_url, response_ids) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        deadline = killed_at + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if load.recovered(since=killed_at + 1) and answers(service.base_url):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"{target}: not answering {RECOVERY_TIMEOUT_S} s after SIGKILL")
        recovered_s = time.monotonic() - killed_at
        time.sleep(2)
    during = [v for v in load.votes if v.sent >= killed_at and v.sent < killed_at + recovered_s]
    refused = [v for v in during if v.id is None]
    acked = load.acknowledged()
    print(
        f"\n[fault] SIGKILL {target}: answering again after {recovered_s:.1f} s; "
        f"{len(load.votes)} votes sent, {len(acked)} acknowledged, "
        f"{len(refused)} refused or failed while recovering "
        f"(statuses {sorted({v.status for v in refused})})"
    )
    if target == "policy replica":
        # Votes go to the API replica: a policy replica's death costs none of them.
        assert not refused, refused[:5]
    assert_votes_kept(service.store, service.base_url, acked)
