"""Feedback rules: what a vote may refer to, idempotent retries, and batches whose events succeed
or fail one by one. Writes go through the group-commit writer."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
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
from service.store import Feedback, Generation, GroupCommitWriter

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


def _ack(row: Feedback, replayed: bool) -> FeedbackAck:
    return FeedbackAck(id=row.id, created=int(row.created_at.timestamp()), replayed=replayed)


def _answer(
    session: Session, principal: Principal, response_id: str, choice: int, prefix: str
) -> Generation:
    gen = session.get(Generation, response_id)
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
    if choice >= len(gen.choices):
        raise Unprocessable(
            f"response {response_id!r} has {len(gen.choices)} choice(s); "
            f"choice_index {choice} does not exist",
            param=f"{prefix}choice_index",
            code="invalid_value",
        )
    return gen


def _replay(session: Session, principal: Principal, event: Event, digest: str) -> Stored | None:
    if event.idempotency_key is None:
        return None
    row = session.scalars(
        select(Feedback).where(
            Feedback.api_key == principal.name, Feedback.idempotency_key == event.idempotency_key
        )
    ).first()
    if row is None:
        return None
    if row.request_hash != digest:
        raise Conflict(
            "this idempotency_key was already used for a different feedback event",
            param="idempotency_key",
            code="idempotency_key_reused",
        )
    return Stored(_ack(row, replayed=True), row.kind, "", row.a_model_version)


def store_op(principal: Principal, event: Event):
    """The write for one event, run by the writer inside a savepoint; raises `ApiError`s."""
    digest = request_hash(event)

    def op(session: Session) -> Stored:
        replay = _replay(session, principal, event, digest)
        if replay is not None:
            return replay
        row = Feedback(
            id=f"fb-{uuid.uuid4().hex}",
            kind=event.type,
            api_key=principal.name,
            user_id=event.user_id,
            idempotency_key=event.idempotency_key,
            request_hash=digest,
            comment=event.comment,
            created_at=datetime.now(UTC),
        )
        if isinstance(event, ThumbsFeedback):
            gen = _answer(session, principal, event.response_id, event.choice_index, "")
            row.a_generation_id, row.a_choice_index = gen.id, event.choice_index
            row.a_model_version, row.rating, row.correction = (
                gen.model_version,
                event.rating,
                event.correction,
            )
            value: str = event.rating
        else:
            a = _answer(session, principal, event.a.response_id, event.a.choice_index, "a.")
            b = _answer(session, principal, event.b.response_id, event.b.choice_index, "b.")
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
            row.winner = value = event.winner
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            # Another replica stored the same idempotency key first: answer as its retry.
            replay = _replay(session, principal, event, digest)
            if replay is None:
                raise
            return replay
        return Stored(_ack(row, replayed=False), event.type, value, row.a_model_version)

    return op


class FeedbackService:
    def __init__(self, writer: GroupCommitWriter, metrics: Metrics):
        self._writer = writer
        self._metrics = metrics

    def _count(self, stored: Stored) -> None:
        if not stored.ack.replayed:
            self._metrics.feedback.labels(stored.kind, stored.value, stored.model_version).inc()

    async def submit(self, principal: Principal, event: Event) -> FeedbackAck:
        stored = await self._writer.submit(store_op(principal, event))
        self._count(stored)
        return stored.ack

    async def submit_batch(self, principal: Principal, raw: list[dict]) -> list[BatchItemResult]:
        """Each event is validated and stored on its own: one bad event fails alone."""
        results: list[BatchItemResult | None] = [None] * len(raw)
        ops, positions = [], []
        for i, item in enumerate(raw):
            try:
                event = parse_event(item, prefix=f"events.{i}.")
            except Unprocessable as bad:
                results[i] = BatchItemResult(index=i, status=bad.status, error=bad.body()["error"])
                continue
            ops.append(store_op(principal, event))
            positions.append(i)
        for i, outcome in zip(positions, await self._writer.submit_many(ops), strict=True):
            if isinstance(outcome, Stored):
                self._count(outcome)
                status = 200 if outcome.ack.replayed else 201
                results[i] = BatchItemResult(index=i, status=status, feedback=outcome.ack)
            else:
                err = outcome if isinstance(outcome, ApiError) else ApiError("not stored")
                results[i] = BatchItemResult(index=i, status=err.status, error=err.body()["error"])
        return [r for r in results if r is not None]
