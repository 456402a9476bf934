"""junk folder, blocked senders and the spam verdict on messages (docs/decisions.md D18)

Revision ID: 0006_junk
Revises: 0005_plan
Create Date: 2026-12-03 08:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_junk"
down_revision = "0005_plan"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.add_column(sa.Column("spam", sa.Text(), nullable=False, server_default="{}"))
    op.create_table(
        "junk",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rule", sa.String(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("junked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mail_from", sa.String(), nullable=False),
        sa.Column("rcpt_tos", sa.String(), nullable=False),
        sa.Column("peer", sa.String(), nullable=False),
        sa.Column("helo", sa.String(), nullable=False),
        sa.Column("from_address", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("message_id", sa.String(), nullable=True),
        sa.Column("dedupe_key", sa.String(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("spam", sa.Text(), nullable=False),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=True),
        sa.Column("message_row_id", sa.Integer(), nullable=True),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(), nullable=False),
        sa.Column("released_reason", sa.String(), nullable=False),
        sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["ticket_id"], ["ticket.id"]),
        sa.ForeignKeyConstraint(["message_row_id"], ["message.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("junk", schema=None) as batch_op:
        batch_op.create_index("junk_state_at", ["state", "junked_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_junk_dedupe_key"), ["dedupe_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_junk_from_address"), ["from_address"], unique=False)
        batch_op.create_index(batch_op.f("ix_junk_message_id"), ["message_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_junk_ticket_id"), ["ticket_id"], unique=False)
    op.create_table(
        "blocked_sender",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("by", sa.String(), nullable=False),
        sa.Column("ticket_ref", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("address"),
    )


def downgrade() -> None:
    op.drop_table("blocked_sender")
    with op.batch_alter_table("junk", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_junk_ticket_id"))
        batch_op.drop_index(batch_op.f("ix_junk_message_id"))
        batch_op.drop_index(batch_op.f("ix_junk_from_address"))
        batch_op.drop_index(batch_op.f("ix_junk_dedupe_key"))
        batch_op.drop_index("junk_state_at")
    op.drop_table("junk")
    with op.batch_alter_table("message", schema=None) as batch_op:
        batch_op.drop_column("spam")
