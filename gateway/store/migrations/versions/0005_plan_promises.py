"""promises made to customers and colleagues (docs/decisions.md D11)

Revision ID: 0005_plan
Revises: 0004_delivery
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_plan"
down_revision = "0004_delivery"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "promise",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ticket_id", sa.Integer(), nullable=False),
        sa.Column("made_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("audience", sa.String(), nullable=False),
        sa.Column("to", sa.String(), nullable=False),
        sa.Column("person", sa.String(), nullable=False),
        sa.Column("message_id", sa.String(), nullable=False),
        sa.Column("what", sa.String(), nullable=False),
        sa.Column("clock", sa.String(), nullable=False),
        sa.Column("due", sa.DateTime(timezone=True), nullable=True),
        sa.Column("state", sa.String(), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("told", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["ticket_id"], ["ticket.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("promise", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_promise_ticket_id"), ["ticket_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_promise_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("promise", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_promise_state"))
        batch_op.drop_index(batch_op.f("ix_promise_ticket_id"))
    op.drop_table("promise")
