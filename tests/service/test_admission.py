"""Back-pressure: a flood past a replica's admission bound gets fast 503s with Retry-After while
the admitted chats complete; a chat that waits past its deadline is refused; per-key rate limits
answer 429 with Retry-After and recover."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service.app import AppOptions, build_app
from service.auth import Authenticator
from service.settings import LimitsSettings
from tests.conftest import CHAT_KEY, KEYS, OTHER_KEY, auth
from tests.fakes import FakeEngine

QUESTION = {"messages": [{"role": "user", "content": "Where is my parcel?"}]}


class HeldEngine(FakeEngine):
    """Generates only once `go` is set, so requests pile up as behind a busy engine."""

    def __init__(self):
        super().__init__()
        self.go = asyncio.Event()

    async def generate(self, request_id, prompt_token_ids, sampling):
        await self.go.wait()
        async for step in super().generate(request_id, prompt_token_ids, sampling):
            yield step


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth(CHAT_KEY)
    )


async def timed_chat(c: httpx.AsyncClient, **kw) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    r = await c.post("/v1/chat/completions", json=QUESTION, **kw)
    return r, time.perf_counter() - start


async def test_flood_past_the_bound_is_refused_fast_and_admitted_chats_complete(registry):
    engine = HeldEngine()
    limits = LimitsSettings(max_admitted_chats=8, queue_timeout_s=30)
    options = AppOptions(limits=limits, max_num_seqs=4)
    app = build_app(engine, registry, Authenticator(KEYS), options)
    async with client_for(app) as c:
        admitted = [asyncio.create_task(timed_chat(c)) for _ in range(8)]
        while app.state.admission.admitted < 8:
            await asyncio.sleep(0.005)
        # Refused at once, or (were they queued) still waiting when this gives up.
        flood = await asyncio.wait_for(asyncio.gather(*[timed_chat(c) for _ in range(200)]), 5)
        engine.go.set()
        done = await asyncio.gather(*admitted)
    for r, _ in flood:
        assert r.status_code == 503, r.text
        assert r.json()["error"] == {
            "message": r.json()["error"]["message"],
            "type": "service_unavailable_error",
            "param": None,
            "code": "overloaded",
        }
        assert r.headers["Retry-After"] == "1"
    waits = sorted(t for _, t in flood)
    assert waits[int(len(waits) * 0.99)] < 0.05, f"p99 refusal {waits[-2] * 1000:.1f} ms"
    assert all(r.status_code == 200 for r, _ in done)
    assert app.state.admission.admitted == 0


async def test_chat_that_waits_past_its_deadline_is_refused(registry):
    engine = HeldEngine()
    limits = LimitsSettings(queue_timeout_s=0.3)
    options = AppOptions(limits=limits, max_num_seqs=2)
    app = build_app(engine, registry, Authenticator(KEYS), options)
    async with client_for(app) as c:
        running = [asyncio.create_task(timed_chat(c)) for _ in range(2)]
        while not app.state.admission.slots.locked():
            await asyncio.sleep(0.005)
        late, waited = await timed_chat(c)
        engine.go.set()
        ran = await asyncio.gather(*running)
        after, _ = await timed_chat(c)
    assert late.status_code == 503 and late.json()["error"]["code"] == "queue_timeout"
    assert late.headers["Retry-After"] == "1"
    assert 0.25 < waited < 1.0, waited
    assert [r.status_code for r, _ in ran] == [200, 200]
    assert after.status_code == 200  # the slots were given back


async def test_request_rate_limit_answers_429_and_recovers(registry, engine):
    limits = LimitsSettings(requests_per_s=5, burst=3)
    app = build_app(engine, registry, Authenticator(KEYS), AppOptions(limits=limits))
    async with client_for(app) as c:
        first = [(await timed_chat(c))[0].status_code for _ in range(3)]
        refused, _ = await timed_chat(c)
        other, _ = await timed_chat(c, headers=auth(OTHER_KEY))  # a bucket per key
        await asyncio.sleep(0.25)  # a token every 0.2 s
        again, _ = await timed_chat(c)
    assert first == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "requests_rate_limit"
    assert refused.headers["Retry-After"] == "1"
    assert other.status_code == 200 and again.status_code == 200


async def test_completion_token_limit_answers_429_until_paid_back(registry, engine):
    limits = LimitsSettings(completion_tokens_per_min=120)
    app = build_app(engine, registry, Authenticator(KEYS), AppOptions(limits=limits))
    async with client_for(app) as c:
        r, _ = await timed_chat(c)
        spent = r.json()["usage"]["completion_tokens"]
        statuses = [r.status_code]
        while statuses[-1] == 200:
            statuses.append((await timed_chat(c))[0].status_code)
        refused, _ = await timed_chat(c)
    assert spent > 0 and statuses[-1] == 429
    # 120 tokens/min is 2 a second: the debt takes whole seconds to pay back.
    owed = len(statuses[:-1]) * spent - 120
    assert refused.json()["error"]["code"] == "tokens_rate_limit"
    assert int(refused.headers["Retry-After"]) == pytest.approx(owed / 2, abs=1.5)
