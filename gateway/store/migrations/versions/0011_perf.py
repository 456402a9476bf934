"""indexes for the acknowledgement's per-recipient outbox lookups and merged customers
(docs/decisions.md D16)

Revision ID: 0011_perf
Revises: 0010_perf
"""

from __future__ import annotations

from alembic import op

revision = "0011_perf"
down_revision = "0010_perf"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        # The daily acknowledgement cap and the ack window read one recipient's mail of one
        # kind (pipeline/respond.py, pipeline/conversation.py): without it both scanned the
        # whole outbox for every new ticket, a cost growing with every mail ever sent.
        batch_op.create_index("outbox_rcpt_kind", ["rcpt_tos", "kind", "created_at"], unique=False)
    with op.batch_alter_table("customer", schema=None) as batch_op:
        # Merged customers are few; conversation.customer_ids lists them for every new mail.
        batch_op.create_index("customer_merged", ["merged_into_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("customer", schema=None) as batch_op:
        batch_op.drop_index("customer_merged")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("outbox_rcpt_kind")
