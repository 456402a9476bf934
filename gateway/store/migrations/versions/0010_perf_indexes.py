"""escalator's next due moment per ticket; indexes for the per-ticket queries (docs/decisions.md
D16)

Revision ID: 0010_perf
Revises: 0009_templates
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_perf"
down_revision = "0009_templates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        # NULL: to be planned by the escalator (every open ticket is, after this upgrade).
        batch_op.add_column(sa.Column("escalate_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ticket_escalate", ["status", "escalate_at"], unique=False)
        # The escalator's next_due looks at snoozed tickets only (few): by this index.
        batch_op.create_index("ticket_snoozed", ["snoozed_until"], unique=False)
        # Least-open routing counts one owner's open tickets (covering index).
        batch_op.create_index("ticket_owner_status", ["owner", "status"], unique=False)
        # The acknowledgement's response statistics: one queue's last 30 days.
        batch_op.create_index(
            "ticket_queue_created",
            ["queue", "created_at", "first_responded_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.drop_index("ticket_queue_created")
        batch_op.drop_index("ticket_owner_status")
        batch_op.drop_index("ticket_snoozed")
        batch_op.drop_index("ticket_escalate")
        batch_op.drop_column("escalate_at")
