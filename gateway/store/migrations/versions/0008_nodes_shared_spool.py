"""several nodes on one database: the shared spool and the installation's key fingerprint

Revision ID: 0008_nodes
Revises: 0007_conversation
Create Date: 2026-12-03 09:00:00

`spool_entry` is the durable spool in the database (docs/decisions.md D13): with PostgreSQL an SMTP
`250` is answered after the message is committed here, so no accepted message depends on one
node's disk, and every node's pipeline claims from it. It mirrors the SQLite spool's
columns plus the claim (`claimed_by`, `lease_until`) so that a dead node's claims run out.
`installation` holds named facts every node must agree on; today the fingerprint of the
signing key (an HMAC of a constant, never the key).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_nodes"
down_revision = "0007_conversation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spool_entry",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("dedupe_key", sa.String(), nullable=False, unique=True),
        sa.Column("received_at", sa.String(), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("quarantined_at", sa.String(), nullable=True),
        sa.Column("not_before", sa.Float(), nullable=False, server_default="0"),
        sa.Column("accepted_by", sa.String(), nullable=False, server_default=""),
        sa.Column("claimed_by", sa.String(), nullable=False, server_default=""),
        sa.Column("lease_until", sa.Float(), nullable=False, server_default="0"),
    )
    op.create_index("spool_entry_state", "spool_entry", ["state", "id"])
    op.create_table(
        "installation",
        sa.Column("key", sa.String(), primary_key=True),
        sa.Column("value", sa.String(), nullable=False),
        sa.Column("set_by", sa.String(), nullable=False, server_default=""),
        sa.Column("set_at", sa.String(), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_table("installation")
    op.drop_index("spool_entry_state", table_name="spool_entry")
    op.drop_table("spool_entry")
