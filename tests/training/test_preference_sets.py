"""Preference sets: each rule on hand-made generations and feedback, the split, the selection
modes, and the snapshot files with their manifest and row. Expected counts are worked out by
hand from the rows each test inserts."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from service.chat import conversation_hash
from service.store import Feedback, Generation, GenerationChoice, PreferenceSnapshot
from training.config import SnapshotConfig
from training.preference_sets import (
    COUNTS,
    FILES,
    HUMAN,
    Answer,
    Vote,
    assemble,
    build,
    sft_rows,
    write_snapshot,
)

T0 = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(days=1)
NO_SPLIT = SnapshotConfig(heldout_fraction=0.0)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def said(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"prompt": ask(question), "chosen": said(chosen), "rejected": said(rejected)}


def kto(question: str, completion: str, label: bool) -> dict:
    return {"prompt": ask(question), "completion": said(completion), "label": label}


def sft(question: str, completion: str) -> dict:
    return {"prompt": ask(question), "completion": said(completion)}


def answers(gid: str, question: str, *texts: str, version: str = "base"):
    def op(session):
        messages = ask(question)
        session.add(
            Generation(
                id=gid,
                api_key="app",
                model="prefloop",
                model_version=version,
                conversation_hash=conversation_hash(messages),
                messages=messages,
                sampling={"n": len(texts)},
                prompt_token_ids=[1, 2],
                stream=False,
                created_at=T0,
                completed_at=T0,
            )
        )
        session.flush()
        session.add_all(
            GenerationChoice(generation_id=gid, index=i, text=t, token_ids=[], finish_reason="stop")
            for i, t in enumerate(texts)
        )
        return gid

    return op


def feedback(fid: str, kind: str, a: tuple[str, int], at: datetime, **fields):
    def op(session):
        row = Feedback(
            id=fid,
            kind=kind,
            api_key="app",
            request_hash=fid,
            a_generation_id=a[0],
            a_choice_index=a[1],
            a_model_version=session.get(Generation, a[0]).model_version,
            created_at=at,
            **fields,
        )
        if kind == "pairwise":
            row.b_model_version = session.get(Generation, row.b_generation_id).model_version
        session.add(row)
        return fid

    return op


def thumbs(fid, gid, index, rating, correction=None, at=T0):
    return feedback(fid, "thumbs", (gid, index), at, rating=rating, correction=correction)


def vote(fid, a, b, winner, at=T0):
    return feedback(
        fid, "pairwise", a, at, b_generation_id=b[0], b_choice_index=b[1], winner=winner
    )


def seed(store, *ops) -> None:
    results = store.write_batch(ops)
    assert not [r for r in results if isinstance(r, Exception)], results


def nonzero(pset) -> dict[str, int]:
    assert list(pset.counts) == list(COUNTS)
    return {k: v for k, v in pset.counts.items() if v}


def test_pairwise_votes_are_pairs_and_ties_are_only_counted(store):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q2", "C", "D"),
        vote("f1", ("g1", 0), ("g1", 1), "a"),
        vote("f2", ("g1", 0), ("g1", 1), "tie"),
        vote("f3", ("g1", 0), ("g1", 1), "both_bad"),
        vote("f4", ("g2", 0), ("g2", 1), "b"),
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "A", "B"), pair("Q2", "D", "C")]
    assert pset.pairs_heldout == pset.kto_train == pset.kto_heldout == []
    assert pset.sft_train == pset.sft_heldout == []  # "better" is not "good"
    assert nonzero(pset) == {"feedback_seen": 4, "ties": 1, "both_bad": 1, "pairs_train": 2}
    assert pset.feedback_ids == ["f1", "f2", "f3", "f4"]
    assert pset.usable == 2


def test_a_correction_is_preferred_to_the_answer_it_corrects(store):
    seed(
        store,
        answers("g1", "Q1", "A"),
        answers("g2", "Q2", "C"),
        answers("g3", "Q3", "E"),
        thumbs("f1", "g1", 0, "down", correction="Fixed A"),
        thumbs("f2", "g2", 0, "up", correction="Better C"),  # no pair: both desirable KTO rows
        thumbs("f3", "g3", 0, "down", correction=" E "),  # the answer itself: degenerate
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "Fixed A", "A")]
    assert pset.kto_train == [
        kto("Q2", "C", True),
        kto("Q2", "Better C", True),
        kto("Q3", "E", False),
    ]
    assert pset.sft_train == [sft("Q1", "Fixed A"), sft("Q2", "C"), sft("Q2", "Better C")]
    assert nonzero(pset) == {
        "feedback_seen": 3,
        "degenerate_dropped": 1,
        "pairs_train": 1,
        "kto_train": 3,
        "sft_train": 3,
    }


def test_thumbs_pair_within_a_conversation_and_never_across(store):
    seed(
        store,
        answers("g1", "Q1", "A"),
        answers("g2", "Q1", "A2"),
        answers("g3", "Q1", "B"),
        answers("g4", "Q2", "C", "D"),
        answers("g5", "Q3", "X"),
        answers("g6", "Q4", "Y"),
        thumbs("f1", "g1", 0, "up"),
        thumbs("f2", "g2", 0, "up"),
        thumbs("f3", "g3", 0, "down"),  # with each of the two ups
        thumbs("f4", "g4", 0, "up"),
        thumbs("f5", "g4", 1, "down"),  # two choices of one response
        thumbs("f6", "g5", 0, "down"),  # the ups are on other conversations
        thumbs("f7", "g6", 0, "up"),
        thumbs("f8", "g6", 0, "down"),  # the same answer as f7: nothing to compare
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "A", "B"), pair("Q1", "A2", "B"), pair("Q2", "C", "D")]
    assert [p["feedback_ids"] for p in pset.provenance["pairs_train"]] == [
        ["f1", "f3"],
        ["f2", "f3"],
        ["f4", "f5"],
    ]
    assert pset.kto_train == [kto("Q3", "X", False), kto("Q4", "Y", True), kto("Q4", "Y", False)]
    # Every thumbs-up, paired or not, f7 despite f8's thumbs-down on the same answer.
    assert pset.sft_train == [sft("Q1", "A"), sft("Q1", "A2"), sft("Q2", "C"), sft("Q4", "Y")]
    assert nonzero(pset) == {"feedback_seen": 8, "pairs_train": 3, "kto_train": 3, "sft_train": 4}


def test_conflicts_are_settled_by_majority_and_an_exact_tie_is_dropped(store):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q2", "C", "D"),
        answers("g3", "Q2", "D", "C"),  # the same two texts in the other order
        vote("f1", ("g1", 0), ("g1", 1), "a"),
        vote("f2", ("g1", 0), ("g1", 1), "a"),
        vote("f3", ("g1", 0), ("g1", 1), "b"),
        vote("f4", ("g2", 0), ("g2", 1), "a"),  # C over D
        vote("f5", ("g3", 0), ("g3", 1), "a"),  # D over C
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "A", "B")]
    assert pset.provenance["pairs_train"][0]["feedback_ids"] == ["f1", "f2"]
    assert pset.provenance["pairs_train"][0]["outvoted_ids"] == ["f3"]
    assert nonzero(pset) == {
        "feedback_seen": 5,
        "conflicts_dropped": 1,
        "outvoted": 1,
        "duplicates_removed": 1,
        "pairs_train": 1,
    }


def test_explicit_votes_outweigh_thumbs_which_break_their_ties(store):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q2", "C", "D"),
        vote("f1", ("g1", 0), ("g1", 1), "a"),  # A over B, explicitly, once...
        thumbs("f2", "g1", 1, "up"),
        thumbs("f3", "g1", 1, "up"),
        thumbs("f4", "g1", 0, "down"),
        thumbs("f5", "g1", 0, "down"),  # ...against four thumbs pairs B over A
        vote("f6", ("g2", 0), ("g2", 1), "a"),
        vote("f7", ("g2", 0), ("g2", 1), "b"),  # an explicit tie...
        thumbs("f8", "g2", 1, "up"),
        thumbs("f9", "g2", 0, "down"),  # ...that the thumbs break: D over C
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "A", "B"), pair("Q2", "D", "C")]
    q2 = pset.provenance["pairs_train"][1]
    assert (q2["feedback_ids"], q2["outvoted_ids"]) == (["f7", "f8", "f9"], ["f6"])
    assert pset.kto_train == []  # every thumbs took part in a pair
    assert pset.sft_train == [sft("Q1", "B"), sft("Q2", "D")]  # B lost its pair, yet was liked
    assert pset.provenance["sft_train"][0]["feedback_ids"] == ["f2", "f3"]
    assert nonzero(pset) == {
        "feedback_seen": 9,
        "outvoted": 5,
        "duplicates_removed": 1,
        "sft_duplicates_removed": 1,
        "pairs_train": 2,
        "sft_train": 2,
    }


def test_duplicates_appear_once_and_degenerate_pairs_are_dropped(store):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q1", "A", "B", version="v1"),
        answers("g3", "Q2", "same", " same\n"),
        answers("g4", "Q3", "K"),
        answers("g5", "Q4", "Z"),
        answers("g6", "Q4", "Z "),
        vote("f1", ("g1", 0), ("g1", 1), "a"),
        vote("f2", ("g2", 0), ("g2", 1), "a"),  # same content from another response
        vote("f3", ("g3", 0), ("g3", 1), "a"),  # equal after strip
        thumbs("f4", "g4", 0, "up"),
        thumbs("f5", "g4", 0, "up"),  # the same KTO row twice
        thumbs("f6", "g5", 0, "up"),
        thumbs("f7", "g6", 0, "down"),  # degenerate thumbs pair: both stay KTO rows
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "A", "B")]
    assert pset.provenance["pairs_train"][0]["feedback_ids"] == ["f1", "f2"]
    assert pset.provenance["pairs_train"][0]["chosen_model_versions"] == ["base", "v1"]
    assert pset.kto_train == [kto("Q3", "K", True), kto("Q4", "Z", True), kto("Q4", "Z ", False)]
    assert pset.provenance["kto_train"][0]["feedback_ids"] == ["f4", "f5"]
    assert pset.sft_train == [sft("Q3", "K"), sft("Q4", "Z")]
    assert nonzero(pset) == {
        "feedback_seen": 7,
        "degenerate_dropped": 2,
        "duplicates_removed": 1,
        "kto_duplicates_removed": 1,
        "sft_duplicates_removed": 1,
        "pairs_train": 1,
        "kto_train": 3,
        "sft_train": 2,
    }
    assert pset.usable == 1  # pairs, not KTO rows, once there are pairs


def coin(question: str) -> float:
    canonical = json.dumps(ask(question), separators=(",", ":"), ensure_ascii=False)
    return int(hashlib.sha256(canonical.encode()).hexdigest()[:8], 16) / 2**32


def test_the_split_is_by_a_stable_hash_of_the_prompt(store):
    questions = [f"question {i}" for i in range(20)]
    ops = []
    for i, q in enumerate(questions):
        ops += [answers(f"g{i}", q, f"good {i}", f"bad {i}"), answers(f"h{i}", q, f"meh {i}")]
        ops += [vote(f"f{i:02}a", (f"g{i}", 0), (f"g{i}", 1), "a")]
        ops += [thumbs(f"f{i:02}b", f"h{i}", 0, "down")]
    seed(store, *ops)

    pset = build(store, SnapshotConfig(heldout_fraction=0.5), NOW)
    held = [q for q in questions if coin(q) < 0.5]
    kept = [q for q in questions if coin(q) >= 0.5]
    assert held and kept
    asked = lambda rows: [row["prompt"][0]["content"] for row in rows]  # noqa: E731
    assert asked(pset.pairs_heldout) == asked(pset.kto_heldout) == held
    assert asked(pset.pairs_train) == asked(pset.kto_train) == kept
    assert build(store, SnapshotConfig(heldout_fraction=0.5), NOW) == pset

    nothing_held = build(store, NO_SPLIT, NOW)
    assert nothing_held.pairs_heldout == nothing_held.kto_heldout == []
    assert len(nothing_held.pairs_train) == len(nothing_held.kto_train) == 20


def snapshots(store) -> int:
    with store.reading() as session:
        return session.scalar(select(func.count()).select_from(PreferenceSnapshot)) or 0


def test_incremental_mode_takes_only_feedback_no_snapshot_used(store, tmp_path):
    seed(store, answers("g1", "Q1", "A", "B"), vote("f1", ("g1", 0), ("g1", 1), "a"))
    first = build(store, NO_SPLIT, NOW)
    assert first.feedback_ids == ["f1"] and snapshots(store) == 0  # building writes nothing
    write_snapshot(store, tmp_path, first)

    seed(store, vote("f2", ("g1", 0), ("g1", 1), "b", at=T0 + timedelta(hours=1)))
    second = build(store, NO_SPLIT, NOW)
    assert second.feedback_ids == ["f2"]
    assert second.pairs_train == [pair("Q1", "B", "A")]  # f1 is not counted against it
    assert nonzero(second) == {"feedback_seen": 1, "pairs_train": 1}
    write_snapshot(store, tmp_path, second)

    third = build(store, NO_SPLIT, NOW)
    assert (third.feedback_ids, third.usable) == ([], 0)


def test_window_mode_takes_the_last_hours_whatever_was_snapshotted(store, tmp_path):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q2", "C"),
        vote("f1", ("g1", 0), ("g1", 1), "a", at=NOW - timedelta(hours=30)),
        vote("f2", ("g1", 0), ("g1", 1), "b", at=NOW - timedelta(hours=2)),
        vote("f3", ("g1", 0), ("g1", 1), "tie", at=NOW + timedelta(hours=1)),  # after `now`
        thumbs("f4", "g2", 0, "up", at=NOW - timedelta(hours=1)),
    )
    cfg = SnapshotConfig(heldout_fraction=0.0, mode="window", window_hours=24)
    pset = build(store, cfg, NOW)
    assert pset.feedback_ids == ["f2", "f4"]
    assert (pset.pairs_train, pset.kto_train) == ([pair("Q1", "B", "A")], [kto("Q2", "C", True)])
    write_snapshot(store, tmp_path, pset)
    assert build(store, cfg, NOW).feedback_ids == ["f2", "f4"]

    thumbs_only = build(store, cfg.model_copy(update={"window_hours": 1.5}), NOW)
    assert thumbs_only.feedback_ids == ["f4"] and thumbs_only.usable == 1


def test_write_snapshot_files_match_the_manifest_and_the_row(store, tmp_path):
    seed(
        store,
        *[answers(f"g{i}", f"Q{i}", f"A{i}", f"B{i}") for i in range(6)],
        *[vote(f"f{i}a", (f"g{i}", 0), (f"g{i}", 1), "a") for i in range(6)],
        *[thumbs(f"f{i}b", f"g{i}", 0, "up") for i in range(6)],
        thumbs("f9", "g0", 0, "up", correction="A0, shorter"),
    )
    cfg = SnapshotConfig(heldout_fraction=0.5, mode="window", window_hours=48)
    pset = build(store, cfg, NOW)
    row = write_snapshot(store, tmp_path, pset)

    folder = tmp_path / row.path
    assert row.path == f"snapshots/{row.id}" and row.id.startswith(f"snap-{row.content_hash[:12]}-")
    data = {name: (folder / f"{name}.jsonl").read_bytes() for name in FILES}
    digest = hashlib.sha256()
    for name in FILES:  # the documented order and framing
        digest.update(f"{name}.jsonl {len(data[name])}\n".encode() + data[name])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["content_hash"] == row.content_hash == digest.hexdigest()
    assert manifest["id"] == row.id and manifest["counts"] == pset.counts
    assert manifest["feedback_ids"] == pset.feedback_ids and len(pset.feedback_ids) == 13
    for name in FILES:
        lines = [json.loads(line) for line in data[name].decode().splitlines()]
        assert lines == getattr(pset, name) and len(manifest["provenance"][name]) == len(lines)
    # 6 pairs; 6 thumbs-up KTO rows, f9's repeat of A0 merged into one, plus its correction; the
    # same 7 as SFT rows (f9's A0 merged again): 6 + 7 + 7 = 20, by hand.
    assert sum(pset.counts[name] for name in FILES) == 20
    assert pset.counts["kto_duplicates_removed"] == pset.counts["sft_duplicates_removed"] == 1
    with store.reading() as session:
        stored = session.get(PreferenceSnapshot, row.id)
        assert (stored.path, stored.content_hash) == (row.path, row.content_hash)
        assert (stored.counts, stored.feedback_ids) == (pset.counts, pset.feedback_ids)

    later = build(store, cfg, NOW + timedelta(minutes=1))  # the same feedback, a new snapshot
    again = write_snapshot(store, tmp_path, later)
    assert again.content_hash == row.content_hash and again.id != row.id
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == sorted([row.id, again.id])


def test_provenance_names_the_model_version_of_each_answer(store, tmp_path):
    seed(
        store,
        answers("g1", "Q1", "A"),
        answers("g2", "Q1", "B", version="v1"),
        answers("g3", "Q2", "K", version="v2"),
        answers("g4", "Q3", "L", version="v1"),
        vote("f1", ("g1", 0), ("g2", 0), "b"),
        thumbs("f2", "g1", 0, "down", correction="Fix"),
        thumbs("f3", "g2", 0, "up"),  # with f2: B over A again
        thumbs("f4", "g3", 0, "up"),
        thumbs("f5", "g4", 0, "up", correction="L+"),
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.pairs_train == [pair("Q1", "B", "A"), pair("Q1", "Fix", "A")]
    assert pset.provenance["pairs_train"] == [
        {
            "feedback_ids": ["f1", "f2", "f3"],
            "chosen_model_versions": ["v1"],
            "rejected_model_versions": ["base"],
            "outvoted_ids": [],
        },
        {
            "feedback_ids": ["f2"],
            "chosen_model_versions": ["human"],
            "rejected_model_versions": ["base"],
            "outvoted_ids": [],
        },
    ]
    assert pset.kto_train == [kto("Q2", "K", True), kto("Q3", "L", True), kto("Q3", "L+", True)]
    assert [p["model_versions"] for p in pset.provenance["kto_train"]] == [
        ["v2"],
        ["v1"],
        ["human"],
    ]
    assert all(set(r) == {"prompt", "completion", "label"} for r in pset.kto_train)
    assert pset.sft_train == [
        sft("Q1", "Fix"),
        sft("Q1", "B"),
        sft("Q2", "K"),
        sft("Q3", "L"),
        sft("Q3", "L+"),
    ]
    assert pset.provenance["sft_train"] == [
        {"feedback_ids": ["f2"], "model_versions": ["human"]},
        {"feedback_ids": ["f3"], "model_versions": ["v1"]},
        {"feedback_ids": ["f4"], "model_versions": ["v2"]},
        {"feedback_ids": ["f5"], "model_versions": ["v1"]},
        {"feedback_ids": ["f5"], "model_versions": ["human"]},
    ]
    manifest = tmp_path / write_snapshot(store, tmp_path, pset).path / "manifest.json"
    assert json.loads(manifest.read_text())["provenance"] == pset.provenance


def test_feedback_on_a_missing_answer_is_counted_not_used(store):
    seed(store, answers("g1", "Q1", "A"), thumbs("f1", "g1", 3, "up"))
    pset = build(store, NO_SPLIT, NOW)
    assert nonzero(pset) == {"feedback_seen": 1, "unresolved": 1}
    assert pset.feedback_ids == ["f1"]  # considered, so the next incremental set skips it


def test_the_rules_run_on_plain_votes():
    prompt = ask("Q")
    conversation = conversation_hash(prompt)
    a, b = Answer("A", "base"), Answer("B", "v1")

    def pairwise(fid: str, winner: str) -> Vote:
        return Vote(fid, conversation, prompt, a, ("g", 0), b, winner=winner)

    pset = assemble([pairwise("x", "a"), pairwise("y", "b")], ["x", "y"], 0.0, NOW)
    assert pset.pairs_train == [] and pset.counts["conflicts_dropped"] == 1
    assert pset.sft_train == []
    pset = assemble([pairwise("x", "b"), pairwise("y", "b")], ["x", "y"], 0.0, NOW)
    assert pset.pairs_train == [pair("Q", "B", "A")] and pset.counts["duplicates_removed"] == 1


def test_endorsed_answers_and_corrections_are_sft_rows(store):
    seed(
        store,
        answers("g1", "Q1", "A", "B"),
        answers("g2", "Q2", "C", version="v1"),
        answers("g3", "Q3", "E"),
        answers("g4", "Q4", "G"),
        thumbs("f1", "g1", 0, "up"),
        thumbs("f2", "g2", 0, "down", correction="Fixed C"),
        thumbs("f3", "g3", 0, "up", correction=" E\n"),  # the answer itself: no second row
        thumbs("f4", "g4", 0, "down", correction="G "),  # the answer itself: no row at all
        vote("f5", ("g1", 0), ("g1", 1), "a"),  # "better", not "good": no row
    )
    pset = build(store, NO_SPLIT, NOW)
    assert pset.sft_train == [sft("Q1", "A"), sft("Q2", "Fixed C"), sft("Q3", "E")]
    assert pset.provenance["sft_train"] == [
        {"feedback_ids": ["f1"], "model_versions": ["base"]},
        {"feedback_ids": ["f2"], "model_versions": [HUMAN]},
        {"feedback_ids": ["f3"], "model_versions": ["base"]},
    ]
    assert pset.counts["sft_train"] == 3 and pset.counts["sft_duplicates_removed"] == 0


def test_sft_rows_dedup_within_a_conversation_and_never_across():
    prompt, other = ask("Q1"), ask("Q2")

    def up(fid: str, messages: list[dict[str, str]], text: str, version: str = "base") -> Vote:
        return Vote(
            fid, conversation_hash(messages), messages, Answer(text, version), (fid, 0), rating="up"
        )

    votes = [
        up("f1", prompt, "A"),
        up("f2", prompt, " A\n", version="v1"),  # the same text after strip, another answer
        up("f3", other, "A"),  # the same text in another conversation
    ]
    rows, counts = sft_rows(votes)
    assert [row.trl for row in rows] == [sft("Q1", "A"), sft("Q2", "A")]
    assert [row.provenance for row in rows] == [
        {"feedback_ids": ["f1", "f2"], "model_versions": ["base", "v1"]},
        {"feedback_ids": ["f3"], "model_versions": ["base"]},
    ]
    assert counts == {"sft_duplicates_removed": 1}


def test_sft_rows_split_with_the_pairs_of_their_prompt(store):
    questions = [f"question {i}" for i in range(20)]  # both sides non-empty: see the split test
    ops = []
    for i, q in enumerate(questions):
        ops += [answers(f"g{i}", q, f"good {i}", f"bad {i}")]
        ops += [vote(f"f{i:02}a", (f"g{i}", 0), (f"g{i}", 1), "a")]
        ops += [thumbs(f"f{i:02}b", f"g{i}", 0, "up")]
    seed(store, *ops)

    pset = build(store, SnapshotConfig(heldout_fraction=0.5), NOW)
    held = [q for q in questions if coin(q) < 0.5]
    asked = lambda rows: [row["prompt"][0]["content"] for row in rows]  # noqa: E731
    assert asked(pset.sft_heldout) == asked(pset.pairs_heldout) == held
    assert (
        asked(pset.sft_train) == asked(pset.pairs_train) == [q for q in questions if q not in held]
    )
    assert pset.sft_heldout == [sft(q, f"good {questions.index(q)}") for q in held]
