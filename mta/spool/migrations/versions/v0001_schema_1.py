"""Schema 1: messages, contents, recipients, meta -- as the first mta
created them (recipients without owner or lease).

Revision ID: 0001
Revises: (none)
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column("queue_id", sa.String(32), primary_key=True),
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("body_type", sa.String(16)),
        sa.Column("smtputf8", sa.Boolean, nullable=False),
        sa.Column("size_param", sa.BigInteger),
        sa.Column("ret", sa.String(8)),
        sa.Column("envid", sa.Text),
        sa.Column("auth", sa.Text),
        sa.Column("client_address", sa.String(64), nullable=False),
        sa.Column("helo", sa.Text, nullable=False),
        sa.Column("protocol", sa.String(16), nullable=False),
        sa.Column("arrival", sa.Float, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "contents",
        sa.Column("queue_id", sa.String(32),
                  sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("headers", sa.LargeBinary, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "recipients",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("queue_id", sa.String(32),
                  sa.ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("notify", sa.String(32)),
        sa.Column("orcpt", sa.Text),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt", sa.Float, nullable=False),
        sa.Column("last_reply", sa.Text),
        sa.Column("warned", sa.Boolean, nullable=False),
    )
    op.create_index("recipients_queue_id", "recipients", ["queue_id"])
    op.create_index("recipients_due", "recipients", ["state", "next_attempt"])
