"""preference snapshots: released_at (a failed cycle gives its feedback back)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("preference_snapshots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("preference_snapshots", schema=None) as batch_op:
        batch_op.drop_column("released_at")
