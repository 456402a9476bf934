"""auth_recheck: decisions waiting for a sender check that could not complete (docs/decisions.md
D10)

Revision ID: 0003_dns
Revises: 0002_participants
Create Date: 2026-12-03 08:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_dns"
down_revision = "0002_participants"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auth_recheck",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("client_ip", sa.String(), nullable=False),
        sa.Column("helo", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_check_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"]),
        sa.ForeignKeyConstraint(["ticket_id"], ["ticket.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("auth_recheck", schema=None) as batch_op:
        batch_op.create_index("auth_recheck_due", ["state", "next_check_at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_auth_recheck_message_id"), ["message_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_auth_recheck_ticket_id"), ["ticket_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("auth_recheck", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_recheck_ticket_id"))
        batch_op.drop_index(batch_op.f("ix_auth_recheck_message_id"))
        batch_op.drop_index("auth_recheck_due")
    op.drop_table("auth_recheck")
