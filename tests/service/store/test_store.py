"""The store on SQLite and PostgreSQL: migrations, savepoints, durability, group commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from service.store import (
    DatabaseUnreachable,
    Generation,
    GenerationChoice,
    GroupCommitWriter,
    Store,
)


def generation(gid: str, text: str = "hello") -> list:
    now = datetime.now(UTC)
    return [
        Generation(
            id=gid,
            api_key="app",
            model="prefloop",
            model_version="base",
            conversation_hash="h" * 64,
            messages=[{"role": "user", "content": "hi"}],
            sampling={"n": 1},
            prompt_token_ids=[1, 2],
            stream=False,
            created_at=now,
            completed_at=now,
        ),
        GenerationChoice(
            generation_id=gid, index=0, text=text, token_ids=[3, 4], finish_reason="stop"
        ),
    ]


def add(gid: str, text: str = "hello"):
    def op(session):
        session.add(generation(gid, text)[0])
        session.flush()
        session.add(generation(gid, text)[1])
        return gid

    return op


def test_migrations_create_tables_and_are_idempotent(store):
    store.upgrade()
    tables = set(inspect(store._write_engine).get_table_names())
    assert {"generations", "generation_choices", "feedback", "alembic_version"} <= tables


def test_a_failing_write_rolls_back_alone(store):
    results = store.write_batch([add("g1"), add("g1"), add("g2")])
    assert results[0] == "g1" and results[2] == "g2"
    # The second "g1" breaks the primary key; its error is returned in its place.
    assert isinstance(results[1], IntegrityError), repr(results[1])
    assert store.count(Generation) == 2
    assert store.get_generation("g1").choices[0].text == "hello"


def test_staged_writes_insert_together_and_a_conflict_is_answered_alone(store):
    from service.auth import Principal
    from service.feedback import FeedbackWrite, parse_event
    from service.store import Feedback

    store.write_batch([add("g1"), add("g2")])
    voter = Principal("app", frozenset({"feedback"}))

    def vote(gid: str, key: str) -> FeedbackWrite:
        body = {"type": "thumbs", "response_id": gid, "rating": "up", "idempotency_key": key}
        return FeedbackWrite(voter, parse_event(body))

    staged = store.write_batch([vote("g1", "k1"), vote("g2", "k2"), vote("nope", "k3")])
    assert [type(r).__name__ for r in staged] == ["Stored", "Stored", "NotFound"]
    assert store.count(Feedback) == 2

    # Another writer stores key "k4" after this batch read its keys, before the batch's INSERT:
    # the multi-row INSERT conflicts, and the batch is written again op by op, where the vote
    # with "k4" is answered as a retry of the other writer's row and the rest are stored.
    class Rival:
        prefetch_calls = 0

        @classmethod
        def prefetch(cls, session, ops):
            cls.prefetch_calls += 1

        def __call__(self, session):
            row = Feedback(
                id=f"fb-rival-{Rival.prefetch_calls}",
                kind="thumbs",
                api_key="app",
                idempotency_key="k4",
                request_hash=vote("g1", "k4").digest,
                a_generation_id="g1",
                a_choice_index=0,
                a_model_version="base",
                rating="up",
                created_at=datetime.now(UTC),
            )
            session.add(row)
            return "rival"

    results = store.write_batch([vote("g2", "k5"), Rival(), vote("g1", "k4"), vote("g2", "k6")])
    assert Rival.prefetch_calls == 2
    assert results[1] == "rival"
    assert [results[i].ack.replayed for i in (0, 2, 3)] == [False, True, False]
    with store.reading() as s:
        keys = {f.idempotency_key: f.id for f in s.query(Feedback)}
    assert sorted(keys) == ["k1", "k2", "k4", "k5", "k6"]
    assert results[2].ack.id == keys["k4"] == "fb-rival-2"


def test_acknowledged_writes_survive_reopening(store):
    store.write_batch([add("g1", "kept")])
    store.close()
    reopened = Store(store.url)
    try:
        assert reopened.get_generation("g1").choices[0].text == "kept"
    finally:
        reopened.close()


async def test_group_commit_batches_concurrent_writes(store):
    writer = GroupCommitWriter(store, max_batch=16)
    ids = await asyncio.gather(*[writer.submit(add(f"g{i}")) for i in range(40)])
    assert ids == [f"g{i}" for i in range(40)]
    assert store.count(Generation) == 40
    assert 3 <= writer.batches < 40  # at most 16 per commit, and far fewer commits than writes
    with pytest.raises(IntegrityError, match=r"UNIQUE|unique|duplicate"):
        await writer.submit(add("g0"))
    await writer.close()


@pytest.mark.postgres
def test_sqlite_and_postgres_agree(postgres_url, tmp_path):
    stores = [Store(f"sqlite:///{tmp_path / 'a.db'}"), Store(postgres_url)]
    try:
        for s in stores:
            s.upgrade()
            s.write_batch([add("g1", "same"), add("g2", "text")])
        rows = [
            [(g.id, g.choices[0].text, g.messages) for g in map(s.get_generation, ["g1", "g2"])]
            for s in stores
        ]
        assert rows[0] == rows[1]
    finally:
        for s in stores:
            s.close()


def test_a_sqlite_file_that_cannot_be_opened_is_named(tmp_path):
    store = Store(f"sqlite:///{tmp_path}")  # a folder, not a database file
    with pytest.raises(DatabaseUnreachable) as exc:
        store.upgrade()
    assert str(exc.value) == (
        f"cannot open the database at {tmp_path} (unable to open database file); "
        "check PREFLOOP_DATABASE_URL and PREFLOOP_DATA_DIR"
    )


@pytest.mark.postgres
def test_a_refused_postgres_login_names_host_port_and_cause_not_the_password():
    store = Store("postgresql+psycopg://no_such_role:s3cret-pw@127.0.0.1:5432/prefloop")
    with pytest.raises(DatabaseUnreachable) as exc:
        store.upgrade()
    assert str(exc.value) == (
        'cannot reach the database at 127.0.0.1:5432 (role "no_such_role" does not exist); '
        "check PREFLOOP_DATABASE_URL"
    )
