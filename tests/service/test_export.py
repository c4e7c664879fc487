"""Preference export: each format carries the voted pairs and thumbs, in order, from stored text."""

from __future__ import annotations

import json

from tests.conftest import ADMIN_KEY, CHAT_KEY, auth

QUESTION = [{"role": "user", "content": "How do I get a refund?"}]


async def vote_some(client) -> tuple[list[str], str]:
    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2})
    body = r.json()
    texts = [c["message"]["content"] for c in body["choices"]]
    rid = body["id"]
    events = [
        {
            "type": "pairwise",
            "a": {"response_id": rid, "choice_index": 0},
            "b": {"response_id": rid, "choice_index": 1},
            "winner": "b",
        },
        {
            "type": "pairwise",
            "a": {"response_id": rid, "choice_index": 0},
            "b": {"response_id": rid, "choice_index": 1},
            "winner": "tie",
        },
        {"type": "thumbs", "response_id": rid, "choice_index": 0, "rating": "up"},
        {
            "type": "thumbs",
            "response_id": rid,
            "choice_index": 1,
            "rating": "down",
            "correction": "Open Orders, choose the order, then Request refund.",
        },
    ]
    for e in events:
        assert (await client.post("/v1/feedback", json=e)).status_code == 201
    return texts, "Open Orders, choose the order, then Request refund."


async def export(client, fmt: str) -> list[dict]:
    r = await client.get(f"/v1/preferences/export?format={fmt}", headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in r.text.splitlines()]


def said(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


async def test_trl_pairs(client):
    (first, second), fix = await vote_some(client)
    rows = await export(client, "trl")
    assert rows == [
        {"prompt": QUESTION, "chosen": said(second), "rejected": said(first)},
        {"prompt": QUESTION, "chosen": said(fix), "rejected": said(second)},
    ]


async def test_openai_dpo_pairs(client):
    (first, second), fix = await vote_some(client)
    rows = await export(client, "openai-dpo")
    assert rows[0] == {
        "input": {"messages": QUESTION},
        "preferred_output": said(second),
        "non_preferred_output": said(first),
    }
    assert rows[1]["preferred_output"] == said(fix)
    assert len(rows) == 2


async def test_trl_kto_rows(client):
    (first, second), fix = await vote_some(client)
    rows = await export(client, "trl-kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [
        (first, True),
        (second, False),
        (fix, True),
    ]
    assert all(r["prompt"] == QUESTION for r in rows)


async def test_export_needs_admin_and_a_known_format(client):
    r = await client.get("/v1/preferences/export", headers=auth(CHAT_KEY))
    assert r.status_code == 403
    r = await client.get("/v1/preferences/export?format=csv", headers=auth(ADMIN_KEY))
    assert r.status_code == 422 and r.json()["error"]["param"] == "format"
