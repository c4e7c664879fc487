"""Chat completions over HTTP against the fake engine: OpenAI's shapes, validation, recording."""

from __future__ import annotations

import json

import pytest

from service.store import Generation
from tests.conftest import ADMIN_KEY, CHAT_KEY, READONLY_KEY, auth
from tests.fakes import FakeEngine

QUESTION = [{"role": "user", "content": "How do I cancel my subscription?"}]


def parse_sse(body: str) -> tuple[list[dict], bool]:
    """The data events of an SSE body and whether it ended with [DONE]; comments are skipped."""
    events, done = [], False
    for block in body.strip().split("\n\n"):
        if block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        if payload == "[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    return events, done


async def test_completion_shape_and_record(client, store, engine):
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.headers["Prefloop-Record"] == "stored"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"] == engine.version
    prompt = "".join(chr(t) for t in engine.render_prompt(QUESTION))
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == [FakeEngine.answer(prompt, i, 7) for i in range(2)]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert usage["completion_tokens"] == sum(len(t) for t in texts)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    gen = store.get_generation(body["id"])
    assert gen is not None
    assert gen.api_key == "app" and gen.model_version == "base" and gen.stream is False
    assert gen.messages == QUESTION
    assert gen.sampling["n"] == 2 and gen.sampling["seed"] == 7
    assert [c.text for c in gen.choices] == texts
    assert [c.token_ids for c in gen.choices] == [[ord(ch) for ch in t] for t in texts]
    assert gen.created_at <= gen.completed_at


async def test_token_limit_and_stop(client, store):
    r = await client.post(
        "/v1/chat/completions", json={"messages": QUESTION, "max_completion_tokens": 10}
    )
    choice = r.json()["choices"][0]
    assert len(choice["message"]["content"]) == 10 and choice["finish_reason"] == "length"
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "stop": ["(variant"]})
    assert r.json()["choices"][0]["message"]["content"] == "Answer 0 "
    assert store.get_generation(r.json()["id"]).sampling["stop"] == ["(variant"]


async def test_stream_chunks_concatenate_to_stored_text(client, store):
    r = await client.post(
        "/v1/chat/completions",
        json={
            "messages": QUESTION,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events, done = parse_sse(r.text)
    assert done
    # The record's outcome, in-band: the headers left before it was written.
    assert r.text.endswith(": prefloop-record: stored\n\ndata: [DONE]\n\n")
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    texts, finishes = ["", ""], [None, None]
    for e in events[:-1]:
        assert e["object"] == "chat.completion.chunk" and e["usage"] is None
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            finishes[c["index"]] = c["finish_reason"] or finishes[c["index"]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert finishes == ["stop", "stop"]
    usage = events[-1]
    assert usage["choices"] == []
    gen = store.get_generation(ids.pop())
    assert gen.stream is True
    assert [c.text for c in gen.choices] == texts
    assert usage["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in gen.choices)


async def test_models_lists_served_version(client):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == "prefloop"
    assert r.json()["data"][0]["version"] == "base"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION, "n": 5}, "n"),
        ({"messages": QUESTION, "temperature": 2.5}, "temperature"),
        ({"messages": QUESTION, "top_p": 0}, "top_p"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "Hi"}]}, "messages"),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": QUESTION, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
async def test_invalid_request_names_the_field(client, store, body, param):
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == param
    assert err["type"] == "invalid_request_error" and param in err["message"]
    assert store.count(Generation) == 0


async def test_context_length_exceeded(client, store):
    long = [{"role": "user", "content": "x" * 3000}]
    r = await client.post("/v1/chat/completions", json={"messages": long})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 5000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert store.count(Generation) == 0


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Authorization": ""}, 401, "missing_api_key"),
        (auth("sk-not-a-real-key-000000"), 401, "invalid_api_key"),
        (auth(READONLY_KEY), 403, "insufficient_scope"),
    ],
)
async def test_auth_errors(client, store, headers, status, code):
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION}, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert store.count(Generation) == 0


async def test_admin_key_may_chat(client):
    r = await client.post(
        "/v1/chat/completions", json={"messages": QUESTION}, headers=auth(ADMIN_KEY)
    )
    assert r.status_code == 200


async def test_dead_engine_is_503_and_not_ready(client, engine, store):
    engine.dead = True
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert (await client.get("/readyz")).status_code == 503
    assert (await client.get("/healthz")).status_code == 200
    assert store.count(Generation) == 0


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no sample {name}{labels} in /metrics:\n{text}")


async def test_metrics_count_requests_and_tokens(client):
    usages = []
    for body in ({"messages": QUESTION}, {"messages": QUESTION, "n": 2, "seed": 3}):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        usages.append(r.json()["usage"])
    text = (await client.get("/metrics")).text
    assert 'prefloop_requests_total{route="/v1/chat/completions",status="200"} 2.0' in text
    # The token counters add up what each response reported (n=2: both choices' tokens).
    for kind in ("prompt", "completion"):
        expected = sum(u[f"{kind}_tokens"] for u in usages)
        counted = metric_value(text, "prefloop_tokens_total", kind=kind, model_version="base")
        assert counted == expected > 0, kind
    assert "prefloop_engine_requests_in_flight 0.0" in text


async def test_text_content_parts_are_what_the_model_reads_and_the_store_keeps(
    client, store, engine
):
    """The official client sends content as a list of parts; the model reads (and the store
    keeps) the text parts joined by newlines, the same conversation as that string."""
    from openai import AsyncOpenAI

    openai = AsyncOpenAI(base_url="http://test/v1", api_key=CHAT_KEY, http_client=client)
    parts = [{"type": "text", "text": "How do I cancel"}, {"type": "text", "text": "my plan?"}]
    done = await openai.chat.completions.create(
        model="prefloop",
        messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        seed=3,
    )
    as_text = [{"role": "user", "content": "How do I cancel\nmy plan?"}]
    prompt = "".join(chr(t) for t in engine.render_prompt(as_text))
    assert done.choices[0].message.content == FakeEngine.answer(prompt, 0, 3)
    gen = store.get_generation(done.id)
    assert gen is not None and gen.messages == as_text
    assert (gen.sampling["presence_penalty"], gen.sampling["frequency_penalty"]) == (0.5, -0.25)
    plain = await client.post("/v1/chat/completions", json={"messages": as_text})
    other = store.get_generation(plain.json()["id"])
    assert other is not None and other.conversation_hash == gen.conversation_hash


@pytest.mark.parametrize(
    ("change", "param", "code"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0",
            "unsupported_content_part",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"logit_bias": {"42": 5}}, "logit_bias", None),
    ],
)
async def test_what_would_change_the_answer_and_is_not_served_is_a_400(
    client, store, change, param, code
):
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["code"] == (code or "unsupported_parameter")
    assert store.count(Generation) == 0


async def test_fields_that_ask_for_what_is_served_anyway_are_accepted(client):
    body = {"messages": QUESTION, "response_format": {"type": "text"}, "logprobs": False}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text


async def test_logprobs_of_the_answer_and_the_likeliest_tokens(client, store):
    body = {"messages": QUESTION, "logprobs": True, "top_logprobs": 2, "max_tokens": 12}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    for t in tokens:
        assert t["logprob"] == FakeEngine.logprob_of(t["token"])
        assert t["bytes"] == list(t["token"].encode())
        tops = t["top_logprobs"]
        assert [x["token"] for x in tops][:1] == [t["token"]] and len(tops) == 2
        assert tops[0]["logprob"] > tops[1]["logprob"]
    assert store.get_generation(r.json()["id"]).sampling["logprobs"] == 2

    plain = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert plain.json()["choices"][0]["logprobs"] is None
    alone = await client.post("/v1/chat/completions", json={"messages": QUESTION, "logprobs": True})
    assert all(t["top_logprobs"] == [] for t in alone.json()["choices"][0]["logprobs"]["content"])


async def test_streamed_logprobs_follow_the_deltas(client):
    body = {"messages": QUESTION, "logprobs": True, "top_logprobs": 1, "stream": True, "n": 2}
    r = await client.post("/v1/chat/completions", json=body)
    events, done = parse_sse(r.text)
    assert done
    texts, tokens = ["", ""], ["", ""]
    for e in events[1:]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            tokens[c["index"]] += "".join(t["token"] for t in c["logprobs"]["content"])
    assert texts == tokens and all(texts)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ],
)
async def test_top_logprobs_needs_logprobs_and_a_bound(client, change, param):
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, **change})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param


SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("response_format", "recorded"),
    [
        ({"type": "json_object"}, (True, None)),
        (
            {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}},
            (False, SCHEMA),
        ),
    ],
    ids=["json_object", "json_schema"],
)
async def test_json_answers_and_their_format_in_the_record(
    client, store, response_format, recorded
):
    body = {"messages": QUESTION, "response_format": response_format}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    answer = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(answer) == {"answer"}
    sampling = store.get_generation(r.json()["id"]).sampling
    assert (sampling["json_object"], sampling["json_schema"]) == recorded


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
            "response_format.json_schema",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            "response_format.json_schema.schema",
        ),
        ({"type": "xml"}, "response_format.type"),
    ],
)
async def test_a_response_format_that_cannot_be_followed_is_a_422(
    client, store, response_format, param
):
    r = await client.post(
        "/v1/chat/completions", json={"messages": QUESTION, "response_format": response_format}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param
    assert store.count(Generation) == 0
