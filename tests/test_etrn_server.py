"""ETRN (RFC 1985) in the inbound server: every reply code, with a fake
flush callback (the daemon wires the queue runner's) and the real relay
policy; no sockets (StringTransport, MemoryReactorClock)."""
from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mta.metrics import Metrics
from mta.policy import RelayPolicy
from mta.smtp.server import EtrnStarted, ServerSettings, SMTPServerFactory

from smtpwire import HOST, INSIDE, OUTSIDE, Client, FakeSpool, code


class FakeFlush:
    """The ``etrn`` callback: records its calls; answers with a Deferred the
    test fires, or at once with *answer*."""

    def __init__(self, answer: EtrnStarted | None = EtrnStarted(2, 3, ("branch.example",))):
        self.answer = answer
        self.calls: list[tuple[str, bool, str]] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, domain: str, subdomains: bool, client: str) -> defer.Deferred:
        self.calls.append((domain, subdomains, client))
        if self.answer is not None:
            return defer.succeed(self.answer)
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def factory(flush=None, *, etrn_networks=("127.0.0.0/8",), metrics=None, wired=True):
    policy = RelayPolicy(["127.0.0.0/8"], ["relay.example", ".parent.example"],
                         hold_domains=["branch.example", "sub.hold.example"],
                         etrn_networks=etrn_networks, routed=["routed.example"])
    return SMTPServerFactory(ServerSettings(hostname=HOST), FakeSpool(auto=True), policy,
                             reactor=MemoryReactorClock(), metrics=metrics,
                             etrn=(flush if flush is not None else FakeFlush()) if wired
                             else None)


def client(flush=None, ip=INSIDE, **kw) -> Client:
    c = Client(factory(flush, **kw), ip=ip)
    c.ehlo()
    return c


def test_ehlo_lists_etrn_only_when_wired():
    [rep] = Client(factory()).ehlo()
    assert "250-ETRN" in rep.split("\n") or rep.split("\n")[-1] == "250 ETRN"
    [rep] = Client(factory(wired=False)).ehlo()
    assert "ETRN" not in rep


def test_not_wired_is_502():
    c = client(wired=False)
    assert c.cmd("ETRN branch.example") == "502 5.5.1 ETRN not available"


def test_253_with_the_number_of_messages():
    flush = FakeFlush()
    c = client(flush)
    assert c.cmd("ETRN branch.example") == \
        "253 2.0.0 OK, 2 pending messages for node branch.example started"
    assert flush.calls == [("branch.example", False, INSIDE)]


def test_251_when_nothing_is_queued():
    c = client(FakeFlush(EtrnStarted(0, 0)))
    assert c.cmd("ETRN Branch.Example.") == \
        "251 2.0.0 OK, no messages waiting for node branch.example"


def test_250_when_a_flush_of_that_node_is_under_way():
    c = client(FakeFlush(EtrnStarted(2, 3, ("branch.example",), already=True)))
    assert c.cmd("ETRN branch.example") == \
        "250 2.0.0 OK, queuing for node branch.example started"


def test_at_domain_asks_for_subdomains_too():
    flush = FakeFlush()
    c = client(flush)
    assert code(c.cmd("ETRN @hold.example")) == "253 2.0.0"   # sub.hold.example is below it
    assert code(c.cmd("ETRN @parent.example")) == "253 2.0.0"  # .parent.example relay entry
    assert flush.calls == [("hold.example", True, INSIDE), ("parent.example", True, INSIDE)]


def test_relay_and_routed_domains_are_served():
    flush = FakeFlush()
    c = client(flush)
    assert code(c.cmd("ETRN relay.example")) == "253 2.0.0"
    assert code(c.cmd("ETRN routed.example")) == "253 2.0.0"
    assert code(c.cmd("ETRN x.parent.example")) == "253 2.0.0"
    assert len(flush.calls) == 3


def test_458_for_a_named_queue():
    flush = FakeFlush()
    c = client(flush)
    assert c.cmd("ETRN #branch") == ("458 4.3.0 Unable to queue messages for node #branch: "
                                     "named queues are not supported")
    assert flush.calls == []


def test_459_for_a_domain_not_served_here():
    flush = FakeFlush()
    c = client(flush)
    assert c.cmd("ETRN elsewhere.example") == "459 4.7.1 elsewhere.example: not allowed"
    assert c.cmd("ETRN hold.example") == "459 4.7.1 hold.example: not allowed"  # only below
    assert c.cmd("ETRN @elsewhere.example") == "459 4.7.1 @elsewhere.example: not allowed"
    assert flush.calls == []


def test_459_for_a_client_outside_etrn_networks():
    flush = FakeFlush()
    c = client(flush, ip=OUTSIDE)
    assert c.cmd("ETRN branch.example") == "459 4.7.1 branch.example: not allowed"
    c = client(flush, ip=INSIDE, etrn_networks=())
    assert c.cmd("ETRN branch.example") == "459 4.7.1 branch.example: not allowed"
    c = client(flush, ip=OUTSIDE, etrn_networks=("10.0.0.0/8",))
    assert code(c.cmd("ETRN branch.example")) == "253 2.0.0"
    assert len(flush.calls) == 1


def test_500_without_an_argument():
    c = client()
    assert code(c.cmd("ETRN")) == "500 5.5.2"
    assert code(c.cmd("ETRN ")) == "500 5.5.2"


def test_501_for_a_bad_argument():
    flush = FakeFlush()
    c = client(flush)
    for arg in ("bad..domain", "two words", "[192.0.2.1]", "@", "-x.example", "a_b c"):
        assert code(c.cmd(f"ETRN {arg}")) == "501 5.5.4", arg
    assert flush.calls == []


def test_503_before_helo_and_inside_a_transaction():
    flush = FakeFlush()
    c = Client(factory(flush), ip=INSIDE)
    assert c.cmd("ETRN branch.example") == "503 Send HELO/EHLO first"
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@example.org>").startswith("250")
    assert c.cmd("ETRN branch.example") == \
        "503 5.5.1 ETRN not allowed inside a mail transaction"
    assert c.cmd("RSET").startswith("250")
    assert code(c.cmd("ETRN branch.example")) == "253 2.0.0"
    # After HELO (no enhanced status codes) too.
    c = Client(factory(flush), ip=INSIDE)
    assert c.cmd("HELO client").startswith("250")
    assert c.cmd("ETRN branch.example") == \
        "253 OK, 2 pending messages for node branch.example started"


def test_458_when_the_flush_fails():
    flush = FakeFlush(None)
    c = client(flush)
    assert c.send("ETRN branch.example\r\n") == []
    flush.pending[0].errback(Failure(OSError("database is locked")))
    assert c.take() == ["458 4.3.0 Unable to queue messages for node branch.example: "
                        "try again later"]


def test_pipelined_commands_wait_for_the_flush():
    flush = FakeFlush(None)
    c = client(flush)
    assert c.send("ETRN branch.example\r\nNOOP\r\n") == []
    flush.pending[0].callback(EtrnStarted(1, 1, ("branch.example",)))
    assert [code(r) for r in c.take()] == ["253 2.0.0", "250 2.0.0"]


def test_connection_lost_while_flushing():
    flush = FakeFlush(None)
    c = client(flush)
    c.send("ETRN branch.example\r\n")
    c.lose()
    flush.pending[0].callback(EtrnStarted(1, 1, ("branch.example",)))   # no error, no reply
    assert c.take() == []


def test_turn_stays_502():
    c = client()
    assert code(c.cmd("TURN")) == "502 5.5.1"


def test_metrics_count_each_etrn_by_result():
    m = Metrics()
    c = client(metrics=m)
    c.cmd("ETRN branch.example")
    c.cmd("ETRN elsewhere.example")
    c.cmd("ETRN #q")
    text = m.scrape().decode()
    assert 'mta_etrn_requests_total{result="started"} 1.0' in text
    assert 'mta_etrn_requests_total{result="refused"} 1.0' in text
    assert 'mta_etrn_requests_total{result="unsupported"} 1.0' in text
    assert 'mta_etrn_requests_total{result="no_mail"} 0.0' in text
    assert "mta_etrn_recipients_total 3.0" in text
