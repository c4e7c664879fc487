"""The loop benchmark's clock start: when the snapshot's Nth training pair became available, from
the feedback behind each pair in a real store (SQLite, and PostgreSQL with the marker)."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from bench.loop import _ts, nth_pair_time
from service.store import Feedback, Generation, PreferenceSnapshot, Store

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def write_feedback(store: Store, arrived: dict[str, float]) -> None:
    def op(session) -> None:
        session.add(
            Generation(
                id="g1",
                api_key="app",
                model="prefloop",
                model_version="base",
                conversation_hash="h" * 64,
                messages=[{"role": "user", "content": "hi"}],
                sampling={"n": 2},
                prompt_token_ids=[1],
                stream=False,
                created_at=T0,
                completed_at=T0,
            )
        )
        session.flush()
        for fid, seconds in arrived.items():
            session.add(
                Feedback(
                    id=fid,
                    kind="pairwise",
                    api_key="app",
                    request_hash=fid,
                    a_generation_id="g1",
                    a_choice_index=0,
                    a_model_version="base",
                    b_generation_id="g1",
                    b_choice_index=1,
                    b_model_version="base",
                    winner="a",
                    created_at=at(seconds),
                )
            )

    store.write_one(op)


def write_snapshot(store: Store, data_dir: Path, provenance: dict[str, list[dict]]) -> str:
    folder = data_dir / "snapshots" / "snap-1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"id": "snap-1", "provenance": provenance}))

    def op(session) -> None:
        session.add(
            PreferenceSnapshot(
                id="snap-1",
                path="snapshots/snap-1",
                content_hash="0" * 64,
                counts={},
                feedback_ids=[],
                created_at=at(100),
            )
        )

    store.write_one(op)
    return "snap-1"


def pair(*feedback_ids: str) -> dict[str, list[str]]:
    """One pair's provenance as a snapshot's manifest keeps it (model versions are no feedback)."""
    return {
        "feedback_ids": list(feedback_ids),
        "chosen_model_versions": ["base"],
        "rejected_model_versions": ["base"],
    }


def test_nth_pair_is_ready_when_its_newest_vote_arrived(store: Store, tmp_path: Path) -> None:
    write_feedback(store, {"f1": 10, "f2": 20, "f3": 30, "f4": 50, "f5": 40, "f6": 1})
    snapshot = write_snapshot(
        store,
        tmp_path,
        {
            # Ready at 30 (its second vote), 20, and 50 (the later of 50 and 40).
            "pairs_train": [pair("f1", "f3"), pair("f2"), pair("f4", "f5")],
            # Held out: never trained on, so it starts no clock, however early it came.
            "pairs_heldout": [pair("f6")],
        },
    )
    ctx = SimpleNamespace(store=store, settings=SimpleNamespace(data_dir=tmp_path))
    # In time order the pairs were ready at 20, 30, 50; asking for more pairs than the snapshot
    # holds gives the last.
    for n, seconds in ((1, 20), (2, 30), (3, 50), (64, 50)):
        assert nth_pair_time(ctx, snapshot, n) == at(seconds).timestamp(), n


def test_naive_times_are_read_as_utc() -> None:
    # SQLite hands back naive datetimes of what the store wrote in UTC.
    assert _ts(datetime(2026, 1, 5, 9, 0)) == T0.timestamp()
    assert _ts(T0.astimezone(UTC)) == T0.timestamp()
