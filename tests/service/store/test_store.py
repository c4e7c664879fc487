"""The store on SQLite and PostgreSQL: migrations, savepoints, durability, group commit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect

from service.store import Generation, GenerationChoice, GroupCommitWriter, Store


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
    assert isinstance(results[1], Exception)
    assert store.count(Generation) == 2
    assert store.get_generation("g1").choices[0].text == "hello"


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
    with pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"):
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
