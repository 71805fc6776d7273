"""Hold domains and flushes in the queue runner, against a real SQLite spool
file, the real Router (``[routes]`` to IP addresses: no DNS) and a fake
ConnectionPool, with task.Clock for time: held mail is never attempted, its
lifetime still runs (delay DSN, 4.4.7 bounce), a flush relays it once on a
new connection, and concurrent flushes of one domain cost one."""
from __future__ import annotations

import pytest
from twisted.internet import defer, task

from mta.config import RelayConfig, RetryConfig
from mta.delivery.hold_courier import HoldCourier
from mta.delivery.router import Router
from mta.delivery.scheduler import QueueRunner
from mta.delivery.smtp_courier import SMTPCourier
from mta.delivery.types import HOLD_COURIER, Route
from mta.spool import ops

from test_scheduler import FakePool, SyncSpool, dsns, put, status_fields

HOST = "mx.example.test"
BRANCH = "branch.example"


class FreshPool(FakePool):
    """A FakePool that records ``opened_after`` (ConnectionPool.deliver's)."""

    def __init__(self):
        super().__init__()
        self.opened_after: list[float | None] = []

    def deliver(self, hops, msg, opened_after=None):
        self.opened_after.append(opened_after)
        return super().deliver(hops, msg)


class SlowSpool(SyncSpool):
    """Holds back releases (DeliveryQueue.release) until the test lets them go."""

    def __init__(self, path):
        super().__init__(path)
        self.held: list[tuple[defer.Deferred, tuple, dict]] = []
        self.hold_releases = False
        self.releases = 0

    def release(self, *args, **kw):
        self.releases += 1
        if self.hold_releases:
            d: defer.Deferred = defer.Deferred()
            self.held.append((d, args, kw))
            return d
        return super().release(*args, **kw)

    def let_go(self):
        held, self.held = self.held, []
        for d, args, kw in held:
            super().release(*args, **kw).chainDeferred(d)


@pytest.fixture
def gw(tmp_path):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    spool = SlowSpool(tmp_path / "spool.sqlite")
    router = Router(routes={BRANCH: "192.0.2.10:2525", "dest.test": "192.0.2.20:25",
                            "x.branch.example": "192.0.2.30:25"},
                    reactor=clock, hold_domains=[BRANCH])
    pool = FreshPool()
    pool.script["alice@example.test"] = [(451, "4.2.0")]   # DSNs to the sender stay queued

    class G:
        pass
    g = G()
    g.clock, g.spool, g.router, g.pool = clock, spool, router, pool

    def make(retry=RetryConfig(first=300, max=3600, lifetime=5 * 86400, warn_after=None),
             metrics=None):
        smtp = SMTPCourier(router, pool, hostname=HOST)
        g.runner = QueueRunner(spool, router, {"smtp": smtp, HOLD_COURIER: HoldCourier(hostname=HOST)},
                               hostname=HOST, retry=retry, relay=RelayConfig(), reactor=clock,
                               rand=lambda: 0.5, fresh_connections=smtp.fresh_connections,
                               metrics=metrics)
        g.runner.startService()
        return g.runner
    g.make = make
    yield g
    if getattr(g, "runner", None) is not None and g.runner.running:
        g.runner.stopService()


def rows(g):
    """The pending recipients (not delivered) of the messages not from <>."""
    return g.spool.sql("SELECT address, state, attempts, last_reply FROM recipients "
                       "WHERE queue_id IN (SELECT queue_id FROM messages WHERE sender != '') "
                       "AND state != 'delivered' ORDER BY id")


def delivered_to(g):
    return [r.address for _h, m in g.pool.calls for r in m.recipients]


def test_router_routes_a_hold_domain_to_the_hold_courier(gw):
    assert gw.router.route_for("Branch.Example") == Route(HOLD_COURIER, BRANCH)
    assert gw.router.relay_route(BRANCH) == Route("smtp", "route:192.0.2.10:2525:may")
    assert gw.router.route_for("dest.test").courier == "smtp"


def test_held_mail_is_never_attempted(gw):
    put(gw, rcpts=("bob@branch.example", "carol@dest.test"))
    gw.make()
    assert delivered_to(gw) == ["carol@dest.test"]
    assert rows(gw) == [("bob@branch.example", "deferred", 1,
                         "451 4.3.2 waiting for ETRN/ATRN for branch.example")]
    for _ in range(30):                    # hours of retries: still no connection
        gw.clock.advance(3600)
    assert delivered_to(gw) == ["carol@dest.test"]
    [(_a, state, attempts, reply)] = rows(gw)
    assert state == "deferred" and attempts > 10 and "waiting for ETRN/ATRN" in reply


def test_held_mail_gets_a_delay_warning_and_expires_with_4_4_7(gw):
    put(gw, rcpts=("bob@branch.example",))
    gw.make(RetryConfig(first=300, max=3600, lifetime=4 * 3600, warn_after=3600))
    for _ in range(5):
        gw.clock.advance(3600)
    assert gw.pool.calls == []
    reports = [msg for to, msg in dsns(gw) if to == "alice@example.test"]
    assert len(reports) == 2
    kinds = {str(status_fields(m)): m for m in reports}
    text = "\n".join(kinds)
    assert "delayed" in text and "4.3.2" in text
    assert "failed" in text and "4.4.7" in text
    assert "waiting for ETRN/ATRN for branch.example" in text
    assert rows(gw) == []                   # the message is gone, bounced


def test_a_flush_relays_held_mail_once_on_a_new_connection(gw):
    put(gw, rcpts=("bob@branch.example", "dan@branch.example"))
    put(gw, rcpts=("eve@branch.example",))
    runner = gw.make()
    gw.pool.script["dan@branch.example"] = [(451, "4.4.1")]
    assert gw.pool.calls == []
    results = []
    runner.flush_domain("BRANCH.example").addCallback(results.append)
    [rel] = results
    assert (rel.messages, rel.recipients, rel.domains) == (2, 3, (BRANCH,))
    assert sorted(delivered_to(gw)) == ["bob@branch.example", "dan@branch.example",
                                         "eve@branch.example"]
    now = gw.clock.seconds()
    assert gw.pool.opened_after == [now, now]     # a connection opened since the flush
    # dan was deferred by the next hop: held again, not attempted at its next retry.
    assert rows(gw) == [("dan@branch.example", "deferred", 2, "451 4.4.1 reply for "
                         "dan@branch.example")]
    for _ in range(5):
        gw.clock.advance(3600)
    assert len(gw.pool.calls) == 2
    assert rows(gw)[0][3] == "451 4.3.2 waiting for ETRN/ATRN for branch.example"


def test_concurrent_flushes_of_one_domain_cost_one(gw):
    put(gw, rcpts=("bob@branch.example",))
    runner = gw.make()
    gw.spool.hold_releases = True
    got = []
    for _ in range(20):
        runner.flush_domain(BRANCH).addCallback(got.append)
    assert runner.flush_under_way(BRANCH)
    assert gw.spool.releases == 1 and got == []
    gw.spool.let_go()
    assert [(r.messages, r.recipients) for r in got] == [(1, 1)] * 20
    assert delivered_to(gw) == ["bob@branch.example"]
    # More ETRNs while the flush is under way: answered, nothing written again.
    runner.flush_domain(BRANCH).addCallback(got.append)
    assert gw.spool.releases == 1 and len(got) == 21
    # Once its recipients are claimed (the next pass), the flush is over.
    gw.clock.advance(1)
    assert not runner.flush_under_way(BRANCH)
    gw.spool.hold_releases = False
    runner.flush_domain(BRANCH).addCallback(got.append)
    assert gw.spool.releases == 2 and (got[-1].messages, got[-1].recipients) == (0, 0)


def test_a_failed_flush_is_tried_again_by_the_next_etrn(gw):
    put(gw, rcpts=("bob@branch.example",))
    runner = gw.make()
    gw.spool.hold_releases = True
    errors = []
    runner.flush_domain(BRANCH).addErrback(errors.append)
    d, _args, _kw = gw.spool.held.pop()
    d.errback(OSError("database is locked"))
    assert len(errors) == 1 and not runner.flush_under_way(BRANCH)
    gw.spool.hold_releases = False
    got = []
    runner.flush_domain(BRANCH).addCallback(got.append)
    assert got[0].recipients == 1 and delivered_to(gw) == ["bob@branch.example"]


def test_a_flush_of_a_relay_domain_makes_its_deferred_mail_due(gw):
    gw.pool.script["carol@dest.test"] = [(451, "4.4.1"), (250, "2.0.0")]
    put(gw, rcpts=("carol@dest.test",))
    runner = gw.make()
    assert len(gw.pool.calls) == 1
    got = []
    runner.flush_domain("dest.test").addCallback(got.append)
    assert got[0].recipients == 1 and len(gw.pool.calls) == 2
    assert rows(gw) == []


def test_subdomains_and_admin_held_recipients(gw):
    put(gw, rcpts=("a@branch.example", "b@x.branch.example", "c@dest.test"))
    runner = gw.make()
    qid = put(gw, rcpts=("d@branch.example",))
    from mta.spool import admin
    with gw.spool.engine.begin() as conn:
        admin.hold_messages(conn, [qid])
    gw.clock.advance(1)
    got = []
    runner.flush_domain(BRANCH, True).addCallback(got.append)
    # x.branch.example is no hold domain: its recipient went out at once
    # (delivered before the flush); the admin-held one stays held.
    assert sorted(delivered_to(gw)) == ["a@branch.example", "b@x.branch.example", "c@dest.test"]
    assert got[0].domains == ("branch.example",)
    assert ("d@branch.example", "held", 0, None) in rows(gw)


def test_release_by_another_process_is_relayed(gw):
    """``mta queue flush --domain`` (ops.release_domain in its own process)."""
    put(gw, rcpts=("bob@branch.example",))
    runner = gw.make()
    assert gw.pool.calls == []
    with gw.spool.engine.begin() as conn:
        rel = ops.release_domain(conn, BRANCH, False, gw.clock.seconds(), HOST,
                                 "mta queue flush")
    assert rel.recipients == 1
    assert rows(gw)[0][3] == "released for delivery (mta queue flush)"
    gw.clock.advance(1)                     # the runner's next poll
    assert delivered_to(gw) == ["bob@branch.example"]
    assert gw.pool.opened_after == [gw.clock.seconds()]
    assert runner.is_flushing(BRANCH)


def test_held_retries_are_not_counted_as_deferrals(gw):
    from mta.metrics import Metrics
    m = Metrics()
    put(gw, rcpts=("bob@branch.example",))
    gw.make(RetryConfig(first=300, max=3600, lifetime=2 * 3600, warn_after=None), metrics=m)
    for _ in range(3):
        gw.clock.advance(3600)
    text = m.scrape().decode()
    assert 'domain="branch.example",status="deferred"' not in text
    assert 'mta_delivery_recipients_total{domain="branch.example",status="bounced"} 1.0' in text
