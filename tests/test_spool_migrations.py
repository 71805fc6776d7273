"""The spool's schema under Alembic (mta.spool.migrations, run by
mta.spool.schema.prepare), on SQLite and on a real PostgreSQL (tests/pg.py):

* a new spool is at the head revision at once, its tables those of
  mta.spool.schema;
* a spool of schema 1 -- made here with the DDL the first mta ran -- is
  stamped at revision 0001 and upgraded in place, by the daemon or by
  ``mta queue``: its tables are then those of a new spool, its mail is
  there byte for byte and delivered, its old in-flight rows claimable;
* a schema-2 spool made before Alembic is stamped, not altered;
* a spool of a newer revision is refused, not touched;
* ``mta queue`` on a current spool only reads (a read-only database);
* nodes starting at once on one spool (PostgreSQL, or a SQLite file)
  create or upgrade its schema once, one after the other.
"""
from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from twisted.internet.testing import MemoryReactorClock

from test_spool_leases import LEASE, claim, delivered, message, rows, tx

from mta.spool import Spool, SpoolError, make_engine, ops
from mta.spool.admin import AdminError, SpoolAdmin
from mta.spool.interface import MessageChange
from mta.spool.migrations import LOCATION, VERSION_TABLE, revision
from mta.spool.schema import SCHEMA_VERSION, metadata, prepare, version

HEAD = revision(SCHEMA_VERSION)

# What schema 1's metadata.create_all() ran (SQLAlchemy's DDL for it, per
# dialect: the same but for the key column's quoting and the blob/serial types).
SCHEMA_1_DDL = """
CREATE TABLE messages (
    queue_id VARCHAR(32) NOT NULL, sender TEXT NOT NULL, body_type VARCHAR(16),
    smtputf8 BOOLEAN NOT NULL, size_param BIGINT, ret VARCHAR(8), envid TEXT, auth TEXT,
    client_address VARCHAR(64) NOT NULL, helo TEXT NOT NULL, protocol VARCHAR(16) NOT NULL,
    arrival FLOAT NOT NULL, size BIGINT NOT NULL,
    PRIMARY KEY (queue_id));
CREATE TABLE meta ({key} VARCHAR(64) NOT NULL, value VARCHAR(255) NOT NULL,
    PRIMARY KEY ({key}));
CREATE TABLE contents (
    queue_id VARCHAR(32) NOT NULL, headers {blob} NOT NULL, body {blob} NOT NULL,
    PRIMARY KEY (queue_id),
    FOREIGN KEY(queue_id) REFERENCES messages (queue_id) ON DELETE CASCADE);
CREATE TABLE recipients (
    id {serial} NOT NULL, queue_id VARCHAR(32) NOT NULL, address TEXT NOT NULL,
    notify VARCHAR(32), orcpt TEXT, state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL,
    next_attempt FLOAT NOT NULL, last_reply TEXT, warned BOOLEAN NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(queue_id) REFERENCES messages (queue_id) ON DELETE CASCADE);
CREATE INDEX recipients_due ON recipients (state, next_attempt);
CREATE INDEX recipients_queue_id ON recipients (queue_id);
"""
_DIALECT_WORDS = {"sqlite": {"key": '"key"', "blob": "BLOB", "serial": "INTEGER"},
                  "postgresql": {"key": "key", "blob": "BYTEA", "serial": "SERIAL"}}

HEADERS, BODY = b"Subject: old\r\nMessage-ID: <old@origin.test>\r\n\r\n", b"hi\r\n"


def schema_1(engine) -> None:
    """A spool as the first mta left it: schema 1, one message with a
    recipient in flight (its process stopped) and one queued."""
    with engine.begin() as conn:
        for stmt in SCHEMA_1_DDL.format(**_DIALECT_WORDS[conn.dialect.name]).split(";"):
            if stmt.strip():
                conn.exec_driver_sql(stmt)
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
        conn.execute(text(
            "INSERT INTO messages (queue_id, sender, smtputf8, client_address, helo, protocol, "
            "arrival, size) VALUES ('OLD1', 'a@origin.test', false, '127.0.0.1', 'client.test', "
            "'ESMTP', 100.0, :size)"), {"size": len(HEADERS) + len(BODY)})
        conn.execute(text("INSERT INTO contents VALUES ('OLD1', :h, :b)"),
                     {"h": HEADERS, "b": BODY})
        for address, state in (("b@dest.test", "inflight"), ("c@dest.test", "queued")):
            conn.execute(text(
                "INSERT INTO recipients (queue_id, address, state, attempts, next_attempt, "
                "warned) VALUES ('OLD1', :a, :s, 0, 100.0, false)"), {"a": address, "s": state})


from pg import spool_url  # noqa: E402,F401  (fixture "url": SQLite and PostgreSQL)


@pytest.fixture
def engine(url):
    e = make_engine(url)
    yield e
    e.dispose()


def recorded(engine) -> tuple[list[str], str | None]:
    """(Alembic's revisions, meta's schema_version) of the spool."""
    with engine.connect() as c:
        heads = list(MigrationContext.configure(c, opts={"version_table": VERSION_TABLE}).get_current_heads())
        has_meta = inspect(c).has_table("meta")
        v = (c.execute(text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar()
             if has_meta else None)
    return heads, v


def differences(engine) -> list:
    """How the spool's tables differ from mta.spool.schema's (Alembic's
    autogenerate comparison: tables, columns, types, indexes, keys)."""
    with engine.connect() as c:
        return compare_metadata(MigrationContext.configure(c, opts={"version_table": VERSION_TABLE}), metadata)


def test_the_last_revision_is_this_schema_version():
    script = ScriptDirectory(LOCATION)
    assert script.get_current_head() == HEAD
    assert [s.revision for s in script.walk_revisions()][::-1] == [
        revision(v) for v in range(1, SCHEMA_VERSION + 1)]


def test_a_new_spool_is_at_the_head_with_the_tables_of_the_schema(engine):
    with engine.begin() as c:
        assert prepare(c) == 0
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))
    assert differences(engine) == []
    with engine.begin() as c:
        assert prepare(c) == SCHEMA_VERSION          # again: nothing more to do
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))


def test_a_schema_1_spool_is_upgraded_in_place_its_mail_intact_and_deliverable(url, engine):
    schema_1(engine)
    assert recorded(engine) == ([], "1")
    spool = Spool(url, node="A", lease=LEASE, reactor=MemoryReactorClock())
    spool.open()                                     # as the daemon at its start
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))
    assert differences(engine) == []                 # as a new spool's
    spool.open()                                     # again: nothing more to do
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))

    # What mta queue shows of it: the envelope and every byte as stored.
    admin = SpoolAdmin.open(url, hostname="mx.test")
    try:
        m = admin.show("OLD1")
        assert (m.sender, m.size) == ("a@origin.test", len(HEADERS) + len(BODY))
        assert [(r.address, r.state) for r in m.recipients] == [
            ("b@dest.test", "inflight"), ("c@dest.test", "queued")]
    finally:
        admin.close()
    # The row the version-1 process left in flight has no owner and an
    # expired lease: any node takes it; both recipients are delivered.
    assert sorted(rows(engine).values()) == [("inflight", None, 0.0), ("queued", None, None)]
    due = tx(engine, ops.due_recipients, 200.0, 10, "B")
    assert sorted(r.address for r in due) == ["b@dest.test", "c@dest.test"]
    got = claim(engine, "B", [r.id for r in due], 200.0)
    assert len(got.recipients) == 2
    assert (got.messages["OLD1"].headers, got.messages["OLD1"].body) == (HEADERS, BODY)
    assert tx(engine, ops.record_results, [delivered(r.id, 210.0) for r in got.recipients],
              [], ["OLD1"], "B") == ["OLD1"]
    with engine.connect() as c:
        assert c.execute(text("SELECT COUNT(*) FROM messages")).scalar_one() == 0


def test_mta_queue_upgrades_a_schema_1_spool_too(url, engine):
    schema_1(engine)
    admin = SpoolAdmin.open(url, hostname="mx.test")
    try:
        [m] = admin.list_messages()
        assert [(r.address, r.state) for r in m.recipients] == [
            ("b@dest.test", "inflight"), ("c@dest.test", "queued")]
        assert admin.hold(["OLD1"]).messages == (MessageChange("OLD1", changed=1, inflight=1),)
    finally:
        admin.close()
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))
    assert differences(engine) == []


def test_a_schema_2_spool_made_before_alembic_is_stamped_not_changed(url, engine):
    with engine.begin() as c:                        # what the mta before Alembic did
        metadata.create_all(c)
        c.execute(text("INSERT INTO meta VALUES ('schema_version', '2')"))
    tx(engine, ops.insert_messages, [_message()])
    before = rows(engine)
    # mta queue reads it as it is (a current schema: nothing to write) ...
    admin = SpoolAdmin.open(url, hostname="mx.test")
    try:
        assert [m.queue_id for m in admin.list_messages()] == ["NEW1"]
    finally:
        admin.close()
    assert recorded(engine) == ([], "2")
    # ... and the daemon's start records the revision, nothing else.
    with engine.begin() as c:
        assert prepare(c) == 2
    assert recorded(engine) == ([HEAD], "2")
    assert rows(engine) == before and differences(engine) == []


def _message():
    return message("NEW1", 100.0, "b@dest.test")


def test_a_spool_of_a_newer_revision_is_refused_and_left_alone(url, engine):
    with engine.begin() as c:
        prepare(c)
        c.execute(text("UPDATE mta_alembic_version SET version_num = :v"),
                  {"v": revision(SCHEMA_VERSION + 1)})
    with pytest.raises(SpoolError, match=f"schema version {SCHEMA_VERSION + 1} is newer than "
                                         f"this mta supports \\({SCHEMA_VERSION}\\)"):
        Spool(url, node="A", lease=LEASE, reactor=MemoryReactorClock()).open()
    with pytest.raises(AdminError, match=f"version {SCHEMA_VERSION + 1} is newer"):
        SpoolAdmin.open(url, hostname="mx.test")
    assert recorded(engine) == ([revision(SCHEMA_VERSION + 1)], str(SCHEMA_VERSION))


def test_pg_mta_queue_on_a_read_only_current_spool_only_reads(pg_url):
    engine = make_engine(pg_url)
    try:
        with engine.begin() as c:
            prepare(c)
        tx(engine, ops.insert_messages, [_message()])
    finally:
        engine.dispose()
    read_only = f"{pg_url}&options=-c%20default_transaction_read_only%3Don"
    admin = SpoolAdmin.open(read_only, hostname="mx.test")
    try:
        assert [m.queue_id for m in admin.list_messages()] == ["NEW1"]
        with pytest.raises(AdminError, match="read-only transaction"):
            admin.hold(["NEW1"])
    finally:
        admin.close()


def _at_once(url: str, n: int) -> list[int]:
    """prepare() on *n* engines at the same moment; what each answered."""
    engines = [make_engine(url) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list = []

    def start(engine):
        barrier.wait()
        try:
            with engine.begin() as conn:
                results.append(prepare(conn))
        except Exception as e:                       # noqa: BLE001 - reported below
            results.append(e)
    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    return results


def test_nodes_starting_at_once_create_the_schema_once(url, engine):
    """Several nodes (or a daemon and ``mta queue``) opening a new spool at
    the same moment: each prepare() waits for the one before (PostgreSQL:
    an advisory lock; SQLite: the write lock), none fails."""
    results = _at_once(url, 4)
    assert sorted(results) == [0, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION], results
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))


def test_nodes_starting_at_once_on_a_schema_1_spool_upgrade_it_once(url, engine):
    schema_1(engine)
    results = _at_once(url, 4)
    assert sorted(results) == [1, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION], results
    assert recorded(engine) == ([HEAD], str(SCHEMA_VERSION))
    assert differences(engine) == []
    assert sorted(rows(engine).values()) == [("inflight", None, 0.0), ("queued", None, None)]


def test_a_version_is_read_without_writing(engine):
    with engine.connect() as c:
        assert version(c) == 0
        assert not inspect(c).has_table("mta_alembic_version")
