"""The spool schema (SQLAlchemy Core, dialect-neutral).

* ``messages``   — the envelope sender and its parameters, client, arrival, size;
* ``contents``   — the header block (with our Received line) and the body,
                   kept apart from the envelope: headers || body is the message;
* ``recipients`` — one row per accepted RCPT, each with its own delivery state;
                   one in flight has an ``owner`` (the node delivering it) and a
                   ``lease_until`` (Unix time: past it, any node may claim it).

The same tables on SQLite and PostgreSQL.  :func:`prepare` creates them, or
upgrades a spool of an earlier ``SCHEMA_VERSION`` in place with the
Alembic revisions of mta.spool.migrations (revision ``0001`` is version 1,
which had no owner and no lease; ``0002`` is version 2).  Alembic's
``mta_alembic_version`` table records the revision; ``meta`` keeps recording
the version number too (``schema_version``), as the mta before Alembic
read it.
"""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, Index,
                        Integer, LargeBinary, MetaData, String, Table, Text, inspect, select,
                        text)
from sqlalchemy.engine import Connection

from . import migrations

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


def _too_new(found: object) -> SchemaTooNew:
    return SchemaTooNew(f"spool schema version {found} is newer than this mta supports "
                        f"({SCHEMA_VERSION}); upgrade mta")


def _found(conn: Connection) -> tuple[int, bool]:
    """The schema version of the spool on *conn* (0: none yet) and whether
    Alembic's version table records it; only reads."""
    # Alembic's version table read directly (what its MigrationContext's
    # get_current_heads does): Alembic itself, ~0.25 s to import, is loaded
    # only to change the schema, not by every ``mta queue`` that opens it.
    tables = inspect(conn)
    heads = ([r[0] for r in conn.execute(text(
        f"SELECT version_num FROM {migrations.VERSION_TABLE}"))]
        if tables.has_table(migrations.VERSION_TABLE) else [])
    recorded = (conn.execute(select(meta.c.value).where(meta.c.key == "schema_version"))
                .scalar() if tables.has_table("meta") else None)
    if recorded is not None and (not recorded.isdigit() or int(recorded) > SCHEMA_VERSION):
        raise _too_new(recorded)
    if heads:
        if len(heads) > 1 or not heads[0].isdigit():
            raise _too_new(f"{', '.join(heads)} (Alembic revision)")
        if int(heads[0]) > SCHEMA_VERSION:
            raise _too_new(int(heads[0]))
        return int(heads[0]), True
    if recorded is not None:
        return int(recorded), False
    # Before ``meta`` recorded it: version 1.
    return (1 if tables.has_table("recipients") else 0), False


def version(conn: Connection) -> int:
    """The schema version of the spool on *conn* (0: no spool yet), without
    writing anything.  Raises SchemaTooNew for a newer one."""
    return _found(conn)[0]


def prepare(conn: Connection) -> int:
    """In *conn*'s transaction: create the schema of a new spool, or upgrade
    that of an earlier version in place (Alembic), and record the version;
    answers the version found (0: a new spool).  Raises SchemaTooNew for a
    newer one.  Nodes doing it at once do it one after the other: on
    PostgreSQL under an advisory lock, on SQLite under the write lock
    (``BEGIN IMMEDIATE``, unless *conn* is in a transaction already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
    elif conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    found, stamped = _found(conn)
    if found == 0:
        metadata.create_all(conn)      # a new spool: straight to the head
        _alembic(conn, "stamp", "head")
    else:
        if not stamped:                # as the mta before Alembic left it
            _alembic(conn, "stamp", migrations.revision(found))
        if found < SCHEMA_VERSION:
            _alembic(conn, "upgrade", "head")
    # Also a write when nothing changed: an unwritable spool is found now.
    if conn.execute(meta.update().where(meta.c.key == "schema_version")
                    .values(value=str(SCHEMA_VERSION))).rowcount == 0:
        conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    return found


def _alembic(conn: Connection, cmd: str, revision: str) -> None:
    """Run Alembic's command *cmd* (``"stamp"``, ``"upgrade"``) to
    *revision* on *conn*, in its transaction (see migrations/env.py)."""
    from alembic import command
    from alembic.config import Config
    config = Config()
    config.set_main_option("script_location", migrations.LOCATION.replace("%", "%%"))
    config.attributes["connection"] = conn
    config.attributes["metadata"] = metadata
    getattr(command, cmd)(config, revision)
