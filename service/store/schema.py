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


class ModelVersion(Base):
    """A servable model: the base, or a trained LoRA adapter / full weights with its manifest."""

    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    kind: Mapped[str] = mapped_column(String(8))  # "base" | "lora" | "full" | "reward"
    # The full weights this version runs on: itself for base/full, the parent's for a LoRA.
    weights_id: Mapped[str] = mapped_column(String(64))
    # Relative to the data directory, so replicas that mount it elsewhere agree.
    path: Mapped[str] = mapped_column(String(512))
    algorithm: Mapped[str | None] = mapped_column(String(16))
    snapshot_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # candidate | approved | rejected
    reason: Mapped[str | None] = mapped_column(Text)
    manifest: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Promotion(Base):
    """Append-only serving history: the newest row names the version every replica serves."""

    __tablename__ = "promotions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    action: Mapped[str] = mapped_column(String(16))  # "promote" | "rollback"
    actor: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PreferenceSnapshot(Base):
    """A frozen preference set: which feedback it used, its counts and content hash. A snapshot
    whose cycle failed is released (`released_at`): it stays on record, but its feedback counts as
    unused again, so the next snapshot takes it."""

    __tablename__ = "preference_snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    path: Mapped[str] = mapped_column(String(512))  # relative to the data directory
    content_hash: Mapped[str] = mapped_column(String(64))
    counts: Mapped[dict] = mapped_column(JSON)
    feedback_ids: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class TrainingRun(Base):
    """One cycle: snapshot -> train -> gate -> (promote). Its metrics and error stay with it."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trigger: Mapped[str] = mapped_column(String(16))  # "manual" | "count" | "interval"
    status: Mapped[str] = mapped_column(String(16), index=True)
    # queued | running | promoted | rejected | failed | skipped
    algorithm: Mapped[str] = mapped_column(String(16))
    parent_version_id: Mapped[str | None] = mapped_column(String(64))
    snapshot_id: Mapped[str | None] = mapped_column(String(64))
    candidate_version_id: Mapped[str | None] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON)
    step_metrics: Mapped[list] = mapped_column(JSON)
    stages: Mapped[dict] = mapped_column(JSON)  # seconds per stage
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
