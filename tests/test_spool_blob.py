"""Large bodies in a SQLite spool: mta.spool.ops.insert_messages inserts the
contents row with a zeroblob and writes the body into it with incremental
blob I/O (sqlite3.Connection.blobopen) -- byte-exact, and in the same
transaction as the rest of the message, so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import sqlite3
import time

import pytest
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer
from twisted.internet.task import Clock

from mta.message import InboundMessage, Recipient, new_queue_id
from mta.spool import Spool, SpoolWriteError, ops

pytestmark = pytest.mark.skipif(not hasattr(sqlite3.Connection, "blobopen"),
                                reason="incremental blob I/O needs Python >= 3.11")

MB = 1024 * 1024


def big_body(size: int = 3 * MB + 12345) -> bytes:
    # Not a multiple of the chunk size, and no two chunks alike.
    return os.urandom(size)


def message(body, rcpts=("u@example.test",)) -> InboundMessage:
    now = time.time()
    qid = new_queue_id(now)
    headers = f"Received: by mx.test id {qid}\r\nSubject: big\r\n\r\n".encode()
    return InboundMessage(qid, "a@origin.test", [Recipient(r) for r in rcpts], headers, body,
                          now, "127.0.0.1", "client.test", "ESMTP", len(headers) + len(body))


@pytest.fixture
def spool(tmp_path):
    s = Spool(f"sqlite:///{tmp_path / 'spool' / 'mta.sqlite'}", node="test-node", lease=300.0,
              reactor=Clock())
    s.open()
    yield s
    s.engine.dispose()


@pytest.fixture
def blob_calls(monkeypatch):
    """The queue ids whose body went through the blob path."""
    calls = []
    real = ops._insert_contents_blob

    def spy(conn, m):
        calls.append(m.queue_id)
        return real(conn, m)
    monkeypatch.setattr(ops, "_insert_contents_blob", spy)
    return calls


def rows(spool: Spool, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(spool.engine.url.database)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def counts(spool: Spool) -> tuple[int, int, int]:
    return tuple(rows(spool, f"SELECT COUNT(*) FROM {t}")[0][0]
                 for t in ("messages", "contents", "recipients"))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_body_round_trips_byte_exact(spool, blob_calls, kind):
    body = big_body()
    small = message(b"Hello.\r\n")
    big = message(kind(body), rcpts=("u@example.test", "v@example.test"))
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [small, big])
    assert blob_calls == [big.queue_id]
    with spool.engine.begin() as conn:
        loaded = ops.load_messages(conn, [small.queue_id, big.queue_id])
    assert bytes(loaded[big.queue_id]["body"]) == body
    assert bytes(loaded[big.queue_id]["headers"]) == big.headers
    assert bytes(loaded[small.queue_id]["body"]) == b"Hello.\r\n"
    assert rows(spool, "SELECT length(body), typeof(body) FROM contents WHERE queue_id = ?",
                (big.queue_id,)) == [(len(body), "blob")]
    assert counts(spool) == (2, 2, 3)


def test_body_at_the_threshold_is_bound_as_before(spool, blob_calls):
    m = message(b"x" * ops.BLOB_THRESHOLD)
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [m])
    assert blob_calls == []
    assert rows(spool, "SELECT body FROM contents")[0][0] == m.body


def test_failure_after_the_blob_write_rolls_everything_back(spool, blob_calls):
    ok = message(b"small")
    bad = message(big_body(), rcpts=(None,))      # recipients.address is NOT NULL
    with pytest.raises(IntegrityError):
        with spool.engine.begin() as conn:
            ops.insert_messages(conn, [ok, bad])
    assert blob_calls == [bad.queue_id]              # the body was written, then undone
    assert counts(spool) == (0, 0, 0)
    # The connection is fine afterwards.
    good = message(big_body())
    with spool.engine.begin() as conn:
        ops.insert_messages(conn, [good])
    assert rows(spool, "SELECT queue_id FROM contents") == [(good.queue_id,)]


def test_group_commit_keeps_good_neighbours_of_a_bad_large_message(spool, blob_calls):
    """The writer's batch: it fails as a whole (rolled back), then each
    message is retried alone: the good one is stored, the bad one is not."""
    good_body = big_body()
    good, bad = message(good_body), message(big_body(), rcpts=(None,))
    batch = [(None, good, defer.Deferred()), (None, bad, defer.Deferred())]
    conn = spool.engine.connect()
    try:
        results = spool._commit_batch(conn, batch)
    finally:
        conn.close()
    assert [(qid, f is None) for _d, qid, f in results] == [(good.queue_id, True), (None, False)]
    assert results[1][2].check(SpoolWriteError)
    assert isinstance(results[1][2].value.__cause__, IntegrityError)
    assert blob_calls == [good.queue_id, bad.queue_id, good.queue_id, bad.queue_id]
    assert rows(spool, "SELECT queue_id, body FROM contents") == [(good.queue_id, good_body)]
    assert counts(spool) == (1, 1, 1)
