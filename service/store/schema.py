"""The tables of the system of record. Alembic migrations under `migrations/` create them."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Generation(Base):
    """One chat completion request and what it returned; `id` is the feedback handle."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key: Mapped[str] = mapped_column(String(128), index=True)
    model: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64), index=True)
    # sha256 of the canonical JSON of `messages`: answers to "the same conversation" share it.
    conversation_hash: Mapped[str] = mapped_column(String(64), index=True)
    messages: Mapped[list] = mapped_column(JSON)
    sampling: Mapped[dict] = mapped_column(JSON)
    prompt_token_ids: Mapped[list] = mapped_column(JSON)
    stream: Mapped[bool]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    choices: Mapped[list[GenerationChoice]] = relationship(
        back_populates="generation", order_by="GenerationChoice.index", lazy="selectin"
    )


class GenerationChoice(Base):
    __tablename__ = "generation_choices"

    generation_id: Mapped[str] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))

    generation: Mapped[Generation] = relationship(back_populates="choices")


class Feedback(Base):
    """A thumbs vote on one answer, or a pairwise vote between two answers (`b_*` set)."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("api_key", "idempotency_key", name="uq_feedback_idempotency"),
        Index("ix_feedback_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "thumbs" | "pairwise"
    api_key: Mapped[str] = mapped_column(String(128))
    user_id: Mapped[str | None] = mapped_column(String(256))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # sha256 of the event as sent: a reused idempotency key with another body is a conflict.
    request_hash: Mapped[str] = mapped_column(String(64))
    a_generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), index=True)
    a_choice_index: Mapped[int]
    a_model_version: Mapped[str] = mapped_column(String(64))
    b_generation_id: Mapped[str | None] = mapped_column(ForeignKey("generations.id"), index=True)
    b_choice_index: Mapped[int | None]
    b_model_version: Mapped[str | None] = mapped_column(String(64))
    rating: Mapped[str | None] = mapped_column(String(8))  # thumbs: "up" | "down"
    winner: Mapped[str | None] = mapped_column(String(16))  # pairwise: a | b | tie | both_bad
    comment: Mapped[str | None] = mapped_column(Text)
    correction: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
