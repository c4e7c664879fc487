"""generations and feedback

Revision ID: 0001
Revises:
Create Date: 2026-11-26 19:17:24.267239
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "generations",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("api_key", sa.String(length=128), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("conversation_hash", sa.String(length=64), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=False),
        sa.Column("prompt_token_ids", sa.JSON(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_generations_api_key"), ["api_key"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_generations_conversation_hash"), ["conversation_hash"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_generations_model_version"), ["model_version"], unique=False
        )

    op.create_table(
        "feedback",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("api_key", sa.String(length=128), nullable=False),
        sa.Column("user_id", sa.String(length=256), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("a_generation_id", sa.String(length=64), nullable=False),
        sa.Column("a_choice_index", sa.Integer(), nullable=False),
        sa.Column("a_model_version", sa.String(length=64), nullable=False),
        sa.Column("b_generation_id", sa.String(length=64), nullable=True),
        sa.Column("b_choice_index", sa.Integer(), nullable=True),
        sa.Column("b_model_version", sa.String(length=64), nullable=True),
        sa.Column("rating", sa.String(length=8), nullable=True),
        sa.Column("winner", sa.String(length=16), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["a_generation_id"],
            ["generations.id"],
        ),
        sa.ForeignKeyConstraint(
            ["b_generation_id"],
            ["generations.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("api_key", "idempotency_key", name="uq_feedback_idempotency"),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_feedback_a_generation_id"), ["a_generation_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_feedback_b_generation_id"), ["b_generation_id"], unique=False
        )
        batch_op.create_index("ix_feedback_created_at", ["created_at"], unique=False)

    op.create_table(
        "generation_choices",
        sa.Column("generation_id", sa.String(length=64), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["generation_id"], ["generations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("generation_id", "index"),
    )


def downgrade() -> None:
    op.drop_table("generation_choices")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_created_at")
        batch_op.drop_index(batch_op.f("ix_feedback_b_generation_id"))
        batch_op.drop_index(batch_op.f("ix_feedback_a_generation_id"))

    op.drop_table("feedback")
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_generations_model_version"))
        batch_op.drop_index(batch_op.f("ix_generations_conversation_hash"))
        batch_op.drop_index(batch_op.f("ix_generations_api_key"))

    op.drop_table("generations")
