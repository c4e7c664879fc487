"""Input limits over real HTTP (uvicorn on loopback): oversized and trickled bodies are refused
before they cost anything and without slowing other requests; prompts that cannot fit are refused
before they are tokenised; tokenising does not block the event loop."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from service.app import AppOptions, build_app
from service.auth import Authenticator
from service.settings import LimitsSettings
from tests.conftest import CHAT_KEY, KEYS, auth
from tests.fakes import FakeEngine
from tests.service.live import (
    beside_big_bodies,
    chat_latencies,
    pump,
    read_response,
    request_head,
    serving,
)

QUESTION = {"messages": [{"role": "user", "content": "Where is my parcel?"}], "max_tokens": 8}


@pytest.fixture
def app(engine, registry):
    return build_app(engine, registry, Authenticator(KEYS))


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_body_is_refused_at_once_without_slowing_a_chat(app, store, declared):
    with serving(app) as port:
        chat_latencies(port, 5, QUESTION)  # warm-up
        alone = chat_latencies(port, 30, QUESTION)
        beside, refusals = beside_big_bodies(
            port, lambda: chat_latencies(port, 30, QUESTION), declared
        )
    assert refusals, "no big body was sent while the chats ran"
    for status, body, _ in refusals:
        assert status == 413
        assert body["error"]["code"] == "body_too_large"
        assert body["error"]["type"] == "invalid_request_error"
    times = sorted(elapsed for _, _, elapsed in refusals)
    # With Content-Length nothing of the body is read (about 2 ms); chunked, 4 MiB of it (about
    # 30 ms). The clients share the server's process and two cores, hence a percentile: the
    # slowest refusals wait for the GIL, not for the body.
    p50, p90 = statistics.median(times), times[int(len(times) * 0.9)]
    assert p50 < 0.05 and p90 < 0.1, (
        f"30 MB refused in p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms"
    )
    # The refusals run on the same event loop, and on the same two cores as the client threads:
    # the chats may slow by what those few milliseconds of work cost, not by the body's size
    # (before, they waited for the whole body to be read and tokenised: 48.6 s).
    p50_alone, p50_beside = statistics.median(alone), statistics.median(beside)
    assert p50_beside < 3 * p50_alone + 0.02, (p50_alone, p50_beside)
    assert max(beside) < 0.5, max(beside)


def test_trickled_body_is_cut_at_the_deadline_without_holding_up_others(engine, registry):
    # A slowloris client: the headers, then one byte every 0.5 s, for ever.
    limits = LimitsSettings(body_timeout_s=1.5)
    app = build_app(engine, registry, Authenticator(KEYS), AppOptions(limits=limits))
    head = request_head("/v1/chat/completions", CHAT_KEY, "Content-Length: 1000\r\n")
    with serving(app) as port:
        alone = statistics.median(chat_latencies(port, 10, QUESTION))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            start = time.perf_counter()
            stop = threading.Event()

            def trickle():
                while True:
                    yield b"{"
                    time.sleep(0.5)

            sender = threading.Thread(target=pump, args=(sock, trickle(), stop), daemon=True)
            sender.start()
            during = chat_latencies(port, 10, QUESTION)
            status, body, answered = read_response(sock)
            cut_after = answered - start
            stop.set()
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
    assert 1.4 < cut_after < 3.0, cut_after
    assert statistics.median(during) < 3 * alone + 0.02, (alone, during)


class CountingEngine(FakeEngine):
    """Counts prompts tokenised; `slow_s` makes tokenising take that long, blocking its thread."""

    def __init__(self, slow_s: float = 0.0):
        super().__init__()
        self.rendered, self.slow_s = 0, slow_s

    def render_prompt(self, messages):
        self.rendered += 1
        time.sleep(self.slow_s)
        return super().render_prompt(messages)


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ([{"role": "user", "content": "hi"}] * 257, "too_many_messages"),
        # The fake's tokens are characters: 2049 of them cannot fit 2048.
        (
            [{"role": "user", "content": "x" * 1025}, {"role": "user", "content": "y" * 1024}],
            "context_length_exceeded",
        ),
    ],
)
async def test_prompt_that_cannot_fit_is_refused_before_tokenising(registry, messages, code):
    engine = CountingEngine()
    app = build_app(engine, registry, Authenticator(KEYS))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth(CHAT_KEY)
    ) as c:
        r = await c.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "messages"
        assert engine.rendered == 0
        # Just under the bound it is tokenised (and then refused by its token count).
        fits = [{"role": "user", "content": "x" * 2048}]
        r = await c.post("/v1/chat/completions", json={"messages": fits})
        assert r.status_code == 400 and engine.rendered == 1


def test_tokenising_does_not_block_other_requests(registry):
    engine = CountingEngine(slow_s=1.0)
    app = build_app(engine, registry, Authenticator(KEYS))
    with serving(app) as port:
        chat = threading.Thread(target=chat_latencies, args=(port, 1, QUESTION))
        chat.start()
        deadline = time.monotonic() + 5
        while engine.rendered == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.perf_counter()
        r = httpx.get(f"http://127.0.0.1:{port}/healthz")
        health = time.perf_counter() - start
        chat.join(10)
    assert r.status_code == 200
    assert health < 0.3, f"/healthz took {health:.2f} s while a prompt was tokenised"
