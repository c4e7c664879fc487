"""Preference sets: stored feedback in, a versioned snapshot of DPO pairs, KTO rows and SFT
demonstrations out.

`build(store, cfg)` reads the feedback a snapshot considers and applies the rules below (it writes
nothing); `write_snapshot(store, data_dir, pset)` freezes the result as
`data_dir/snapshots/<id>/{pairs,kto,sft}_{train,heldout}.jsonl` plus a `manifest.json` and records
it as a `PreferenceSnapshot`; `release_snapshot(store, id)` gives a failed cycle's feedback back.
Rows are TRL's conversational formats (`service.export`, and `sft_row` for SFT's prompt-completion
rows); which feedback and model versions produced each row is kept in the manifest's
`provenance`, one list per file, aligned with its lines. The rules are pure
functions over `Vote`s (one feedback row with its texts), so they are tested without a database.

Which feedback: mode `incremental` takes feedback whose id is in no earlier snapshot's
`feedback_ids` (so answers rated in different snapshots are never paired with each other), except
snapshots that were released because their cycle failed; mode `window` takes feedback created in
the last `window_hours`. Both stop at `now`.

The rules, in the order they apply:

1. A pairwise vote with winner `a` or `b` is a pair (prompt, chosen, rejected). `tie` and
   `both_bad` carry no preference: counted (`ties`, `both_bad`), never paired.
2. A thumbs-down with a `correction` is a pair: the correction is preferred over the answer.
   A correction on a thumbs-up pairs with nothing.
3. Within one conversation (`Generation.conversation_hash`) every thumbs-up is paired with every
   thumbs-down on a different answer (another generation or choice index). Never across
   conversations.
4. A thumbs vote that took part in no pair of rules 2-3 becomes a KTO row (label: rating is up),
   and its correction, if any, a desirable one. A thumbs that took part adds no KTO row, even when
   its pair is later outvoted or dropped: the pair stage already has its signal, and KTO rows are
   what trains when there are no pairs.
5. Conflicts: the votes on one prompt and the same unordered pair of answer texts are resolved by
   majority. Explicit votes (rules 1-2: a person compared two answers) decide; pairs inferred from
   two thumbs (rule 3: possibly two people with two standards) count only where the explicit
   votes are absent or tied. A tie at both levels drops the pair (`conflicts_dropped`); votes on
   the losing side are counted in `outvoted`.
6. Duplicates: the agreeing votes of a resolved pair give one row (`duplicates_removed` counts the
   rest) whose provenance lists them all. A pair whose two texts are equal after strip is dropped
   before voting (`degenerate_dropped`) and does not count as taking part for rule 4; a
   correction equal to its answer is no KTO row either. KTO rows dedup on (prompt, completion,
   label) (`kto_duplicates_removed`).
7. Held-out split by prompt: sha256 of the canonical JSON of the prompt messages
   (`service.chat.conversation_hash`); held out when its first 8 hex digits / 2**32 <
   `heldout_fraction`. All rows of one prompt, pairs, KTO and SFT alike, land on the same side.
8. SFT rows are what users endorsed: every thumbs-up answer, and every correction (on a thumbs-up
   or a thumbs-down; a person wrote it, model version `human`) that differs from its answer after
   strip. Pairwise votes give none: they say "better", not "good". Unlike rule 4, a thumbs gives
   its SFT rows whether or not it took part in a pair; to keep it simple, every thumbs-up counts,
   even on an answer that also got a thumbs-down or lost a pair. One row per conversation and
   completion text after strip (`sft_duplicates_removed` counts the rest), holding the first
   vote's text; its provenance lists all their feedback ids.

Feedback is read in (created_at, id) order and each row sits where its first vote appeared (a
thumbs pair appears with the later of its two thumbs), so the same feedback gives byte-identical
files and the same content hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from service.chat import conversation_hash
from service.export import kto_row, pair_row
from service.store import (
    Feedback,
    Generation,
    GenerationChoice,
    PreferenceSnapshot,
    Store,
    used_feedback_ids,
)
from training.config import SnapshotConfig

logger = logging.getLogger(__name__)
Messages = list[dict[str, str]]
FILES = ("pairs_train", "pairs_heldout", "kto_train", "kto_heldout", "sft_train", "sft_heldout")
COUNTS = (
    "feedback_seen",
    "unresolved",  # feedback whose answer text could not be found
    "ties",
    "both_bad",
    "degenerate_dropped",
    "conflicts_dropped",
    "outvoted",
    "duplicates_removed",
    "kto_duplicates_removed",
    "sft_duplicates_removed",
    *FILES,
)
HUMAN = "human"  # the model version recorded for a correction: a person wrote it


@dataclass(frozen=True)
class Answer:
    text: str
    version: str  # the model version that produced it, or HUMAN


@dataclass(frozen=True)
class Vote:
    """One feedback row with its texts: thumbs (`b` is None) or pairwise."""

    id: str
    conversation: str  # Generation.conversation_hash of the rated answer(s)
    prompt: Messages
    a: Answer
    ref: tuple[str, int]  # (generation id, choice index) of `a`: "which answer" for rule 3
    b: Answer | None = None
    rating: str | None = None
    winner: str | None = None
    correction: str | None = None


@dataclass(frozen=True)
class Candidate:
    """One vote for `chosen` over `rejected`, before conflicts and duplicates are resolved."""

    prompt: Messages
    chosen: Answer
    rejected: Answer
    feedback_ids: tuple[str, ...]
    explicit: bool  # a pairwise vote or a correction; False: inferred from two thumbs


@dataclass(frozen=True)
class Row:
    prompt: Messages
    trl: dict[str, Any]  # the row as written to the JSONL file
    provenance: dict[str, list[str]]  # kept in the manifest, beside the file


@dataclass
class PreferenceSet:
    pairs_train: list[dict[str, Any]]
    pairs_heldout: list[dict[str, Any]]
    kto_train: list[dict[str, Any]]
    kto_heldout: list[dict[str, Any]]
    sft_train: list[dict[str, Any]]
    sft_heldout: list[dict[str, Any]]
    provenance: dict[str, list[dict[str, list[str]]]]  # file name -> one entry per line
    feedback_ids: list[str]  # every feedback considered, used or not
    counts: dict[str, int]
    created_at: datetime

    @property
    def usable(self) -> int:
        """What the scheduler compares with its threshold: pairs, or KTO rows when none."""
        pairs = len(self.pairs_train) + len(self.pairs_heldout)
        return pairs or len(self.kto_train) + len(self.kto_heldout)


def pair_candidates(votes: Sequence[Vote]) -> tuple[list[Candidate], set[str], Counter[str]]:
    """Rules 1-3 and the degenerate drop: candidates in feedback order, ids of thumbs used."""
    counts: Counter[str] = Counter()
    out: list[Candidate] = []
    used: set[str] = set()

    def add(c: Candidate, thumbs: Iterable[str]) -> None:
        if c.chosen.text.strip() == c.rejected.text.strip():
            counts["degenerate_dropped"] += 1
        else:
            out.append(c)
            used.update(thumbs)

    earlier: dict[str, list[Vote]] = defaultdict(list)  # conversation -> its thumbs so far
    for v in votes:
        if v.b is not None:
            if v.winner in ("a", "b"):
                chosen, rejected = (v.a, v.b) if v.winner == "a" else (v.b, v.a)
                add(Candidate(v.prompt, chosen, rejected, (v.id,), True), ())
            else:
                counts["ties" if v.winner == "tie" else "both_bad"] += 1
            continue
        if v.rating == "down" and v.correction:
            add(Candidate(v.prompt, Answer(v.correction, HUMAN), v.a, (v.id,), True), (v.id,))
        for o in earlier[v.conversation]:
            if o.rating != v.rating and o.ref != v.ref:
                up, down = (v, o) if v.rating == "up" else (o, v)
                add(Candidate(o.prompt, up.a, down.a, (o.id, v.id), False), (o.id, v.id))
        earlier[v.conversation].append(v)
    return out, used, counts


def _margin(group: Sequence[Candidate], first: str, *, explicit: bool) -> int:
    """Votes for `first` as the chosen text minus votes against, among (non-)explicit ones."""
    return sum(1 if c.chosen.text == first else -1 for c in group if c.explicit == explicit)


def resolve(candidates: Sequence[Candidate]) -> tuple[list[Row], Counter[str]]:
    """Rules 5-6: one row per prompt and unordered pair of texts, by majority, or none on a tie."""
    counts: Counter[str] = Counter()
    groups: dict[tuple[str, frozenset[str]], list[Candidate]] = {}
    for c in candidates:
        key = (conversation_hash(c.prompt), frozenset((c.chosen.text, c.rejected.text)))
        groups.setdefault(key, []).append(c)
    rows = []
    for group in groups.values():
        first = group[0].chosen.text
        verdict = _margin(group, first, explicit=True) or _margin(group, first, explicit=False)
        if verdict == 0:
            counts["conflicts_dropped"] += 1
            continue
        won = [c for c in group if (c.chosen.text == first) == (verdict > 0)]
        lost = [c for c in group if (c.chosen.text == first) != (verdict > 0)]
        counts["outvoted"] += len(lost)
        counts["duplicates_removed"] += len(won) - 1
        best = won[0]
        provenance = {
            "feedback_ids": [i for c in won for i in c.feedback_ids],
            "chosen_model_versions": sorted({c.chosen.version for c in won}),
            "rejected_model_versions": sorted({c.rejected.version for c in won}),
            "outvoted_ids": [i for c in lost for i in c.feedback_ids],
        }
        trl = pair_row("trl", best.prompt, best.chosen.text, best.rejected.text)
        rows.append(Row(best.prompt, trl, provenance))
    return rows, counts


def unpaired(votes: Sequence[Vote], used: set[str]) -> tuple[list[Row], Counter[str]]:
    """Rule 4 and the KTO half of 6: thumbs that took part in no pair, deduplicated."""
    counts: Counter[str] = Counter()
    rows: dict[tuple[str, str, bool], Row] = {}
    for v in votes:
        if v.b is not None or v.id in used:
            continue
        items = [(v.a, v.rating == "up")]
        if v.correction and v.correction.strip() != v.a.text.strip():
            items.append((Answer(v.correction, HUMAN), True))
        for answer, label in items:
            key = (conversation_hash(v.prompt), answer.text, label)
            if key in rows:
                counts["kto_duplicates_removed"] += 1
            else:
                rows[key] = Row(v.prompt, kto_row(v.prompt, answer.text, label), _sources())
            _credit(rows[key].provenance, v.id, answer.version)
    return list(rows.values()), counts


def sft_row(prompt: Messages, text: str) -> dict[str, Any]:
    """TRL's conversational prompt-completion row: SFTTrainer's loss covers the completion only."""
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}


def sft_rows(votes: Sequence[Vote]) -> tuple[list[Row], Counter[str]]:
    """Rule 8: thumbs-up answers and corrections, one row per conversation and stripped text."""
    counts: Counter[str] = Counter()
    rows: dict[tuple[str, str], Row] = {}
    for v in votes:
        if v.b is not None:
            continue
        items = [v.a] if v.rating == "up" else []
        if v.correction and v.correction.strip() != v.a.text.strip():
            items.append(Answer(v.correction, HUMAN))
        for answer in items:
            key = (conversation_hash(v.prompt), answer.text.strip())
            if key in rows:
                counts["sft_duplicates_removed"] += 1
            else:
                rows[key] = Row(v.prompt, sft_row(v.prompt, answer.text), _sources())
            _credit(rows[key].provenance, v.id, answer.version)
    return list(rows.values()), counts


def _sources() -> dict[str, list[str]]:
    """The provenance of a KTO or SFT row before its first vote is credited."""
    return {"feedback_ids": [], "model_versions": []}


def _credit(provenance: dict[str, list[str]], feedback_id: str, version: str) -> None:
    """Add one vote to a KTO or SFT row's provenance; its versions stay sorted and unique."""
    provenance["feedback_ids"].append(feedback_id)
    versions = provenance["model_versions"]
    if version not in versions:
        versions.append(version)
        versions.sort()


def heldout(prompt: Messages, fraction: float) -> bool:
    """Rule 7: a stable, prompt-level coin."""
    return int(conversation_hash(prompt)[:8], 16) / 2**32 < fraction


def assemble(
    votes: Sequence[Vote], feedback_ids: list[str], heldout_fraction: float, created_at: datetime
) -> PreferenceSet:
    """All rules over the votes, split into the six files."""
    candidates, used, counts = pair_candidates(votes)
    pairs, pair_counts = resolve(candidates)
    kto, kto_counts = unpaired(votes, used)
    sft, sft_counts = sft_rows(votes)
    files: dict[str, list[dict[str, Any]]] = {name: [] for name in FILES}
    provenance: dict[str, list[dict[str, list[str]]]] = {name: [] for name in FILES}
    for kind, rows in (("pairs", pairs), ("kto", kto), ("sft", sft)):
        for row in rows:
            name = f"{kind}_{'heldout' if heldout(row.prompt, heldout_fraction) else 'train'}"
            files[name].append(row.trl)
            provenance[name].append(row.provenance)
    counts += pair_counts + kto_counts + sft_counts
    counts.update({name: len(rows) for name, rows in files.items()})
    counts["feedback_seen"] = len(feedback_ids)
    return PreferenceSet(
        **files,
        provenance=provenance,
        feedback_ids=feedback_ids,
        counts={key: counts[key] for key in COUNTS},
        created_at=created_at,
    )


def build(store: Store, cfg: SnapshotConfig, now: datetime | None = None) -> PreferenceSet:
    """The preference set `cfg` selects as of `now` (default: the current time). Reads only."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    gen = aliased(Generation)
    choice_a, choice_b = aliased(GenerationChoice), aliased(GenerationChoice)
    query = (
        select(Feedback, gen.messages, gen.conversation_hash, choice_a.text, choice_b.text)
        .outerjoin(gen, gen.id == Feedback.a_generation_id)
        .outerjoin(
            choice_a,
            (choice_a.generation_id == Feedback.a_generation_id)
            & (choice_a.index == Feedback.a_choice_index),
        )
        .outerjoin(
            choice_b,
            (choice_b.generation_id == Feedback.b_generation_id)
            & (choice_b.index == Feedback.b_choice_index),
        )
        .where(Feedback.created_at <= now)
        .order_by(Feedback.created_at, Feedback.id)
    )
    if cfg.mode == "window":
        query = query.where(Feedback.created_at >= now - timedelta(hours=cfg.window_hours))
    ids: list[str] = []
    votes: list[Vote] = []
    unresolved = 0
    with store.reading() as session:
        taken = used_feedback_ids(session) if cfg.mode == "incremental" else set()
        for fb, messages, conversation, text_a, text_b in session.execute(query):
            if fb.id in taken:
                continue
            ids.append(fb.id)
            if text_a is None or (fb.kind == "pairwise" and text_b is None):
                unresolved += 1
                continue
            b = Answer(text_b, fb.b_model_version or "") if fb.kind == "pairwise" else None
            votes.append(
                Vote(
                    fb.id,
                    conversation,
                    messages,
                    Answer(text_a, fb.a_model_version),
                    (fb.a_generation_id, fb.a_choice_index),
                    b,
                    fb.rating,
                    fb.winner,
                    fb.correction,
                )
            )
    pset = assemble(votes, ids, cfg.heldout_fraction, now)
    pset.counts["unresolved"] = unresolved
    return pset


def content_hash(files: Mapping[str, bytes]) -> str:
    """sha256 over each of FILES in order: the header `<name>.jsonl <byte length>\\n`, then its
    bytes (the headers keep a line moved from one file to the next from hashing the same)."""
    digest = hashlib.sha256()
    for name in FILES:
        digest.update(f"{name}.jsonl {len(files[name])}\n".encode())
        digest.update(files[name])
    return digest.hexdigest()


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def write_snapshot(store: Store, data_dir: Path, pset: PreferenceSet) -> PreferenceSnapshot:
    """Write the snapshot's files, then its row; the row never names a half-written folder."""
    files = {name: _jsonl(getattr(pset, name)) for name in FILES}
    digest = content_hash(files)
    # To the microsecond: a failed cycle's released feedback may be snapshotted again at once.
    snap_id = f"snap-{digest[:12]}-{pset.created_at:%Y%m%d%H%M%S%f}"
    relative = Path("snapshots") / snap_id
    final = data_dir / relative
    if final.exists():
        raise FileExistsError(f"snapshot {snap_id} already exists at {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "id": snap_id,
        "created_at": pset.created_at.isoformat(),
        "counts": pset.counts,
        "content_hash": digest,
        "feedback_ids": pset.feedback_ids,
        "provenance": pset.provenance,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{snap_id}-", dir=final.parent))
    try:
        for name, data in files.items():
            (staging / f"{name}.jsonl").write_bytes(data)
        text = json.dumps(manifest, ensure_ascii=False, indent=1) + "\n"
        (staging / "manifest.json").write_text(text, encoding="utf-8")
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    row = PreferenceSnapshot(
        id=snap_id,
        path=relative.as_posix(),
        content_hash=digest,
        counts=pset.counts,
        feedback_ids=pset.feedback_ids,
        created_at=pset.created_at,
    )

    def insert(session: Session) -> PreferenceSnapshot:
        session.add(row)
        session.flush()
        return row

    [result] = store.write_batch([insert])
    if isinstance(result, Exception):
        shutil.rmtree(final, ignore_errors=True)
        raise result
    logger.info("preference snapshot %s: %s", snap_id, pset.counts)
    return result


def release_snapshot(store: Store, snapshot_id: str) -> None:
    """Give the snapshot's feedback back: mode `incremental` takes it again in the next snapshot.
    For a cycle that failed before the gate judged what it trained; the snapshot's row (marked
    `released_at`) and files stay, so the failed run still names what it had."""

    def op(session: Session) -> None:
        row = session.get(PreferenceSnapshot, snapshot_id)
        if row is not None and row.released_at is None:
            row.released_at = datetime.now(UTC)

    store.write_one(op)
    logger.info("preference snapshot %s released: its feedback is pending again", snapshot_id)
