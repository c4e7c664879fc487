"""Chat and feedback through a database outage, on SQLite: the database really goes away (its
folder is moved and the pooled connections closed, so every new connection fails to open the file)
and comes back; the journal carries the writes across, and replays them in order, exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from service.app import AppOptions, build_app
from service.auth import Authenticator, Principal
from service.chat import GenerationRecord
from service.errors import Overloaded
from service.feedback import FeedbackWrite, parse_event
from service.settings import JournalSettings
from service.store import Feedback, Generation, GroupCommitWriter, Journal, Store
from service.store.journal import REJECTED, Entry
from tests.conftest import KEYS, auth, base_registry
from tests.fakes import FakeEngine
from tests.service.test_chat import parse_sse

QUESTION = [{"role": "user", "content": "Where is my parcel?"}]
CHAT_KEY = KEYS[0].key.get_secret_value()


class SqliteOutage:
    """Takes a SQLite database away for real and brings it back."""

    def __init__(self, store: Store, folder: Path):
        self.store, self.folder, self.away = store, folder, folder.with_name("db-away")

    def begin(self) -> None:
        self.folder.rename(self.away)
        self.store.close()  # pooled connections keep the moved file open; new ones cannot

    def end(self) -> None:
        self.away.rename(self.folder)


@dataclass
class Service:
    client: httpx.AsyncClient
    store: Store
    writer: GroupCommitWriter
    outage: SqliteOutage
    journal_dir: Path


def sqlite_store(folder: Path) -> Store:
    store = Store(f"sqlite:///{folder / 'prefloop.db'}")
    store.upgrade()
    return store


async def serve(tmp_path: Path, journal: JournalSettings, **kw) -> AsyncIterator[Service]:
    store = sqlite_store(tmp_path / "db")
    registry = base_registry(store, tmp_path / "data")
    app = build_app(FakeEngine(), registry, Authenticator(KEYS), AppOptions(journal=journal, **kw))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        client.headers.update(auth(CHAT_KEY))
        yield Service(
            client,
            store,
            app.state.writer,
            SqliteOutage(store, tmp_path / "db"),
            tmp_path / "data" / "journal",
        )
    await app.state.writer.close()
    store.close()


@pytest.fixture
async def service(tmp_path) -> AsyncIterator[Service]:
    settings = JournalSettings(probe_interval_s=0.05, orphan_grace_s=0)
    async for s in serve(tmp_path, settings):
        yield s


async def drained(writer: GroupCommitWriter, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while writer.journaling:
        assert time.monotonic() < deadline, "the journal was not replayed"
        await asyncio.sleep(0.02)


async def test_chat_and_feedback_are_answered_through_an_outage(service: Service):
    client, store, writer = service.client, service.store, service.writer
    before = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert before.headers["Prefloop-Record"] == "stored"
    service.outage.begin()

    r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2})
    assert r.status_code == 200 and r.headers["Prefloop-Record"] == "journaled"
    assert writer.journaling
    rid = r.json()["id"]
    stream = await client.post("/v1/chat/completions", json={"messages": QUESTION, "stream": True})
    assert stream.status_code == 200
    assert ": prefloop-record: journaled\n\n" in stream.text
    stream_id = parse_sse(stream.text)[0][0]["id"]

    vote = {"type": "thumbs", "response_id": rid, "choice_index": 1, "rating": "up"}
    first = await client.post("/v1/feedback", json=vote, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202, first.text
    assert first.json()["queued"] is True and first.json()["replayed"] is False
    retry = await client.post("/v1/feedback", json=vote, headers={"Idempotency-Key": "k1"})
    assert retry.status_code == 202
    assert retry.json()["id"] == first.json()["id"] and retry.json()["replayed"] is True
    reused = await client.post(
        "/v1/feedback", json={**vote, "rating": "down"}, headers={"Idempotency-Key": "k1"}
    )
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    older = await client.post(
        "/v1/feedback",
        json={"type": "thumbs", "response_id": before.json()["id"], "rating": "down"},
    )
    nowhere = await client.post(
        "/v1/feedback", json={"type": "thumbs", "response_id": "chatcmpl-nope", "rating": "up"}
    )
    pair = {
        "type": "pairwise",
        "a": {"response_id": rid},
        "b": {"response_id": rid, "choice_index": 1},
        "winner": "b",
    }
    batch = await client.post(
        "/v1/feedback/batch", json={"events": [pair, {"type": "thumbs", "response_id": stream_id}]}
    )
    assert [older.status_code, nowhere.status_code] == [202, 202]
    items = batch.json()["data"]
    assert [i["status"] for i in items] == [202, 422] and items[0]["feedback"]["queued"]
    # A write that cannot be journaled (not serialisable) is refused while the database is away.
    with pytest.raises(Overloaded, match="unreachable"):
        await writer.submit(lambda session: None)
    with pytest.raises(OperationalError, match="unable to open"):
        store.count(Generation)  # the database really is gone

    service.outage.end()
    await drained(writer)
    assert store.count(Generation) == 3
    assert {g for g in (rid, stream_id) if store.get_generation(g) is not None} == {rid, stream_id}
    with store.reading() as s:
        stored = {
            f.id: (f.a_generation_id, f.rating, f.winner) for f in s.scalars(select(Feedback))
        }
    assert stored == {
        first.json()["id"]: (rid, "up", None),
        older.json()["id"]: (before.json()["id"], "down", None),
        items[0]["feedback"]["id"]: (rid, None, "b"),
    }
    [line] = (service.journal_dir / REJECTED).read_text().splitlines()
    rejected = json.loads(line)
    assert rejected["reason"]["code"] == "response_not_found"
    assert rejected["data"]["id"] == nowhere.json()["id"]
    assert sorted(p.suffix for p in service.journal_dir.iterdir()) == [
        ".journal",
        ".jsonl",
        ".lock",
    ]
    assert writer._journal is not None and writer._journal.size == 0

    # Back to normal: stored, and the journaled key is answered from the database.
    after = await client.post("/v1/feedback", json=vote, headers={"Idempotency-Key": "k1"})
    assert after.status_code == 200 and after.json()["id"] == first.json()["id"]
    again = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    assert again.headers["Prefloop-Record"] == "stored"
    metrics = (await client.get("/metrics")).text
    assert "prefloop_store_outage 0.0" in metrics
    assert 'prefloop_journal_records_total{outcome="replayed"} 5.0' in metrics
    assert 'prefloop_journal_records_total{outcome="rejected"} 1.0' in metrics


async def test_a_full_journal_refuses_feedback_and_chat_drops_its_record(tmp_path):
    # Smaller than one record: nothing fits (a real cap is at least 1 MiB).
    tiny = JournalSettings.model_construct(max_bytes=64, probe_interval_s=0.05, orphan_grace_s=0)
    async for service in serve(tmp_path, tiny):
        service.outage.begin()
        r = await service.client.post("/v1/chat/completions", json={"messages": QUESTION})
        assert r.status_code == 200 and r.headers["Prefloop-Record"] == "dropped"
        vote = {"type": "thumbs", "response_id": r.json()["id"], "rating": "up"}
        refused = await service.client.post("/v1/feedback", json=vote)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["code"] == "journal_full"
        service.outage.end()
        await drained(service.writer)
        assert service.store.count(Generation) == 0 and service.store.count(Feedback) == 0


async def test_a_full_write_queue_answers_503_with_retry_after(tmp_path):
    async for service in serve(tmp_path, JournalSettings(), write_queue_max=2):
        rid = (
            await service.client.post("/v1/chat/completions", json={"messages": QUESTION})
        ).json()
        vote = {"type": "thumbs", "response_id": rid["id"], "rating": "up"}
        r = await service.client.post("/v1/feedback/batch", json={"events": [vote] * 3})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["code"] == "write_queue_full"
        assert service.store.count(Feedback) == 0
        ok = await service.client.post("/v1/feedback/batch", json={"events": [vote] * 2})
        assert [i["status"] for i in ok.json()["data"]] == [201, 201]


# Replay of journals left by processes that died ------------------------------------------------

VOTER = Principal("app", frozenset({"chat", "feedback"}))


def generation(gid: str) -> GenerationRecord:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return GenerationRecord(
        id=gid,
        api_key="app",
        model="prefloop",
        model_version="base",
        messages=QUESTION,
        sampling={"n": 1},
        prompt_token_ids=[1, 2],
        stream=False,
        created_at=now,
        completed_at=now,
        choices=[("hello", [3, 4], "stop")],
    )


def vote(gid: str, rating: str = "up", key: str | None = None) -> FeedbackWrite:
    body = {"type": "thumbs", "response_id": gid, "rating": rating, "idempotency_key": key}
    return FeedbackWrite(VOTER, parse_event(body))


def dead_journal(folder: Path, ops: list) -> None:
    """A journal holding `ops`, whose process died (its lock is free, its file stays)."""
    journal = Journal(folder, max_bytes=2**20)
    journal.append([Entry(op.kind, time.time(), op.to_record()).frame() for op in ops])
    journal.release(remove=False)


def writer_for(store: Store, folder: Path, grace: float = 600.0) -> GroupCommitWriter:
    return GroupCommitWriter(
        store,
        journal=Journal(folder, max_bytes=2**20),
        kinds=(GenerationRecord, FeedbackWrite),
        probe_interval_s=0.05,
        orphan_grace_s=grace,
    )


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def journals(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.journal"))


async def test_a_crash_between_commit_and_compaction_replays_exactly_once(tmp_path):
    store = sqlite_store(tmp_path / "db")
    folder = tmp_path / "journal"
    ops = [generation("g1"), vote("g1"), vote("g1", "down", key="k"), vote("g1")]
    dead_journal(folder, ops)
    # The dead process had committed the first three, then died before compacting its journal.
    replayed = [type(op).from_record(op.to_record()) for op in ops]
    store.write_batch(replayed[:1])
    store.write_batch(replayed[1:3])
    assert store.count(Feedback) == 2

    writer = writer_for(store, folder)
    writer.start()
    await until(lambda: len(journals(folder)) == 1)  # the adopted one is replayed and removed
    await writer.close()
    with store.reading() as s:
        ids = sorted(f.id for f in s.scalars(select(Feedback)))
    assert ids == sorted(op.id for op in ops[1:])
    assert store.count(Generation) == 1
    assert not (folder / REJECTED).exists()
    store.close()


async def test_replay_keeps_the_journals_order(tmp_path):
    store = sqlite_store(tmp_path / "db")
    folder = tmp_path / "journal"
    # One chunk: the votes follow the generation they name; of two events with one idempotency
    # key the first is stored and the second refused as a reused key.
    first, second = vote("g1", "up", key="k"), vote("g1", "down", key="k")
    dead_journal(folder, [generation("g1"), first, second, vote("g1", "down")])
    writer = writer_for(store, folder)
    writer.start()
    await until(lambda: len(journals(folder)) == 1)
    await writer.close()
    with store.reading() as s:
        rows = {f.id: f.rating for f in s.scalars(select(Feedback))}
    assert rows[first.id] == "up" and second.id not in rows and len(rows) == 2
    [line] = (folder / REJECTED).read_text().splitlines()
    assert json.loads(line)["reason"]["code"] == "idempotency_key_reused"
    store.close()


async def test_a_vote_waits_for_a_response_another_journal_holds(tmp_path):
    store = sqlite_store(tmp_path / "db")
    folder = tmp_path / "journal"
    early = vote("g-late")
    dead_journal(folder, [early])
    writer = writer_for(store, folder)
    writer.start()
    # Replayed, held back in this writer's own journal: its response is not stored yet.
    await until(lambda: writer._journal is not None and writer._journal.size > 0)
    assert store.count(Feedback) == 0 and not (folder / REJECTED).exists()
    # The replica that journaled the response dies too; its journal is adopted on the next pass.
    dead_journal(folder, [generation("g-late")])
    await until(lambda: store.count(Feedback) == 1)
    await until(lambda: writer._journal is not None and writer._journal.size == 0)
    with store.reading() as s:
        assert s.scalars(select(Feedback.id)).all() == [early.id]
    await writer.close()
    assert journals(folder) == [] and not (folder / REJECTED).exists()
    store.close()


async def test_a_retry_of_a_vote_stored_just_before_the_outage_keeps_its_id(service: Service):
    client, store = service.client, service.store
    answer = await client.post("/v1/chat/completions", json={"messages": QUESTION})
    vote = {"type": "thumbs", "response_id": answer.json()["id"], "rating": "up"}
    stored = await client.post("/v1/feedback", json=vote, headers={"Idempotency-Key": "late"})
    assert stored.status_code == 201
    service.outage.begin()
    await client.post("/v1/chat/completions", json={"messages": QUESTION})  # finds the outage
    assert service.writer.journaling
    retry = await client.post("/v1/feedback", json=vote, headers={"Idempotency-Key": "late"})
    assert retry.status_code == 202, retry.text
    assert retry.json()["id"] == stored.json()["id"] and retry.json()["replayed"] is True
    service.outage.end()
    await drained(service.writer)
    with store.reading() as s:
        ids = s.scalars(select(Feedback.id)).all()
    assert ids == [stored.json()["id"]]
