"""The spool schema (SQLAlchemy Core, dialect-neutral).

* ``messages``   — the envelope sender and its parameters, client, arrival, size;
* ``contents``   — the header block (with our Received line) and the body,
                   kept apart from the envelope: headers || body is the message;
* ``recipients`` — one row per accepted RCPT, each with its own delivery state.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Index,
                        Integer, LargeBinary, MetaData, String, Table, Text)

SCHEMA_VERSION = 1

metadata = MetaData()

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

messages = Table(
    "messages", metadata,
    Column("queue_id", String(32), primary_key=True),
    Column("sender", Text, nullable=False),          # "" is the null reverse-path <>
    Column("body_type", String(16)),                 # BODY= as given: 7BIT, 8BITMIME, BINARYMIME
    Column("smtputf8", Boolean, nullable=False),
    Column("size_param", BigInteger),                # SIZE= as declared by the client
    Column("ret", String(8)),                        # DSN RET=FULL|HDRS
    Column("envid", Text),                           # DSN ENVID= (xtext)
    Column("auth", Text),                            # AUTH= (xtext or <>)
    Column("client_address", String(64), nullable=False),
    Column("helo", Text, nullable=False),
    Column("protocol", String(16), nullable=False),  # as in Received: ESMTP, ESMTPS, ...
    Column("arrival", Float, nullable=False),        # Unix time
    Column("size", BigInteger, nullable=False),      # octets of headers + body
)

contents = Table(
    "contents", metadata,
    Column("queue_id", String(32),
           ForeignKey("messages.queue_id", ondelete="CASCADE"), primary_key=True),
    Column("headers", LargeBinary, nullable=False),
    Column("body", LargeBinary, nullable=False),
)

recipients = Table(
    "recipients", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("queue_id", String(32),
           ForeignKey("messages.queue_id", ondelete="CASCADE"), nullable=False),
    Column("address", Text, nullable=False),
    Column("notify", String(32)),                    # DSN NOTIFY=
    Column("orcpt", Text),                           # DSN ORCPT= (addr-type;xtext)
    Column("state", String(16), nullable=False),     # queued, inflight, deferred, delivered, failed, held
    Column("attempts", Integer, nullable=False),
    Column("next_attempt", Float, nullable=False),   # Unix time
    Column("last_reply", Text),
    Column("warned", Boolean, nullable=False, default=False),  # delay DSN sent
    Index("recipients_queue_id", "queue_id"),
    Index("recipients_due", "state", "next_attempt"),
)
