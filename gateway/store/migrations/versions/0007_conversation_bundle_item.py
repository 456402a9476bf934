"""bundle_item: new mails of one customer waiting for one bundled ack/notification
(docs/decisions.md D12)

Revision ID: 0007_conversation
Revises: 0006_junk
Create Date: 2026-12-03 08:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_conversation"
down_revision = "0006_junk"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundle_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(), nullable=False),
        sa.Column("recipient", sa.String(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=True),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("how", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"]),
        sa.ForeignKeyConstraint(["message_id"], ["message.id"]),
        sa.ForeignKeyConstraint(["ticket_id"], ["ticket.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("bundle_item", schema=None) as batch_op:
        batch_op.create_index("bundle_item_due", ["state", "due_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_bundle_item_recipient"), ["recipient"], unique=False)
        batch_op.create_index(batch_op.f("ix_bundle_item_ticket_id"), ["ticket_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("bundle_item", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bundle_item_ticket_id"))
        batch_op.drop_index(batch_op.f("ix_bundle_item_recipient"))
        batch_op.drop_index("bundle_item_due")
    op.drop_table("bundle_item")
