"""Schema 2: owners and leases.  A recipient in flight has an ``owner``
(the node delivering it) and a ``lease_until`` (Unix time: past it, any
node may claim it).  One a version-1 process left in flight gets no owner
and an expired lease: any node takes it back.

Revision ID: 0002
Revises: 0001
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite adds columns in place (batch mode recreates a table only when
    # SQLite's ALTER TABLE cannot do what is asked).
    with op.batch_alter_table("recipients") as batch:
        batch.add_column(sa.Column("owner", sa.String(255)))
        batch.add_column(sa.Column("lease_until", sa.Float))
        batch.create_index("recipients_owner", ["owner"])
    recipients = sa.table("recipients", sa.column("state"), sa.column("owner"),
                          sa.column("lease_until"))
    op.execute(recipients.update().where(recipients.c.state == "inflight")
               .values(owner=None, lease_until=0.0))
