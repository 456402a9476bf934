"""outbox claims carry the node's identity and a fencing token

Revision ID: 0004_delivery
Revises: 0003_dns
Create Date: 2026-12-03 08:00:00

`claimed_by` is the node name (stable across restarts), `claim_boot` the run of that node
(new at every start), `claim_token` a counter bumped by every claim: a delivery is recorded
only by the claim whose token is still on the row (a fencing token, as in Kleppmann's
"How to do distributed locking"). See gateway/outbound/worker.py.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_delivery"
down_revision = "0003_dns"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("claimed_by", sa.String(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("claim_boot", sa.String(), nullable=False, server_default=""))
        batch_op.add_column(
            sa.Column("claim_token", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.create_index("outbox_claims", ["state", "claimed_by"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("outbox_claims")
        batch_op.drop_column("claim_token")
        batch_op.drop_column("claim_boot")
        batch_op.drop_column("claimed_by")
