"""The spool schema (SQLAlchemy Core, dialect-neutral).

* ``messages``   — the envelope sender and its parameters, client, arrival, size;
* ``contents``   — the header block (with our Received line) and the body,
                   kept apart from the envelope: headers || body is the message;
* ``recipients`` — one row per accepted RCPT, each with its own delivery state;
                   one in flight has an ``owner`` (the node delivering it) and a
                   ``lease_until`` (Unix time: past it, any node may claim it).

The same tables on SQLite and PostgreSQL.  :func:`prepare` creates them, or
upgrades a spool of an earlier ``SCHEMA_VERSION`` in place (``meta``
records the version): version 1 had no owner and no lease.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Index,
                        Integer, LargeBinary, MetaData, String, Table, Text, inspect, select,
                        text)
from sqlalchemy.engine import Connection

SCHEMA_VERSION = 2

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
    Column("owner", String(255)),                    # inflight: the node that claimed it
    Column("lease_until", Float),                    # inflight: the claim's expiry (Unix time)
    Index("recipients_queue_id", "queue_id"),
    Index("recipients_due", "state", "next_attempt"),
    Index("recipients_owner", "owner"),
)


class SchemaTooNew(Exception):
    """The spool was written by a newer mta (``str()`` says which version)."""


# Taken (PostgreSQL) by whoever creates or upgrades the schema, in that
# transaction: two nodes starting at once do it one after the other.
_SCHEMA_LOCK = 0x6D74_6100


def prepare(conn: Connection) -> int:
    """In *conn*'s transaction: create the tables that are missing, upgrade
    those of an earlier version in place, record the version; answers the
    version found (0: a new spool).  Raises SchemaTooNew for a newer one."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
    existed = inspect(conn).has_table("recipients")
    metadata.create_all(conn)
    row = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).first()
    found = int(row[0]) if row is not None else (1 if existed else 0)
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(f"spool schema version {found} is newer than this mta supports "
                           f"({SCHEMA_VERSION}); upgrade mta")
    if existed and found < 2:
        _upgrade_1_to_2(conn)
    if row is None:
        conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    else:
        # Also a write when nothing changed: an unwritable spool is found now.
        conn.execute(meta.update().where(meta.c.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION)))
    return found


def _upgrade_1_to_2(conn: Connection) -> None:
    """Owners and leases.  A recipient a version-1 process left in flight
    has no owner and an expired lease: any node takes it back."""
    have = {c["name"] for c in inspect(conn).get_columns("recipients")}
    for name in ("owner", "lease_until"):
        if name not in have:
            col = recipients.c[name]
            conn.execute(text(f"ALTER TABLE recipients ADD COLUMN {name} "
                              f"{col.type.compile(conn.dialect)}"))
    if "recipients_owner" not in {i["name"] for i in inspect(conn).get_indexes("recipients")}:
        conn.execute(text("CREATE INDEX recipients_owner ON recipients (owner)"))
    conn.execute(recipients.update().where(recipients.c.state == "inflight")
                 .values(owner=None, lease_until=0.0))
