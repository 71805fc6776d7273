"""ATRN / On-Demand Mail Relay (RFC 2645): protocol unit tests, no sockets.

The ODMR server (mta.smtp.odmr) runs on a StringTransport with a
MemoryReactorClock; AUTH PLAIN is offered in plain text on loopback
(``allow_plaintext_on_loopback``).  Two kinds of ATRN handler:

* a fake one the test controls, for the reply codes before the turn;
* the real chain -- QueueRunner.deliver_over on a real SQLite spool file,
  TurnedCourier, TurnedConnection over the same transport -- with the test
  playing the customer's SMTP server on the turned connection
  (:class:`Customer`), recording byte for byte what it is sent.
"""
from __future__ import annotations

import re

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from mta.auth.checker import make_portal
from mta.auth.passwords import hash_password
from mta.auth.users import UsersFile
from mta.config import RelayConfig, RetryConfig
from mta.delivery.scheduler import QueueRunner
from mta.delivery.smtp_courier import TurnedCourier
from mta.message import InboundMessage, Recipient, new_queue_id
from mta.metrics import Metrics
from mta.smtp.odmr import ODMRFactory
from mta.smtp.settings import Timeouts

from fakespool import SyncSpool
from test_scheduler import logged  # noqa: F401  (fixture)
from smtpwire import HOST, PASSWORD, FakeTLS, TLSTransport, Wire, code, inline, make_factory, plain

GRANTS = {"branch": ("branch.test", "second.test"), "other": ("other.test",)}


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_text("".join(f"{u}:{hash_password(PASSWORD, n=16)}\n"
                            for u in ("branch", "other", "nobody")), encoding="utf-8")
    return UsersFile(str(path))


class FakeHandler:
    """An ATRN handler the test answers: ``calls`` holds (domains, turn, d)."""

    def __init__(self):
        self.calls: list[tuple[tuple[str, ...], object, defer.Deferred]] = []

    def __call__(self, domains, turn):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((tuple(domains), turn, d))
        return d


def odmr_factory(users, handler, *, tls=None, metrics=None, main=None, plaintext=True,
                 cram_md5=None):
    if main is None:
        main = make_factory(auth_plaintext_on_loopback=plaintext, cram_md5=cram_md5,
                            portal=make_portal(users, inline), tls=tls, metrics=metrics)
    return ODMRFactory(main, grants=lambda user: GRANTS.get(user, ()), atrn=handler,
                       timeouts=Timeouts())


class Session(Wire):
    """One ODMR session from 127.0.0.1 on a TLS-capable StringTransport."""

    def __init__(self, factory: ODMRFactory, port: int = 40001):
        self.factory = factory
        peer = IPv4Address("TCP", "127.0.0.1", port)
        super().__init__(factory.buildProtocol(peer),
                         TLSTransport(peerAddress=peer,
                                      hostAddress=IPv4Address("TCP", "127.0.0.1", 366)),
                         factory.main.reactor)

    def ehlo(self) -> list[str]:
        return self.ehlo_keywords("branch-gw.branch.test")

    def login(self, user: str = "branch") -> None:
        self.ehlo()
        assert code(self.cmd(f"AUTH PLAIN {plain(user, PASSWORD)}")) == "235 2.7.0"


# -- EHLO and the commands this port does not take ---------------------------------

def test_ehlo_lists_auth_and_atrn_and_starttls_with_a_certificate(users):
    s = Session(odmr_factory(users, FakeHandler(), tls=FakeTLS()))
    assert s.greeting == [f"220 {HOST} ESMTP mta"]
    kws = s.ehlo()
    assert "ATRN" in kws and "STARTTLS" in kws and "AUTH PLAIN LOGIN" in kws
    assert not {"PIPELINING", "8BITMIME", "DSN", "CHUNKING"} & set(kws)


def test_cram_md5_is_offered_without_tls_plain_and_login_only_with_it(users):
    s = Session(odmr_factory(users, FakeHandler(), tls=FakeTLS(), plaintext=False,
                             cram_md5=lambda: True))
    assert "AUTH CRAM-MD5" in s.ehlo()
    assert code(s.cmd(f"AUTH PLAIN {plain('branch', PASSWORD)}")) == "538 5.7.11"


def test_no_starttls_without_a_certificate(users):
    s = Session(odmr_factory(users, FakeHandler()))
    assert "STARTTLS" not in s.ehlo()


@pytest.mark.parametrize("line", ["MAIL FROM:<a@branch.test>", "RCPT TO:<b@branch.test>",
                                  "DATA", "BDAT 10 LAST", "ETRN branch.test", "TURN"])
def test_mail_commands_get_502(users, line):
    s = Session(odmr_factory(users, FakeHandler()))
    s.login()
    assert code(s.cmd(line)) == "502 5.5.1"


# -- ATRN before the turn -------------------------------------------------------------

def test_atrn_before_auth_is_530(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.ehlo()
    assert code(s.cmd("ATRN")) == "530 5.7.0"
    assert code(s.cmd("ATRN branch.test")) == "530 5.7.0"
    assert h.calls == []


def test_a_domain_not_granted_is_450(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.login("branch")
    assert s.cmd("ATRN branch.test,other.test") == "450 4.7.1 Access denied to mail for other.test"
    assert code(s.cmd("ATRN unknown.test")) == "450 4.7.1"
    assert h.calls == []


def test_a_user_without_grants_is_450(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.login("nobody")
    assert code(s.cmd("ATRN")) == "450 4.7.1"
    assert h.calls == []


def test_a_bad_domain_is_501(users):
    s = Session(odmr_factory(users, FakeHandler()))
    s.login()
    assert code(s.cmd("ATRN branch.test,,x")) == "501 5.5.4"
    assert code(s.cmd("ATRN [192.0.2.1]")) == "501 5.5.4"


def test_atrn_without_argument_asks_for_every_granted_domain(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.login()
    assert s.send("ATRN\r\n") == []          # waits for the handler
    assert h.calls[0][0] == ("branch.test", "second.test")


def test_domains_are_compared_in_one_spelling(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.login()
    assert s.send("ATRN Branch.TEST.\r\n") == []
    assert h.calls[0][0] == ("branch.test",)


def test_nothing_queued_is_453_and_the_session_goes_on(users):
    h = FakeHandler()
    m = Metrics()
    s = Session(odmr_factory(users, h, metrics=m))
    s.login()
    assert s.send("ATRN branch.test\r\nNOOP\r\n") == []    # NOOP waits behind ATRN
    h.calls[0][2].callback(0)
    assert [code(x) for x in s.take()] == ["453 4.3.0", "250 2.0.0"]
    assert m.registry.get_sample_value("mta_atrn_requests_total", {"result": "no_mail"}) == 1


def test_a_temporary_problem_is_451(users):
    h = FakeHandler()
    s = Session(odmr_factory(users, h))
    s.login()
    s.send("ATRN branch.test\r\n")
    h.calls[0][2].errback(RuntimeError("spool locked"))
    assert [code(x) for x in s.take()] == ["451 4.3.0"]
    # The domain is free again.
    s.send("ATRN branch.test\r\n")
    assert len(h.calls) == 2


def test_a_second_session_for_a_domain_in_progress_is_451(users):
    h = FakeHandler()
    f = odmr_factory(users, h)
    a, b = Session(f, 40001), Session(f, 40002)
    a.login()
    b.login()
    assert a.send("ATRN branch.test\r\n") == []
    assert b.cmd("ATRN second.test,branch.test") == (
        "451 4.3.0 ATRN already in progress for branch.test, try again later")
    assert code(b.cmd("ATRN")) == "451 4.3.0"            # all of branch's: branch.test too
    assert len(h.calls) == 1
    h.calls[0][2].callback(0)
    assert [code(x) for x in a.take()] == ["453 4.3.0"]
    b.send("ATRN branch.test\r\n")                        # free again
    assert len(h.calls) == 2


# -- the turn, with the real queue runner -----------------------------------------------

_LINE = re.compile(rb"[^\r\n]*\r\n")


class Customer:
    """The customer's SMTP server on the turned connection: answers our
    client's commands (``ehlo`` keywords), records each transaction
    byte for byte, and can drop the connection after *drop_after*
    messages were accepted (before the next reply) -- or answer each
    RCPT from ``rcpt_replies``."""

    def __init__(self, session: Session, *, ehlo=("PIPELINING", "8BITMIME", "DSN", "SIZE 1000000"),
                 drop_after: int | None = None, rcpt_replies: dict[str, bytes] | None = None):
        self.s = session
        self.ehlo = ehlo
        self.drop_after = drop_after
        self.rcpt_replies = rcpt_replies or {}
        self.received: list[bytes] = []     # what our client sent, all of it
        self.messages: list[dict] = []
        self._buf = b""
        self._data: bytearray | None = None
        self._cur: dict = {}
        self.closed = False

    def greet(self) -> None:
        self.s.clock.advance(0)              # the turn happens on the next reactor turn
        self.s.proto.dataReceived(b"220 branch-gw.branch.test ESMTP customer\r\n")
        self.pump()

    def pump(self) -> None:
        while not self.closed:
            out = self.s.tr.value()
            self.s.tr.clear()
            if not out:
                self.s.clock.advance(0)
                if not self.s.tr.value():
                    return
                continue
            self.received.append(out)
            reply = self._feed(out)
            if reply and not self.closed:
                self.s.proto.dataReceived(reply)

    def drop(self) -> None:
        self.closed = True
        self.s.proto.connectionLost(Failure(ConnectionLost("the dial-up line went down")))

    def _feed(self, data: bytes) -> bytes:
        self._buf += data
        out = b""
        while True:
            if self._data is not None:
                end = self._buf.find(b"\r\n.\r\n")
                if end < 0:
                    return out
                self._data += self._buf[:end + 2]
                self._buf = self._buf[end + 5:]
                self._cur["data"] = bytes(self._data)
                self._data = None
                self.messages.append(self._cur)
                self._cur = {}
                if self.drop_after is not None and len(self.messages) > self.drop_after:
                    self.messages.pop()       # never acknowledged
                    self.drop()
                    return b""
                out += b"250 2.0.0 Ok: queued at the branch\r\n"
                continue
            m = _LINE.match(self._buf)
            if m is None:
                return out
            line = m.group(0)[:-2]
            self._buf = self._buf[m.end():]
            verb = line.split(b" ", 1)[0].upper()
            if verb == b"EHLO":
                kws = "".join(f"250-{k}\r\n" for k in self.ehlo)
                out += f"250-branch-gw.branch.test\r\n{kws}250 HELP\r\n".encode()
            elif verb == b"MAIL":
                self._cur = {"mail": line, "rcpt": []}
                out += b"250 2.1.0 Ok\r\n"
            elif verb == b"RCPT":
                self._cur["rcpt"].append(line)
                addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                out += self.rcpt_replies.get(addr, b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self._data = bytearray()
                out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
            elif verb == b"QUIT":
                out += b"221 2.0.0 Bye\r\n"
                self.quit_seen = True
            elif verb == b"RSET":
                out += b"250 2.0.0 Ok\r\n"
            else:
                out += b"502 5.5.1 what?\r\n"


class NoRoutes:
    """The runner's RouteMap: never asked here (no queue pass runs)."""

    def route_for(self, domain):
        raise AssertionError("no queue pass runs in these tests")

    def close(self):
        pass


class Gateway:
    """The real chain: a QueueRunner on a SQLite spool, wired to an ODMR
    factory as the daemon wires it (mta.tap._atrn_listener)."""

    def __init__(self, tmp_path, users, *, relay=RelayConfig()):
        self.metrics = Metrics()
        self.factory = odmr_factory(users, self._atrn, metrics=self.metrics)
        self.clock = self.factory.main.reactor
        self.clock.advance(1_800_000_000)
        self.spool = SyncSpool(tmp_path / "spool.sqlite")
        self.runner = QueueRunner(self.spool, router=NoRoutes(), couriers={},
                                  hostname=HOST, retry=RetryConfig(first=300, max=3600),
                                  relay=relay, reactor=self.clock, rand=lambda: 0.5,
                                  metrics=self.metrics)
        self.runner.startService()      # no clock.advance: no queue pass runs

    def _atrn(self, domains, turn):
        async def courier(n):
            return TurnedCourier(await turn(n), hostname=HOST)
        return self.runner.deliver_over(domains, courier)

    def put(self, rcpts, sender="alice@example.test", body=b"hello\r\n.dot line\r\n",
            notify=None):
        now = self.clock.seconds()
        qid = new_queue_id(now)
        headers = b"Received: by us\r\nSubject: for the branch\r\n\r\n"
        self.spool.store(InboundMessage(
            queue_id=qid, sender=sender, recipients=[Recipient(a, notify) for a in rcpts],
            headers=headers, body=body, arrival=now, client_address="192.0.2.9",
            helo="client", protocol="ESMTP", size=len(headers) + len(body)))
        return qid

    def states(self) -> list[tuple[str, str, int]]:
        return self.spool.sql("SELECT address, state, attempts FROM recipients "
                              "WHERE queue_id IN (SELECT queue_id FROM messages "
                              "WHERE sender != '') ORDER BY id")

    def session(self, port=40001) -> Session:
        s = Session(self.factory, port)
        s.login()
        return s


def test_atrn_turns_the_connection_and_hands_over_every_pending_recipient(tmp_path, users):
    g = Gateway(tmp_path, users)
    q1 = g.put(["a@branch.test", "b@Branch.Test", "c@elsewhere.test"])
    q2 = g.put(["d@second.test"])
    g.put(["e@other.test"])
    # One of them was tried before and deferred: ATRN takes it too, not yet due.
    g.spool.sql("UPDATE recipients SET state='deferred', attempts=2, "
                "next_attempt=next_attempt+9999 WHERE address='d@second.test'")
    s = g.session()
    assert s.cmd("ATRN") == "250 2.0.0 OK now reversing the connection"
    c = Customer(s)
    c.greet()
    sent = b"".join(c.received)
    assert sent.startswith(f"EHLO {HOST}\r\nMAIL FROM:<alice@example.test> SIZE=".encode())
    assert [m["rcpt"] for m in c.messages] == [[b"RCPT TO:<a@branch.test>",
                                                 b"RCPT TO:<b@Branch.Test>"],
                                                [b"RCPT TO:<d@second.test>"]]
    assert c.messages[0]["data"] == (b"Received: by us\r\nSubject: for the branch\r\n\r\n"
                                     b"hello\r\n..dot line\r\n")
    assert sent.endswith(b"QUIT\r\n")
    assert getattr(c, "quit_seen", False)
    # Recorded through the runner's normal path: delivered; message 2 is gone,
    # message 1 waits for its other recipient, which ATRN did not touch.
    assert g.states() == [("a@branch.test", "delivered", 1), ("b@Branch.Test", "delivered", 1),
                          ("c@elsewhere.test", "queued", 0), ("e@other.test", "queued", 0)]
    messages = {q for (q,) in g.spool.sql("SELECT queue_id FROM messages")}
    assert q1 in messages and q2 not in messages
    assert g.metrics.registry.get_sample_value("mta_atrn_requests_total",
                                               {"result": "turned"}) == 1
    assert g.metrics.registry.get_sample_value("mta_atrn_recipients_total") == 3
    assert g.factory.active == {}


def test_nothing_queued_for_the_domains_is_453(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["x@other.test"])
    s = g.session()
    assert s.cmd("ATRN branch.test") == "453 4.3.0 You have no mail"
    assert s.cmd("QUIT") == "221 2.0.0 Bye"


def test_refusals_are_recorded_4xx_deferred_5xx_bounced(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["ok@branch.test", "later@branch.test", "gone@branch.test"])
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "250 2.0.0"
    c = Customer(s, rcpt_replies={"later@branch.test": b"451 4.2.0 mailbox busy\r\n",
                                  "gone@branch.test": b"550 5.1.1 no such user\r\n"})
    c.greet()
    assert g.states() == [("ok@branch.test", "delivered", 1),
                          ("later@branch.test", "deferred", 1),
                          ("gone@branch.test", "failed", 1)]
    # The 5xx bounced to the sender, as any delivery's would.
    [(to, state)] = g.spool.sql("SELECT r.address, r.state FROM recipients r JOIN messages m "
                                "USING (queue_id) WHERE m.sender = ''")
    assert to == "alice@example.test"
    # The deferred one is handed over by the next ATRN.
    s2 = g.session(40002)
    assert code(s2.cmd("ATRN branch.test")) == "250 2.0.0"
    c2 = Customer(s2)
    c2.greet()
    assert [m["rcpt"] for m in c2.messages] == [[b"RCPT TO:<later@branch.test>"]]


def test_connection_dropped_mid_delivery_keeps_what_was_not_acknowledged(tmp_path, users):
    g = Gateway(tmp_path, users)
    q1 = g.put(["one@branch.test"])
    q2 = g.put(["two@branch.test"])
    q3 = g.put(["three@branch.test"])
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "250 2.0.0"
    c = Customer(s, drop_after=1)      # message 2's end of data gets no reply
    c.greet()
    assert [m["rcpt"] for m in c.messages] == [[b"RCPT TO:<one@branch.test>"]]
    # Message 1 got its 250: delivered (and gone); 2 and 3 stay, for the next ATRN.
    messages = {q for (q,) in g.spool.sql("SELECT queue_id FROM messages")}
    assert q1 not in messages and {q2, q3} <= messages
    assert [(a, st) for a, st, _n in g.states()] == [("two@branch.test", "deferred"),
                                                     ("three@branch.test", "deferred")]
    assert g.factory.active == {}
    # Nothing sent twice: the next ATRN hands over 2 and 3 only.
    s2 = g.session(40002)
    assert code(s2.cmd("ATRN")) == "250 2.0.0"
    c2 = Customer(s2)
    c2.greet()
    assert [m["rcpt"] for m in c2.messages] == [[b"RCPT TO:<two@branch.test>"],
                                                [b"RCPT TO:<three@branch.test>"]]
    assert g.states() == []


def test_connection_lost_before_the_customer_greets_requeues_everything(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "250 2.0.0"
    s.clock.advance(0)
    s.proto.connectionLost(Failure(ConnectionLost()))
    assert g.states() == [("one@branch.test", "queued", 0)]
    assert g.factory.active == {}


def test_second_atrn_for_a_domain_being_handed_over_is_451(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    a = g.session(40001)
    assert code(a.cmd("ATRN branch.test")) == "250 2.0.0"
    b = g.session(40002)
    assert code(b.cmd("ATRN branch.test")) == "451 4.3.0"
    c = Customer(a)
    c.greet()
    assert g.states() == []
    assert code(b.cmd("ATRN branch.test")) == "453 4.3.0"


def test_a_customer_that_refuses_the_turn_keeps_its_mail_queued(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "250 2.0.0"
    s.clock.advance(0)
    s.proto.dataReceived(b"554 5.3.2 not today\r\n")
    assert s.tr.value() == b"QUIT\r\n"
    assert g.states() == [("one@branch.test", "queued", 0)]


def test_the_stop_lets_a_turned_session_finish_then_aborts_it(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "250 2.0.0"
    s.clock.advance(0)
    main = g.factory.main
    main.shutdown()                 # SessionDrain's first step: the turned session goes on
    assert not s.tr.disconnecting and not main.drained()
    main.force_close()              # the grace is over: the turned connection is aborted
    assert s.tr.disconnecting or getattr(s.tr, "aborted", False)
    s.proto.connectionLost(Failure(ConnectionLost()))
    assert g.states() == [("one@branch.test", "queued", 0)]
    assert main.drained()


def test_no_turn_while_stopping(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    h = FakeHandler()
    f = odmr_factory(users, h)
    s = Session(f)
    s.login()
    s.send("ATRN branch.test\r\n")
    f.main.shutting_down = True
    failed = []
    h.calls[0][1](1).addErrback(failed.append)
    assert failed and "stopping" in str(failed[0].value)


def test_the_customer_is_named_by_its_ehlo_domain_or_its_address(tmp_path, users, logged):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    g.put(["two@branch.test"])
    s = Session(g.factory)
    s.send("EHLO \x01bad\r\n")
    assert code(s.cmd(f"AUTH PLAIN {plain('branch', PASSWORD)}")) == "235 2.7.0"
    assert code(s.cmd("ATRN")) == "250 2.0.0"
    Customer(s).greet()
    s2 = g.session(40002)                   # EHLO branch-gw.branch.test
    assert code(s2.cmd("ATRN")) == "453 4.3.0"
    g.put(["three@branch.test"])
    assert code(s2.cmd("ATRN")) == "250 2.0.0"
    Customer(s2).greet()
    relays = [re.search(r"relay=(\S+)", line).group(1) for line in logged if "to=<" in line]
    assert relays == ["127.0.0.1[127.0.0.1]:40001", "127.0.0.1[127.0.0.1]:40001",
                      "branch-gw.branch.test[127.0.0.1]:40002"]


def test_atrn_while_the_queue_runner_is_stopped_is_451(tmp_path, users):
    g = Gateway(tmp_path, users)
    g.put(["one@branch.test"])
    g.runner.stopService()
    s = g.session()
    assert code(s.cmd("ATRN branch.test")) == "451 4.3.0"
    assert g.states() == [("one@branch.test", "queued", 0)]
