"""mta.spool.fast: the hot statements of mta.spool.ops run on pysqlite's own
cursor give what conn.execute gives (rows, row counts, SQLAlchemy's error
types), and the writer fsyncs a commit only when it stores a message."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer
from twisted.internet.task import Clock

from mta.message import InboundMessage, Recipient, new_queue_id
from mta.spool import Spool, fast, ops
from mta.spool.interface import RecipientUpdate
from mta.spool.schema import recipients


def message(*rcpts: str, body: bytes = b"hello\r\n") -> InboundMessage:
    now = time.time()
    qid = new_queue_id(now)
    headers = b"Subject: t\r\n\r\n"
    return InboundMessage(qid, "a@origin.test", [Recipient(r) for r in rcpts], headers,
                          memoryview(bytearray(body)), now, "127.0.0.1", "client.test",
                          "ESMTP", len(headers) + len(body), smtputf8=True)


@pytest.fixture
def spool(tmp_path):
    s = Spool(f"sqlite:///{tmp_path / 'mta.sqlite'}", node="n1", lease=300.0, reactor=Clock())
    s.open()
    yield s
    s.engine.dispose()


def test_claim_and_load_reads_what_was_stored(spool):
    m1, m2 = message("x@a.test", "y@b.test", body=b"one\r\n"), message("z@c.test")
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [m1, m2])
    now = time.time() + 1
    with spool.engine.begin() as conn:
        due = ops.due_recipients(conn, now, 10)
        assert sorted(r.address for r in due) == ["x@a.test", "y@b.test", "z@c.test"]
        assert {r.message_size for r in due} == {m1.size, m2.size}
        claimed = ops.claim_and_load(conn, [r.id for r in due], "n1", now, now + 300)
    assert [r.id for r in claimed.recipients] == [r.id for r in due]
    assert all(r.warned is False for r in claimed.recipients)
    q1 = claimed.messages[m1.queue_id]
    assert (q1.sender, q1.headers, q1.body, q1.smtputf8) == \
        ("a@origin.test", m1.headers, b"one\r\n", True)
    # Claimed: a second claim gets none of them.
    with spool.engine.begin() as conn:
        assert ops.claim_and_load(conn, [r.id for r in due], "n2", now, now + 300).recipients == []
        states = conn.execute(select(recipients.c.state, recipients.c.owner)).all()
    assert set(states) == {("inflight", "n1")}


def test_recording_the_last_recipient_removes_the_message(spool):
    m = message("x@a.test", "y@b.test")
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [m])
    now = time.time() + 1
    with spool.engine.begin() as conn:
        rids = [r.id for r in ops.due_recipients(conn, now, 10)]
        ops.claim_and_load(conn, rids, "n1", now, now + 300)
    done = [RecipientUpdate(rids[0], "delivered", 1, now, "250 ok", False)]
    with spool.engine.begin() as conn:
        assert ops.record_results(conn, done, [], [m.queue_id], "n1") == []
        # Another owner's result is not written.
        other = [RecipientUpdate(rids[1], "delivered", 1, now, "250 ok", False)]
        assert ops.record_results(conn, other, [], [m.queue_id], "n2") == []
    with spool.engine.begin() as conn:
        last = [RecipientUpdate(rids[1], "failed", 1, now, "550 no", False)]
        assert ops.record_results(conn, last, [], [m.queue_id], "n1") == [m.queue_id]
        assert conn.exec_driver_sql("SELECT count(*) FROM recipients").scalar() == 0
        assert conn.exec_driver_sql("SELECT count(*) FROM contents").scalar() == 0


def test_rows_and_errors_are_those_of_conn_execute(spool):
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [message("x@a.test")])
        stmt = select(recipients.c.id, recipients.c.address, recipients.c.warned)
        fast_rows = fast.run(conn, stmt)
        assert fast_rows.rows == [(r.id, r.address, 0) for r in conn.execute(stmt)]
        assert fast_rows.mappings()[0]["address"] == "x@a.test"
    with pytest.raises(IntegrityError) as e:        # recipients.address is NOT NULL
        with spool.engine.begin() as conn:
            ops.insert_messages(conn, [message(None)])  # type: ignore[arg-type]
    assert "NOT NULL" in str(e.value.orig)
    with spool.engine.begin() as conn:
        with pytest.raises(KeyError):
            fast.run(conn, ops._sel_owned, {"ids": [1]})     # no owner given


def _synchronous(spool) -> int:
    return spool._conn.exec_driver_sql("PRAGMA synchronous").scalar()


def test_only_a_commit_that_stores_a_message_is_fsynced(spool):
    """PRAGMA synchronous: 2 FULL (the WAL fsynced at the commit), 1 NORMAL."""
    m = message("x@a.test")
    conn = spool._writer_connection([])
    spool._commit_batch(conn, [(None, m, defer.Deferred())])
    assert _synchronous(spool) == 2
    now = time.time() + 1
    with spool.engine.begin() as c:
        rids = [r.id for r in ops.due_recipients(c, now, 10)]
    spool._commit_batch(conn, [(ops.claim_and_load, (rids, "n1", now, now + 300),
                                defer.Deferred())])
    assert _synchronous(spool) == 1
    spool._commit_batch(conn, [(None, message("y@b.test"), defer.Deferred()),
                               (ops.renew_leases, ("n1", now + 600), defer.Deferred())])
    assert _synchronous(spool) == 2
    conn.close()


def test_the_due_read_merges_the_states_soonest_first_without_sorting_the_queue(spool):
    """Queued, deferred and expired in-flight recipients come soonest first,
    *limit* of them; the read walks the recipients_due index (no sort of
    every due row: that was 3 ms per pass at 3000 queued messages)."""
    msgs = [message(f"r{i}@a.test") for i in range(9)]
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, msgs)
        rows = conn.execute(select(recipients.c.id).order_by(recipients.c.id)).scalars().all()
        # (state, next_attempt, owner, lease_until) per recipient
        base = time.time() - 1000
        setup = [("queued", 5), ("deferred", 1), ("inflight", 3), ("deferred", 8),
                 ("queued", 2), ("inflight", 7), ("held", 0), ("delivered", 0),
                 ("deferred", 2000)]
        for rid, (state, t) in zip(rows, setup):
            expired = state == "inflight" and t == 3
            conn.execute(recipients.update().where(recipients.c.id == rid).values(
                state=state, next_attempt=base + t,
                owner="other" if state == "inflight" else None,
                lease_until=(base if expired else base + 5000) if state == "inflight" else None))
    with spool.engine.begin() as conn:
        due = ops.due_recipients(conn, base + 100, 10, "n1")
        assert [r.address for r in due] == ["r1@a.test", "r4@a.test", "r2@a.test",
                                            "r0@a.test", "r3@a.test"]
        assert [r.address for r in ops.due_recipients(conn, base + 100, 2, "n1")] == \
            ["r1@a.test", "r4@a.test"]
        assert [r.address for r in ops.due_recipients(conn, base + 100, 10, "n1", ["A.test"])] == []
        c = ops._due_skipping(0).compile(dialect=conn.dialect)
        args = ["queued", base, "deferred", base, "inflight", "n1", base, 10, 0]
        plan = " | ".join(r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + c.string,
                                                            tuple(args)))
    assert "TEMP B-TREE" not in plan and "recipients_due" in plan, plan


def test_plain_begins_the_transaction_that_commit_commits_and_raises_as_sqlalchemy(spool, tmp_path):
    """fast.plain("BEGIN IMMEDIATE") takes the write lock in the Connection's
    own transaction: what follows is committed by conn.commit(); a lock held
    by another connection is sqlalchemy's OperationalError, as with
    exec_driver_sql."""
    import sqlite3
    from sqlalchemy.exc import OperationalError
    with spool.engine.connect() as conn:
        fast.plain(conn, "BEGIN IMMEDIATE")
        assert conn.in_transaction() and conn.connection.dbapi_connection.in_transaction
        ops.insert_messages(conn, [message("x@a.test")])
        conn.commit()
        assert not conn.connection.dbapi_connection.in_transaction
    with spool.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM messages").scalar_one() == 1
    other = sqlite3.connect(str(tmp_path / "mta.sqlite"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with spool.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")
            with pytest.raises(OperationalError, match="locked"):
                fast.plain(conn, "BEGIN IMMEDIATE")
            conn.rollback()
    finally:
        other.rollback()
        other.close()
