"""Feedback rules: what a vote may refer to, idempotent retries, and batches whose events succeed
or fail one by one. Writes go through the group-commit writer.

While the database is unreachable an event cannot be checked (does the response exist, is it this
key's, was the idempotency key used before): it is journaled and acknowledged with 202 and
`queued: true`, under the id and time it will be stored with, and checked when the journal is
replayed; one that fails then is not stored but written to the journal's `rejected.jsonl`
(`service.store.writer` says how, and how retries are answered meanwhile). Queued events are
counted in `prefloop_journal_records`, not in `prefloop_feedback`, whose `model_version` label
needs the response they name."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.auth import Principal
from service.errors import ApiError, Conflict, Forbidden, NotFound, Unprocessable, unprocessable
from service.metrics import Metrics
from service.protocol import (
    BatchItemResult,
    FeedbackAck,
    FeedbackEvent,
    PairwiseFeedback,
    ThumbsFeedback,
)
from service.store import Feedback, Generation, GenerationChoice, GroupCommitWriter, Queued

EVENT = TypeAdapter(FeedbackEvent)
Event = ThumbsFeedback | PairwiseFeedback


@dataclass(frozen=True)
class Stored:
    ack: FeedbackAck
    kind: str
    value: str
    model_version: str


def request_hash(event: Event) -> str:
    body = event.model_dump(mode="json", exclude={"idempotency_key"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def parse_event(raw: object, prefix: str = "") -> Event:
    """Validate one event; the 422 names the field, with `prefix` for its place in a batch."""
    try:
        return EVENT.validate_python(raw)
    except ValidationError as exc:
        raise unprocessable(exc.errors()[0], prefix=prefix) from None


def with_header_key(event: Event, header: str | None) -> Event:
    """The event with the `Idempotency-Key` header's key; a body that names another is a 422."""
    if header is not None:
        if event.idempotency_key not in (None, header):
            raise Unprocessable(
                "the Idempotency-Key header and the idempotency_key field differ",
                param="idempotency_key",
                code="invalid_value",
            )
        event.idempotency_key = header
    return event


def _key_reused() -> Conflict:
    return Conflict(
        "this idempotency_key was already used for a different feedback event",
        param="idempotency_key",
        code="idempotency_key_reused",
    )


def _ack(row: Feedback, replayed: bool) -> FeedbackAck:
    return FeedbackAck(id=row.id, created=int(row.created_at.timestamp()), replayed=replayed)


@dataclass(frozen=True)
class Answered:
    """What a vote needs of the generation it refers to (not its messages or token ids)."""

    id: str
    api_key: str
    model_version: str
    conversation_hash: str
    choices: int


@dataclass
class Reads:
    """What the writes of one transaction read, loaded once for all of them: the generations
    they refer to and the feedback rows that hold their idempotency keys (None: no such row)."""

    generations: dict[str, Answered]
    keyed: dict[tuple[str, str], Feedback | None]
    # Replayed writes whose row is already stored, by id.
    stored: dict[str, Feedback] = field(default_factory=dict)


def _generations(session: Session, ids: set[str]) -> dict[str, Answered]:
    if not ids:
        return {}
    columns = (
        Generation.id,
        Generation.api_key,
        Generation.model_version,
        Generation.conversation_hash,
    )
    rows = session.execute(
        select(*columns, func.count(GenerationChoice.index))
        .outerjoin(GenerationChoice, GenerationChoice.generation_id == Generation.id)
        .where(Generation.id.in_(ids))
        .group_by(*columns)
    )
    return {row[0]: Answered(*row) for row in rows}


def _keyed(session: Session, keys: set[tuple[str, str]]) -> dict[tuple[str, str], Feedback | None]:
    found: dict[tuple[str, str], Feedback | None] = dict.fromkeys(keys)
    for api_key in {k for k, _ in keys}:
        wanted = [key for k, key in keys if k == api_key]
        rows = session.scalars(
            select(Feedback).where(
                Feedback.api_key == api_key, Feedback.idempotency_key.in_(wanted)
            )
        )
        found.update({(api_key, row.idempotency_key or ""): row for row in rows})
    return found


def _answer(
    reads: Reads, principal: Principal, response_id: str, choice: int, prefix: str
) -> Answered:
    gen = reads.generations.get(response_id)
    if gen is None:
        raise NotFound(
            f"no response with id {response_id!r}",
            param=f"{prefix}response_id",
            code="response_not_found",
        )
    if gen.api_key != principal.name and not principal.is_admin:
        raise Forbidden(
            f"response {response_id!r} was issued to another API key",
            param=f"{prefix}response_id",
            code="response_not_yours",
        )
    if choice >= gen.choices:
        raise Unprocessable(
            f"response {response_id!r} has {gen.choices} choice(s); "
            f"choice_index {choice} does not exist",
            param=f"{prefix}choice_index",
            code="invalid_value",
        )
    return gen


def _replay(row: Feedback | None, digest: str) -> Stored | None:
    if row is None:
        return None
    if row.request_hash != digest:
        raise _key_reused()
    return Stored(_ack(row, replayed=True), row.kind, "", row.a_model_version)


class FeedbackWrite:
    """The write for one event; raises `ApiError`s.

    The writes of one transaction share their reads: the store calls `prefetch` once with all of
    them (two queries for a batch of any size instead of two or three per event). Every check is
    made against those reads before anything is added to the session, so the store may `stage`
    the write (add its row, to be inserted with the others' in one statement at the end) instead
    of calling it (its own savepoint and INSERT, where a unique-key race is answered as a retry).

    The row's id and time are fixed here, not when it is checked, so that a journaled event is
    stored under the id its acknowledgement gave; replayed (`from_record`), a write whose id is
    already stored answers as a retry and stores nothing."""

    kind: ClassVar[str] = "feedback"

    def __init__(
        self,
        principal: Principal,
        event: Event,
        *,
        id: str | None = None,
        created_at: datetime | None = None,
        replaying: bool = False,
    ):
        self.principal, self.event = principal, event
        self.id = id or f"fb-{uuid.uuid4().hex}"
        self.created_at = created_at or datetime.now(UTC)
        self.replaying = replaying
        self.digest = request_hash(event)
        self.reads: Reads | None = None

    @property
    def key(self) -> tuple[str, str] | None:
        if self.event.idempotency_key is None:
            return None
        return self.principal.name, self.event.idempotency_key

    @property
    def response_ids(self) -> set[str]:
        event = self.event
        if isinstance(event, ThumbsFeedback):
            return {event.response_id}
        return {event.a.response_id, event.b.response_id}

    @classmethod
    def prefetch(cls, session: Session, writes: list[FeedbackWrite]) -> None:
        reads = Reads(
            _generations(session, {i for w in writes for i in w.response_ids}),
            _keyed(session, {k for w in writes if (k := w.key) is not None}),
        )
        if replayed := [w.id for w in writes if w.replaying]:
            rows = session.scalars(select(Feedback).where(Feedback.id.in_(replayed)))
            reads.stored = {row.id: row for row in rows}
        for write in writes:
            write.reads = reads

    def stage(self, session: Session) -> Stored:
        """Check the event and add its row to the session, unflushed; raises before adding."""
        reads, outcome = self._check(session)
        if isinstance(outcome, Stored):
            return outcome
        session.add(outcome)
        return self._stored(reads, outcome)

    def __call__(self, session: Session) -> Stored:
        """Check the event and insert its row in a savepoint of its own."""
        reads, outcome = self._check(session)
        if isinstance(outcome, Stored):
            return outcome
        try:
            with session.begin_nested():
                session.add(outcome)
                session.flush()
        except IntegrityError:
            # Another replica stored the same idempotency key first: answer as its retry.
            key = self.key
            if key is None:
                raise
            reads.keyed.update(_keyed(session, {key}))
            replay = _replay(reads.keyed[key], self.digest)
            if replay is None:
                raise
            return replay
        return self._stored(reads, outcome)

    def _stored(self, reads: Reads, row: Feedback) -> Stored:
        if (key := self.key) is not None:
            # A later event of the same transaction with this key is its retry.
            reads.keyed[key] = row
        value = row.rating if row.kind == "thumbs" else row.winner
        return Stored(_ack(row, replayed=False), row.kind, value or "", row.a_model_version)

    def _check(self, session: Session) -> tuple[Reads, Stored | Feedback]:
        """The replay of an earlier event with this idempotency key, or the new row."""
        if self.reads is None:
            self.prefetch(session, [self])
        reads, event, principal, key = self.reads, self.event, self.principal, self.key
        assert reads is not None
        if (done := reads.stored.get(self.id)) is not None:
            return reads, Stored(_ack(done, replayed=True), done.kind, "", done.a_model_version)
        if key is not None and (replay := _replay(reads.keyed[key], self.digest)):
            return reads, replay
        row = Feedback(
            id=self.id,
            kind=event.type,
            api_key=principal.name,
            user_id=event.user_id,
            idempotency_key=event.idempotency_key,
            request_hash=self.digest,
            comment=event.comment,
            created_at=self.created_at,
        )
        if isinstance(event, ThumbsFeedback):
            gen = _answer(reads, principal, event.response_id, event.choice_index, "")
            row.a_generation_id, row.a_choice_index = gen.id, event.choice_index
            row.a_model_version, row.rating, row.correction = (
                gen.model_version,
                event.rating,
                event.correction,
            )
        else:
            a = _answer(reads, principal, event.a.response_id, event.a.choice_index, "a.")
            b = _answer(reads, principal, event.b.response_id, event.b.choice_index, "b.")
            if a.conversation_hash != b.conversation_hash:
                raise Unprocessable(
                    "a and b answer different conversations; a pairwise vote "
                    "compares two answers to the same messages",
                    param="b.response_id",
                    code="different_conversations",
                )
            row.a_generation_id, row.a_choice_index, row.a_model_version = (
                a.id,
                event.a.choice_index,
                a.model_version,
            )
            row.b_generation_id, row.b_choice_index, row.b_model_version = (
                b.id,
                event.b.choice_index,
                b.model_version,
            )
            row.winner = event.winner
        return reads, row

    # Journaling (`service.store.writer.Journaled`) ------------------------------------------

    def to_record(self) -> dict[str, Any]:
        return {
            "principal": self.principal.name,
            "scopes": sorted(self.principal.scopes),
            "event": self.event.model_dump(mode="json"),
            "id": self.id,
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> FeedbackWrite:
        return cls(
            Principal(data["principal"], frozenset(data["scopes"])),
            EVENT.validate_python(data["event"]),
            id=data["id"],
            created_at=datetime.fromisoformat(data["created_at"]),
            replaying=True,
        )

    def queued(self, pending: Mapping[Hashable, Any]) -> Queued[Stored]:
        """Acknowledged without the database: a retry of an event journaled earlier (same key,
        same body) answers with that one's ack; the same key with another body is a 409."""
        key = self.key
        if key is not None and (earlier := pending.get(key)) is not None:
            if earlier.digest != self.digest:
                raise _key_reused()
            return Queued(earlier.queued_as(replayed=True), journal=False)
        return Queued(self.queued_as(replayed=False), key=key)

    def queued_as(self, replayed: bool) -> Stored:
        ack = FeedbackAck(
            id=self.id, created=int(self.created_at.timestamp()), replayed=replayed, queued=True
        )
        event = self.event
        value = event.rating if isinstance(event, ThumbsFeedback) else event.winner
        return Stored(ack, event.type, value, "")

    def waits(self, error: Exception) -> bool:
        """A response not in the database may still be in another replica's journal."""
        return isinstance(error, NotFound) and error.code == "response_not_found"

    def stored_key(self, result: object) -> tuple[str, str] | None:
        """Its idempotency key once its own row is stored (not when it answered as a retry)."""
        if isinstance(result, Stored) and result.ack.id == self.id and not result.ack.replayed:
            return self.key
        return None


class FeedbackService:
    def __init__(self, writer: GroupCommitWriter, metrics: Metrics):
        self._writer = writer
        self._metrics = metrics

    def _count(self, stored: Stored) -> None:
        if not stored.ack.replayed and not stored.ack.queued:
            self._metrics.feedback.labels(stored.kind, stored.value, stored.model_version).inc()

    async def submit(self, principal: Principal, event: Event) -> FeedbackAck:
        stored = await self._writer.submit(FeedbackWrite(principal, event))
        self._count(stored)
        return stored.ack

    async def submit_batch(self, principal: Principal, raw: list[dict]) -> list[BatchItemResult]:
        """Each event is validated and stored on its own: one bad event fails alone."""
        results: list[BatchItemResult | None] = [None] * len(raw)
        ops: list[Callable[[Session], Stored]] = []
        positions = []
        for i, item in enumerate(raw):
            try:
                event = parse_event(item, prefix=f"events.{i}.")
            except Unprocessable as bad:
                results[i] = BatchItemResult(index=i, status=bad.status, error=bad.body()["error"])
                continue
            ops.append(FeedbackWrite(principal, event))
            positions.append(i)
        for i, outcome in zip(positions, await self._writer.submit_many(ops), strict=True):
            if isinstance(outcome, Stored):
                self._count(outcome)
                status = 202 if outcome.ack.queued else 200 if outcome.ack.replayed else 201
                results[i] = BatchItemResult(index=i, status=status, feedback=outcome.ack)
            else:
                err = outcome if isinstance(outcome, ApiError) else ApiError("not stored")
                results[i] = BatchItemResult(index=i, status=err.status, error=err.body()["error"])
        return [r for r in results if r is not None]
