"""the ticket's letter language and brand (docs/decisions.md D17)

Revision ID: 0009_templates
Revises: 0008_nodes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_templates"
down_revision = "0008_nodes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.add_column(sa.Column("language", sa.String(), nullable=False, server_default=""))
        batch_op.add_column(sa.Column("brand", sa.String(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("ticket", schema=None) as batch_op:
        batch_op.drop_column("brand")
        batch_op.drop_column("language")
