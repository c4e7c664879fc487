"""Feedback over HTTP: thumbs, pairwise, idempotency, every error case, batches, group commit."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from service.store import Feedback
from tests.conftest import OTHER_KEY, READONLY_KEY, auth

QUESTION = [{"role": "user", "content": "Where is my parcel?"}]


async def chat(client, n=1, messages=QUESTION, headers=None) -> str:
    r = await client.post(
        "/v1/chat/completions", json={"messages": messages, "n": n}, headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def snapshot(store) -> list[tuple]:
    """Every stored feedback row, to show that a refused request changed nothing."""
    with store.reading() as s:
        return [
            (f.id, f.kind, f.rating, f.winner, f.a_generation_id, f.comment)
            for f in s.scalars(select(Feedback).order_by(Feedback.id))
        ]


async def test_thumbs_are_stored_with_provenance(client, store):
    rid = await chat(client, n=2)
    r = await client.post(
        "/v1/feedback",
        json={
            "type": "thumbs",
            "response_id": rid,
            "choice_index": 1,
            "rating": "down",
            "comment": "too long",
            "correction": "Track it under Orders > Track parcel.",
            "user_id": "u-42",
        },
    )
    assert r.status_code == 201, r.text
    ack = r.json()
    assert ack["object"] == "feedback" and ack["replayed"] is False
    with store.reading() as s:
        row = s.get(Feedback, ack["id"])
        assert (row.kind, row.rating, row.a_generation_id, row.a_choice_index) == (
            "thumbs",
            "down",
            rid,
            1,
        )
        assert row.correction == "Track it under Orders > Track parcel."
        assert (row.user_id, row.api_key, row.a_model_version) == ("u-42", "app", "base")


async def test_pairwise_within_and_across_responses(client, store):
    rid = await chat(client, n=2)
    other = await chat(client)
    within = {
        "type": "pairwise",
        "a": {"response_id": rid, "choice_index": 0},
        "b": {"response_id": rid, "choice_index": 1},
        "winner": "b",
    }
    across = {
        "type": "pairwise",
        "a": {"response_id": rid},
        "b": {"response_id": other},
        "winner": "tie",
    }
    for body in (within, across, {**across, "winner": "both_bad"}):
        r = await client.post("/v1/feedback", json=body)
        assert r.status_code == 201, r.text
    assert [row[3] for row in snapshot(store)].count("tie") == 1
    assert len(snapshot(store)) == 3


async def test_idempotent_retry_returns_first_result(client, store):
    rid = await chat(client)
    body = {"type": "thumbs", "response_id": rid, "rating": "up"}
    first = await client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"})
    again = await client.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["replayed"] is True
    assert len(snapshot(store)) == 1


async def test_concurrent_retries_store_once(client, store):
    rid = await chat(client)
    body = {"type": "thumbs", "response_id": rid, "rating": "up", "idempotency_key": "same"}
    replies = await asyncio.gather(*[client.post("/v1/feedback", json=body) for _ in range(8)])
    assert {r.json()["id"] for r in replies} == {replies[0].json()["id"]}
    assert sorted(r.status_code for r in replies) == [200] * 7 + [201]
    assert len(snapshot(store)) == 1


async def refused(client, store, body, status, param, headers=None) -> dict:
    """Post a bad event: check status, error shape and that the stored feedback is unchanged."""
    before = snapshot(store)
    r = await client.post("/v1/feedback", json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]
    assert snapshot(store) == before
    return err


async def test_error_cases_change_nothing(client, store):
    rid = await chat(client, n=2)
    theirs = await chat(client, headers=auth(OTHER_KEY))
    unrelated = await chat(client, messages=[{"role": "user", "content": "Reset my password"}])
    base = {"type": "thumbs", "response_id": rid, "rating": "up"}
    ok = {**base, "idempotency_key": "k"}
    assert (await client.post("/v1/feedback", json=ok)).status_code == 201

    err = await refused(client, store, {**base, "response_id": "chatcmpl-nope"}, 404, "response_id")
    assert err["type"] == "not_found_error"
    err = await refused(client, store, {**base, "response_id": theirs}, 403, "response_id")
    assert err["type"] == "permission_error"
    err = await refused(client, store, {**ok, "rating": "down"}, 409, "idempotency_key")
    assert err["code"] == "idempotency_key_reused"
    await refused(client, store, {**base, "rating": "meh"}, 422, "rating")
    await refused(client, store, {**base, "choice_index": 2}, 422, "choice_index")
    await refused(client, store, {"type": "thumbs", "rating": "up"}, 422, "response_id")
    await refused(client, store, {"type": "stars", "response_id": rid}, 422, None)
    pair = {
        "type": "pairwise",
        "a": {"response_id": rid},
        "b": {"response_id": unrelated},
        "winner": "a",
    }
    err = await refused(client, store, pair, 422, "b.response_id")
    assert err["code"] == "different_conversations"
    await refused(client, store, {**pair, "b": {"response_id": rid}}, 422, "b")
    await refused(
        client, store, {**pair, "b": {"response_id": "chatcmpl-nope"}}, 404, "b.response_id"
    )
    await refused(client, store, {**pair, "winner": "c"}, 422, "winner")
    await refused(client, store, base, 401, None, headers=auth("sk-not-a-real-key-000000"))
    await refused(client, store, ok, 422, "idempotency_key", headers={"Idempotency-Key": "other"})


async def test_feedback_scope(client, store):
    rid = await chat(client)
    body = {"type": "thumbs", "response_id": rid, "rating": "up"}
    # The voter key has the feedback scope but did not ask for this response.
    r = await client.post("/v1/feedback", json=body, headers=auth(READONLY_KEY))
    assert r.status_code == 403 and r.json()["error"]["code"] == "response_not_yours"


async def test_batch_reports_each_event(client, store):
    rid = await chat(client, n=2)
    events = [
        {"type": "thumbs", "response_id": rid, "rating": "up", "idempotency_key": "b1"},
        {"type": "thumbs", "response_id": rid, "rating": "sideways"},
        {"type": "thumbs", "response_id": "chatcmpl-missing", "rating": "up"},
        {
            "type": "pairwise",
            "a": {"response_id": rid},
            "b": {"response_id": rid, "choice_index": 1},
            "winner": "a",
        },
        {"type": "thumbs", "response_id": rid, "rating": "up", "idempotency_key": "b1"},
    ]
    r = await client.post("/v1/feedback/batch", json={"events": events})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2, 3, 4]
    assert [d["status"] for d in data] == [201, 422, 404, 201, 200]
    assert data[1]["error"]["param"] == "events.1.rating"
    assert data[2]["error"]["param"] == "response_id"
    assert data[4]["feedback"]["id"] == data[0]["feedback"]["id"]
    assert len(snapshot(store)) == 2


async def test_batch_reads_each_events_own_generation_and_key(client, store):
    # One transaction loads every referenced generation and idempotency key at once: each event
    # must still get its own answer, owner check, earlier key and in-batch key.
    mine = [await chat(client, n=2), await chat(client)]
    theirs = await chat(client, headers=auth(OTHER_KEY))
    earlier = {"type": "thumbs", "response_id": mine[1], "rating": "down", "idempotency_key": "e"}
    first = await client.post("/v1/feedback", json=earlier)
    assert first.status_code == 201
    events = [
        {"type": "thumbs", "response_id": mine[0], "choice_index": 1, "rating": "up"},
        {"type": "thumbs", "response_id": theirs, "rating": "up"},
        earlier,
        {**earlier, "rating": "up"},
        {"type": "thumbs", "response_id": mine[1], "choice_index": 1, "rating": "up"},
        {"type": "thumbs", "response_id": mine[1], "rating": "up", "idempotency_key": "n"},
        {"type": "thumbs", "response_id": mine[0], "rating": "up", "idempotency_key": "n"},
    ]
    r = await client.post("/v1/feedback/batch", json={"events": events})
    data = r.json()["data"]
    assert [d["status"] for d in data] == [201, 403, 200, 409, 422, 201, 409]
    assert data[2]["feedback"]["id"] == first.json()["id"]
    assert data[4]["error"]["param"] == "choice_index"
    with store.reading() as s:
        stored = {
            f.id: (f.a_generation_id, f.a_choice_index, f.rating)
            for f in s.scalars(select(Feedback))
        }
    assert stored[data[0]["feedback"]["id"]] == (mine[0], 1, "up")
    assert stored[data[5]["feedback"]["id"]] == (mine[1], 0, "up")
    assert len(stored) == 3


async def test_batch_envelope_is_validated(client, store):
    r = await client.post("/v1/feedback/batch", json={"events": []})
    assert r.status_code == 422 and r.json()["error"]["param"] == "events"


@pytest.mark.parametrize("n_events", [64])
async def test_concurrent_feedback_shares_commits(client, store, monkeypatch, n_events):
    rid = await chat(client)
    writer = client._transport.app.state.writer
    before = writer.batches
    sizes: list[int] = []
    write_batch = store.write_batch

    def first_commit_waits(ops):
        # The first commit is held until every other write is queued behind it, so the count does
        # not depend on how fast requests reach the writer: whatever queued during a commit must
        # then ride the next one, all of it (64 is under the app's 256 per commit).
        sizes.append(len(ops))
        deadline = time.monotonic() + 10
        while len(sizes) == 1 and len(ops) + writer._queue.qsize() < n_events:
            assert time.monotonic() < deadline, "the writes never all reached the writer's queue"
            time.sleep(0.005)
        return write_batch(ops)

    monkeypatch.setattr(store, "write_batch", first_commit_waits)
    body = {"type": "thumbs", "response_id": rid, "rating": "up"}
    replies = await asyncio.gather(
        *[client.post("/v1/feedback", json=body) for _ in range(n_events)]
    )
    assert all(r.status_code == 201 for r in replies)
    assert len(snapshot(store)) == n_events
    # The writes that came first, then all the rest in one commit (one commit if all came first).
    assert sum(sizes) == n_events and len(sizes) <= 2, sizes
    assert writer.batches - before == len(sizes)
