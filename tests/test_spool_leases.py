"""Claims with leases, on SQLite and on a real PostgreSQL (tests/pg.py):
the spool's operations (mta.spool.ops, mta.spool.admin) as several nodes
use them on one database, and the queue runner's renewal with task.Clock.

* a claimed recipient records its owner and lease; nobody else gets it
  while the lease is live; an expired lease is claimable by another node,
  and the late owner's result then writes nothing (no DSN either);
* the owner renews its claims; its own claims are renewed, never re-claimed;
* at start a node takes back its own old claims and expired ones only;
* ``mta queue hold`` and a claim never overwrite each other -- also when
  they run at the same moment (PostgreSQL: one waits for the other's row
  lock, then re-checks the state);
* two nodes recording the last recipients of one message at once remove it.

(A spool of schema 1 upgrading in place: tests/test_spool_migrations.py.)
"""
from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import select, text
from twisted.internet import defer, task

from fakespool import SyncSpool
from test_scheduler import FakeRouter, HeldPool, smtp
from waiting import wait_for

from mta.config import RelayConfig, RetryConfig
from mta.delivery.scheduler import QueueRunner
from mta.message import InboundMessage, Recipient
from mta.spool import make_engine, ops
from mta.spool.admin import SpoolAdmin
from mta.spool.interface import MessageChange, RecipientUpdate
from mta.spool.schema import prepare, recipients

LEASE = 300.0


from pg import spool_url  # noqa: E402,F401  (fixture "url": SQLite and PostgreSQL)


@pytest.fixture
def db(url):
    engine = make_engine(url)
    with engine.begin() as conn:
        prepare(conn)
    yield engine
    engine.dispose()


def tx(engine, fn, *args, **kw):
    with engine.begin() as conn:
        return fn(conn, *args, **kw)


def message(qid: str, now: float, *rcpts: str) -> InboundMessage:
    headers, body = b"Subject: t\r\n\r\n", b"hi\r\n"
    return InboundMessage(qid, "a@origin.test", [Recipient(r) for r in rcpts], headers, body,
                          now, "127.0.0.1", "client.test", "ESMTP", len(headers) + len(body))


def put(engine, qid: str, *rcpts: str, now: float = 100.0) -> list[int]:
    tx(engine, ops.insert_messages, [message(qid, now, *rcpts)])
    with engine.connect() as c:
        return [r[0] for r in c.execute(select(recipients.c.id)
                                        .where(recipients.c.queue_id == qid)
                                        .order_by(recipients.c.id))]


def claim(engine, node: str, rids, now: float):
    return tx(engine, ops.claim_and_load, list(rids), node, now, now + LEASE)


def rows(engine) -> dict[int, tuple]:
    """id -> (state, owner, lease_until)."""
    with engine.connect() as c:
        return {r.id: (r.state, r.owner, r.lease_until) for r in c.execute(
            select(recipients.c.id, recipients.c.state, recipients.c.owner,
                   recipients.c.lease_until))}


def messages_left(engine) -> int:
    with engine.connect() as c:
        return c.execute(text("SELECT COUNT(*) FROM messages")).scalar_one()


def delivered(rid: int, now: float) -> RecipientUpdate:
    return RecipientUpdate(rid, "delivered", 1, now, "250 ok")


# --------------------------------------------------------------------------- claims

def test_a_claim_records_owner_and_lease_and_nobody_else_gets_it(db):
    r1, r2 = put(db, "Q1", "b@dest.test", "c@dest.test")
    due = tx(db, ops.due_recipients, 200.0, 10, "A")
    assert [r.id for r in due] == [r1, r2]
    got = claim(db, "A", [r1, r2], 200.0)
    assert [r.id for r in got.recipients] == [r1, r2]
    assert got.messages["Q1"].body == b"hi\r\n"
    assert rows(db) == {r1: ("inflight", "A", 500.0), r2: ("inflight", "A", 500.0)}
    # Node B, while A's lease is live: nothing is due, and a claim gets nothing.
    assert tx(db, ops.due_recipients, 499.0, 10, "B") == []
    assert claim(db, "B", [r1, r2], 499.0).recipients == []
    assert rows(db)[r1] == ("inflight", "A", 500.0)


def test_an_expired_lease_goes_to_another_node_and_the_late_owner_writes_nothing(db):
    r1, r2 = put(db, "Q1", "b@dest.test", "c@dest.test")
    claim(db, "A", [r1, r2], 200.0)
    # A stopped renewing (it died, or lost the database): at 501 B takes over.
    assert [r.id for r in tx(db, ops.due_recipients, 501.0, 10, "B")] == [r1, r2]
    assert [r.id for r in claim(db, "B", [r1, r2], 501.0).recipients] == [r1, r2]
    assert rows(db)[r1] == ("inflight", "B", 801.0)
    # A's late result, and the DSN it would owe: neither is written.
    assert tx(db, ops.record_results, [delivered(r1, 510.0), delivered(r2, 510.0)],
              [message("DSN1", 510.0, "a@origin.test")], ["Q1"], "A") == []
    assert rows(db) == {r1: ("inflight", "B", 801.0), r2: ("inflight", "B", 801.0)}
    assert messages_left(db) == 1
    # B's stands, and finishes the message.
    assert tx(db, ops.record_results, [delivered(r1, 520.0), delivered(r2, 520.0)], [],
              ["Q1"], "B") == ["Q1"]
    assert messages_left(db) == 0


def test_renewal_keeps_the_claim_and_an_owner_never_reclaims_its_own(db):
    r1, = put(db, "Q1", "b@dest.test")
    claim(db, "A", [r1], 200.0)
    assert tx(db, ops.renew_leases, "A", 450.0 + LEASE) == 1
    assert tx(db, ops.renew_leases, "B", 450.0 + LEASE) == 0
    assert rows(db)[r1] == ("inflight", "A", 750.0)
    assert claim(db, "B", [r1], 600.0).recipients == []
    # Past the lease, for A its own claim is still not due (it renews, not re-claims) ...
    assert tx(db, ops.due_recipients, 800.0, 10, "A") == []
    assert claim(db, "A", [r1], 800.0).recipients == []
    # ... while for another node it is.
    assert [r.id for r in tx(db, ops.due_recipients, 800.0, 10, "B")] == [r1]


def test_requeue_gives_back_only_what_the_node_still_owns(db):
    r1, r2 = put(db, "Q1", "b@dest.test", "c@dest.test")
    claim(db, "A", [r1], 200.0)
    claim(db, "B", [r2], 200.0)
    assert tx(db, ops.requeue_inflight, [r1, r2], "A") == 1
    assert rows(db) == {r1: ("queued", None, None), r2: ("inflight", "B", 500.0)}


def test_startup_recovery_takes_back_only_own_and_expired_claims(db):
    mine, live, dead = put(db, "Q1", "a@dest.test", "b@dest.test", "c@dest.test")
    claim(db, "A", [mine], 200.0)      # A's own, from before its restart
    claim(db, "B", [live], 400.0)      # B is alive: until 700
    claim(db, "C", [dead], 100.0)      # C died: expired at 400
    assert tx(db, ops.recover_inflight, "A", 450.0) == 2
    assert rows(db) == {mine: ("queued", None, None), live: ("inflight", "B", 700.0),
                        dead: ("queued", None, None)}


def test_records_of_several_nodes_merged_keep_each_owner_check(db):
    r1, = put(db, "Q1", "b@dest.test")
    r2, = put(db, "Q2", "c@dest.test")
    claim(db, "A", [r1], 200.0)
    claim(db, "B", [r2], 200.0)
    # As the group commit merges them (one transaction): A's counts, B's
    # claimed by B is not A's to write.
    calls = [([delivered(r1, 210.0)], [message("D1", 210.0, "a@origin.test")], ["Q1"], "A"),
             ([delivered(r2, 210.0)], [message("D2", 210.0, "a@origin.test")], ["Q2"], "A")]
    assert tx(db, ops.record_calls, calls) == ["Q1"]
    with db.connect() as c:
        assert sorted(r[0] for r in c.execute(text("SELECT queue_id FROM messages"))) == \
            ["D1", "Q2"]
    assert rows(db)[r2] == ("inflight", "B", 500.0)


# --------------------------------------------------------------------------- the administrator

def test_a_hold_between_the_read_and_the_claim_is_not_overwritten(db, url):
    r1, = put(db, "Q1", "b@dest.test")
    due = tx(db, ops.due_recipients, 200.0, 10, "A")
    admin = SpoolAdmin(db, hostname="mx.test")
    assert admin.hold(["Q1"]).messages == (MessageChange("Q1", changed=1),)
    assert claim(db, "A", [r.id for r in due], 200.0).recipients == []
    assert rows(db)[r1] == ("held", None, None)


def test_a_hold_of_a_claimed_recipient_leaves_it_to_its_delivery(db):
    r1, r2 = put(db, "Q1", "b@dest.test", "c@dest.test")
    claim(db, "A", [r1], 200.0)
    admin = SpoolAdmin(db, hostname="mx.test")
    assert admin.hold(["Q1"]).messages == (MessageChange("Q1", changed=1, inflight=1),)
    assert rows(db) == {r1: ("inflight", "A", 500.0), r2: ("held", None, None)}
    # Its result is written; the held one stays held, the message stays.
    assert tx(db, ops.record_results, [delivered(r1, 210.0)], [], ["Q1"], "A") == []
    assert rows(db)[r1] == ("delivered", None, None)


@pytest.fixture
def pg(pg_url):
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        prepare(conn)
    yield engine
    engine.dispose()


def waiting_for_a_lock(engine) -> bool:
    with engine.connect() as c:
        return c.execute(text("SELECT COUNT(*) FROM pg_stat_activity WHERE "
                              "wait_event_type = 'Lock' AND datname = current_database()")
                         ).scalar_one() > 0


def in_thread(fn, *args):
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:      # reported by the test
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_pg_two_nodes_claiming_at_once_skip_each_others_rows(pg):
    r1, r2 = put(pg, "Q1", "b@dest.test", "c@dest.test")
    with pg.connect() as a:
        got = ops.claim_and_load(a, [r1], "A", 200.0, 500.0)       # not committed yet
        assert [r.id for r in got.recipients] == [r1]
        # B does not wait for A's transaction: it skips the row A holds.
        assert [r.id for r in claim(pg, "B", [r1, r2], 200.0).recipients] == [r2]
        a.commit()
    assert rows(pg) == {r1: ("inflight", "A", 500.0), r2: ("inflight", "B", 500.0)}


def test_pg_a_hold_at_the_moment_of_a_claim_does_not_overwrite_it(pg):
    r1, = put(pg, "Q1", "b@dest.test")
    admin = SpoolAdmin(pg, hostname="mx.test")
    with pg.connect() as a:
        ops.claim_and_load(a, [r1], "A", 200.0, 500.0)              # not committed yet
        t, out = in_thread(admin.hold, ["Q1"])
        wait_for(lambda: waiting_for_a_lock(pg), 10, "the hold to wait for the claim's lock")
        a.commit()
    t.join(10)
    assert "error" not in out
    assert out["value"].messages == (MessageChange("Q1", changed=0, inflight=1),)
    assert rows(pg)[r1] == ("inflight", "A", 500.0)


def test_pg_a_claim_at_the_moment_of_a_hold_gets_nothing(pg):
    r1, = put(pg, "Q1", "b@dest.test")
    from mta.spool.admin import hold_messages
    with pg.connect() as a:
        hold_messages(a, ["Q1"])                                    # not committed yet
        assert claim(pg, "A", [r1], 200.0).recipients == []        # skips the locked row
        a.commit()
    assert rows(pg)[r1] == ("held", None, None)


def test_pg_two_nodes_recording_the_last_recipients_at_once_remove_the_message(pg):
    r1, r2 = put(pg, "Q1", "b@dest.test", "c@dest.test")
    claim(pg, "A", [r1], 200.0)
    claim(pg, "B", [r2], 200.0)
    with pg.connect() as a:
        assert ops.record_results(a, [delivered(r1, 210.0)], [], ["Q1"], "A") == []
        # B records the last one while A's transaction is open: it waits for
        # the message's row, then sees A's update -- and removes the message.
        t, out = in_thread(tx, pg, ops.record_results, [delivered(r2, 210.0)], [], ["Q1"], "B")
        wait_for(lambda: waiting_for_a_lock(pg), 10, "B's record to wait for A's")
        a.commit()
    t.join(10)
    assert out.get("value") == ["Q1"], out
    assert messages_left(pg) == 0


# --------------------------------------------------------------------------- the runner

@pytest.fixture
def runner_env(url, tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    target = url if url.startswith("postgresql") else tmp_path / "mta.sqlite"
    spool = SyncSpool(target, node="A", lease=LEASE)
    pool = HeldPool()
    pool.hold = {"slow.test"}
    router = FakeRouter()
    runner = QueueRunner(spool, router, smtp(router, pool), hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=clock, rand=lambda: 0.5, lease=LEASE)
    yield clock, spool, pool, runner
    if runner.running:
        runner.stopService()
    spool.engine.dispose()


def another_node(spool: SyncSpool, node: str) -> SyncSpool:
    """A SyncSpool on the same database, claiming as *node*."""
    url = spool.url
    return SyncSpool(url if url.startswith("postgresql") else url.removeprefix("sqlite:///"),
                     node=node, lease=LEASE)


class CountingSpool(SyncSpool):
    """SyncSpool that counts its renewals."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.renewals: list[float] = []

    def renew(self, now):
        self.renewals.append(now)
        return super().renew(now)


def state_of(spool) -> list[tuple]:
    return spool.sql("SELECT address, state, owner, lease_until FROM recipients ORDER BY id")


def test_the_runner_renews_its_leases_while_the_delivery_runs(runner_env):
    clock, spool, pool, runner = runner_env
    t0 = clock.seconds()
    spool.store(message("Q1", t0, "b@slow.test"))
    runner.startService()
    assert state_of(spool) == [("b@slow.test", "inflight", "A", t0 + LEASE)]
    for n in (1, 2, 3, 4):              # past the first lease: renewed every third of it
        clock.advance(LEASE / 3)
        assert state_of(spool) == [("b@slow.test", "inflight", "A", t0 + n * LEASE / 3 + LEASE)]
    other = another_node(spool, "B")
    assert other.due(clock.seconds(), 10).result == []
    pool.fire()                         # delivered: recorded, the message gone
    assert spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]
    other.engine.dispose()


def test_a_delivery_whose_lease_another_node_took_records_nothing(runner_env):
    clock, spool, pool, runner = runner_env
    t0 = clock.seconds()
    spool.store(message("Q1", t0, "b@slow.test"))
    runner.startService()
    [(rid,)] = spool.sql("SELECT id FROM recipients")
    # A cannot renew (say the database was away from it) and its lease runs
    # out: node B claims the recipient and delivers it.
    spool.sql("UPDATE recipients SET lease_until = ?", t0 + 1)
    other = another_node(spool, "B")
    clock.advance(10)
    got = other.claim_and_load([rid], clock.seconds()).result
    assert [r.id for r in got.recipients] == [rid]
    # A's delivery ends with a failure: it is not A's to record (no bounce).
    pool.script["b@slow.test"] = [(550, "5.1.1")]
    pool.fire()
    assert state_of(spool) == [("b@slow.test", "inflight", "B", clock.seconds() + LEASE)]
    assert spool.sql("SELECT COUNT(*) FROM messages") == [(1,)]
    other.record([delivered(rid, clock.seconds())], [], ["Q1"]).result
    assert spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]
    other.engine.dispose()


def test_the_runner_stops_renewing_when_nothing_is_in_flight(url, tmp_path):
    clock = task.Clock()
    clock.advance(1_000_000)
    spool = CountingSpool(url if url.startswith("postgresql") else tmp_path / "mta.sqlite",
                          node="A", lease=LEASE)
    pool = HeldPool()
    pool.hold = {"slow.test"}
    router = FakeRouter()
    runner = QueueRunner(spool, router, smtp(router, pool), hostname="mx.example.test",
                         retry=RetryConfig(first=300, max=3600, lifetime=86400),
                         relay=RelayConfig(), reactor=clock, rand=lambda: 0.5, lease=LEASE)
    try:
        spool.store(message("Q1", clock.seconds(), "b@slow.test"))
        runner.startService()
        clock.advance(LEASE / 3)
        assert len(spool.renewals) == 1
        pool.fire()
        clock.advance(LEASE / 3)
        clock.advance(LEASE / 3)
        assert len(spool.renewals) == 1      # nothing of A's in flight: nothing to renew
        assert spool.sql("SELECT COUNT(*) FROM messages") == [(0,)]
    finally:
        runner.stopService()
        spool.engine.dispose()


# --------------------------------------------------------------------------- node names

def test_a_generated_node_name_is_new_per_start_and_a_dead_one_is_known_as_ours():
    import socket
    import subprocess
    import sys

    from mta.spool.node import left_by_a_dead_process, node_name
    assert node_name("mx1") == "mx1"
    a, b = node_name(""), node_name("")
    assert a != b and a.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        alive = f"{socket.gethostname()}-{child.pid}-abcdef"
        assert not left_by_a_dead_process(alive)
    finally:
        child.communicate(b"")
    assert left_by_a_dead_process(alive)                   # its process is gone now
    assert not left_by_a_dead_process(f"elsewhere.test-{child.pid}-abcdef")   # another host
    assert not left_by_a_dead_process("mx1")               # a configured name: never


def test_startup_recovery_takes_back_what_an_earlier_start_here_left(db):
    old, live = put(db, "Q1", "a@dest.test", "b@dest.test")
    claim(db, "A-earlier", [old], 400.0)
    claim(db, "B", [live], 400.0)
    assert tx(db, ops.recover_inflight, "A-now", 450.0, lambda o: o == "A-earlier") == 1
    assert rows(db) == {old: ("queued", None, None), live: ("inflight", "B", 700.0)}


def test_an_atrn_claim_is_a_claim_with_a_lease_too(db):
    mine, others, held, elsewhere = put(db, "Q1", "a@branch.test", "b@branch.test",
                                        "c@branch.test", "d@other.test")
    claim(db, "B", [others], 200.0)
    tx(db, lambda c: c.execute(recipients.update().where(recipients.c.id == held)
                               .values(state="held")))
    got = tx(db, ops.claim_domains, ["branch.test"], "mx.test", "A", 300.0, 300.0 + LEASE)
    assert [r.id for r in got.recipients] == [mine]
    assert rows(db) == {mine: ("inflight", "A", 600.0), others: ("inflight", "B", 500.0),
                        held: ("held", None, None), elsewhere: ("queued", None, None)}
