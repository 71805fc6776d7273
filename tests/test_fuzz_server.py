"""A hypothesis state machine drives the inbound server (StringTransport,
MemoryReactorClock, a spool the test controls) with random sessions: valid
commands, garbage, DATA with bare LFs and dots, BDAT chunks of random sizes,
pipelined bursts cut at random points, spool writes that succeed, fail,
raise or hang, timeouts, and connections that go away.

Invariants, after every step:

* every octet written is part of a well-formed SMTP reply (``ddd`` + space or
  hyphen, CRLF-terminated; the lines of a multi-line reply share their code),
  output always ends at the end of a reply, and nothing follows a closing
  221 or 421;
* nothing escapes ``dataReceived`` or a spool callback, and nothing is
  logged as an error (a traceback) except the spool failures we cause;
* a message was stored if and only if it got ``250 ... queued as <its id>``
  on a connection that was still there; everything stored is whole: it has
  recipients the relay policy allows, CRLF line endings, no line over 998
  octets, no more than max_message_size octets.
"""
from __future__ import annotations

import re

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mta.message import InboundMessage
from mta.policy import RelayPolicy
from mta.smtp.data import has_bare_newline, has_long_line
from mta.smtp.server import ServerSettings, SMTPServerFactory

MAX_SIZE = 600
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\r\n")
_QUEUED = re.compile(rb"^250 (?:2\.0\.0 )?Ok: queued as (\S+)$")


class ControlledSpool:
    """A :class:`mta.message.MessageStore` whose store() does what ``mode``
    says: "ok" and "fail" answer at once, "raise" raises, "hold" returns a
    Deferred fired later by release()."""

    def __init__(self):
        self.mode = "ok"
        self.held: list[tuple[object, defer.Deferred, object]] = []
        self.deferreds: list[defer.Deferred] = []
        self.calls = 0
        self.stored: dict[str, tuple[object, object]] = {}   # qid -> (msg, session)
        self.session = None        # set by the machine: the session storing now

    def store(self, msg: InboundMessage) -> Deferred[str]:
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("the spool fell over")
        if self.mode == "fail":
            d = defer.fail(Failure(OSError(28, "No space left on device")))
        elif self.mode == "ok":
            self.stored[msg.queue_id] = (msg, self.session)
            d = defer.succeed(msg.queue_id)
        else:
            d = defer.Deferred()
            self.held.append((msg, d, self.session))
        self.deferreds.append(d)
        return d

    def release(self, ok: bool) -> None:
        msg, d, session = self.held.pop(0)
        if ok:
            self.stored[msg.queue_id] = (msg, session)
            d.callback(msg.queue_id)
        else:
            d.errback(Failure(OSError(5, "I/O error")))


class Session:
    def __init__(self, factory: SMTPServerFactory, number: int, ip: str):
        self.number = number
        addr = IPv4Address("TCP", ip, 1000 + number)
        self.proto = factory.buildProtocol(addr)
        self.tr = StringTransport(peerAddress=addr)
        self.out = b""            # everything written, for the checks
        self.lost = False
        self.proto.makeConnection(self.tr)

    def collect(self) -> None:
        self.out += self.tr.value()
        self.tr.clear()


# -- input strategies ----------------------------------------------------------------

ADDRESSES = st.sampled_from([
    b"<u@example.test>", b"<v@example.test>", b"<w@Example.Test>", b"<U@EXAMPLE.TEST>", b"<postmaster>", b"<x@foreign.test>",
    b"<a%b@example.test>", b"<@r.test:u@example.test>", b"<u@[127.0.0.1]>", b"<>",
    b"<\"q s\"@example.test>", b"<\xc3\xa9@example.test>", b"u@example.test", b"<bad",
])
MAIL_PARAMS = st.sampled_from([b"", b" SMTPUTF8", b" BODY=8BITMIME", b" BODY=BINARYMIME",
                               b" SIZE=100", b" SIZE=999999", b" RET=HDRS ENVID=x", b" FOO=bar",
                               b" AUTH=<>"])
RCPT_PARAMS = st.sampled_from([b"", b" NOTIFY=NEVER", b" NOTIFY=SUCCESS,FAILURE",
                               b" ORCPT=rfc822;u@example.test", b" NOTIFY=bogus"])
SIMPLE = st.sampled_from([
    b"EHLO client.test", b"HELO client.test", b"EHLO", b"ehlo x", b"RSET", b"NOOP",
    b"NOOP args", b"DATA", b"DATA x", b"VRFY u", b"VRFY", b"EXPN list", b"HELP", b"QUIT",
    b"STARTTLS", b"AUTH PLAIN AGJvYgBwdw==", b"AUTH LOGIN", b"ETRN x", b"TURN", b"SEND x",
    b"BDAT", b"BDAT x", b"BDAT -1", b"MAIL", b"RCPT", b"MAIL TO:<x@y>", b"",
    b"\x00", b"NOOP\x00", b"\xff\xfe", b"MA\xc4\xb1L FROM:<a@b.test>", b"NOOP\rNOOP",
])


# Input pieces are (octets, expectations): an expectation (marker, content)
# says that a message stored whose content starts with the marker line must be
# exactly that content (it is computed here the simple way, from the RFC's
# definitions, not with the server's code); content None: no telling.

def _marker(draw) -> bytes:
    return b"X-Id: %d\r\n" % draw(st.integers(0, 10**9))


@st.composite
def command(draw) -> tuple:
    kind = draw(st.integers(0, 9))
    if kind <= 2:
        line = b"MAIL FROM:" + draw(ADDRESSES) + draw(MAIL_PARAMS)
    elif kind <= 5:
        line = b"RCPT TO:" + draw(ADDRESSES) + draw(RCPT_PARAMS)
    elif kind == 6:
        line = draw(st.binary(max_size=30)).replace(b"\n", b"")
    elif kind == 7:
        line = b"NOOP " + b"x" * draw(st.sampled_from([500, 505, 506, 507, 2000]))
    else:
        line = draw(SIMPLE)
    return line + draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])), ()


GOOD_PIECES = [b"Subject: x\r\n", b"\r\n", b".", b"..", b"\r\n.\r\n", b"a", b"text ",
               b"\x00", b"\xff", b"MAIL FROM:<z@example.test>\r\n", b"x" * 200, b"\r\n..\r\n",
               b"QUIT\r\n", b"\r\n.", b".\r\n"]
BAD_PIECES = [b"\n", b"\r", b"\n.\n", b"\r\n.\r", b"y" * 1000]
CONTENT_PIECES = st.one_of(st.sampled_from(GOOD_PIECES), st.sampled_from(GOOD_PIECES),
                           st.sampled_from(GOOD_PIECES + BAD_PIECES))


@st.composite
def data_block(draw) -> tuple:
    """DATA, content, and (usually) the terminator."""
    marker = _marker(draw)
    body = marker + b"".join(draw(st.lists(CONTENT_PIECES, max_size=12)))
    end = draw(st.sampled_from([b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b""]))
    # The DATA line's CRLF counts as the one before the first line.
    text = b"\r\n" + body + end
    i = text.find(b"\r\n.\r\n")
    expect = ((marker, text[:i + 2].replace(b"\r\n.", b"\r\n")[2:] if i >= 0 else None),)
    return b"DATA\r\n" + body + end, expect


@st.composite
def bdat_chunk(draw) -> tuple:
    marker = _marker(draw)
    payload = marker + b"".join(draw(st.lists(CONTENT_PIECES, max_size=6)))
    size = draw(st.one_of(st.just(len(payload)), st.integers(0, 50), st.just(MAX_SIZE + 1)))
    last = draw(st.sampled_from([b"", b" LAST", b" last"]))
    # A chunk starting with its marker is the first of its message: if it
    # is the last as well, the message is this payload.
    expect = ((marker, payload if last and size == len(payload) else None),)
    return b"BDAT %d%s\r\n" % (size, last) + payload[:size], expect


@st.composite
def transaction(draw) -> tuple:
    """A plausible whole transaction, so that messages do get stored."""
    rcpts = draw(st.lists(st.one_of(st.integers(1, 9).map(lambda i: b"<r%d@example.test>" % i),
                                    ADDRESSES), min_size=1, max_size=5, unique=True))
    out = draw(st.sampled_from([b"", b"", b"RSET\r\n", b"EHLO again.test\r\n"]))
    out += b"MAIL FROM:<s@origin.test>" + draw(st.one_of(st.just(b""), MAIL_PARAMS)) + b"\r\n"
    out += b"".join(b"RCPT TO:" + r + b"\r\n" for r in rcpts)
    if draw(st.booleans()):
        data, expect = draw(data_block())
    else:
        chunks = draw(st.lists(bdat_chunk(), min_size=1, max_size=3))
        data = b"".join(c for c, _ in chunks)
        expect = chunks[0][1] if len(chunks) == 1 else tuple(
            (marker, None) for _, e in chunks for marker, _ in e)
    return out + data, expect


INPUT = st.one_of(transaction(), command(), transaction(), data_block(), bdat_chunk(),
                  transaction(), st.binary(max_size=40).map(lambda b: (b, ())))


class ServerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.clock = MemoryReactorClock()
        self.spool = ControlledSpool()
        settings_ = ServerSettings(hostname="mx.fuzz.test", max_message_size=MAX_SIZE,
                                   max_recipients=4, max_errors=30, command_timeout=300,
                                   data_timeout=600)
        self.policy = RelayPolicy(["10.0.0.0/8"], ["example.test"])
        self.factory = SMTPServerFactory(settings_, self.spool, self.policy, reactor=self.clock)
        self.sessions: list[Session] = []
        self.errors: list[dict] = []
        self.ips = ["192.0.2.1", "10.1.2.3"]
        self.expect: dict[bytes, bytes | None] = {}   # marker line -> content (None: ambiguous)
        self.checked = 0
        globalLogPublisher.addObserver(self._observe)
        self._connect()

    def teardown(self):
        globalLogPublisher.removeObserver(self._observe)

    def _observe(self, event: dict) -> None:
        if event.get("log_failure") is not None or (
                event.get("log_level") is not None and event["log_level"].name in
                ("error", "critical") and "spool failure" not in event.get("log_format", "")):
            self.errors.append(event)

    @property
    def current(self) -> Session:
        return self.sessions[-1]

    def _connect(self) -> None:
        n = len(self.sessions)
        session = Session(self.factory, n, self.ips[n % 2])
        self.sessions.append(session)
        self.spool.session = session
        if n % 4 != 3:       # most sessions start well; the others start anyhow
            session.proto.dataReceived(b"EHLO client.test\r\n")
        session.collect()

    # -- rules ---------------------------------------------------------------------
    @precondition(lambda self: not self.current.lost)
    @rule(pieces=st.lists(INPUT, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10**6),
                                                                       max_size=5))
    def send(self, pieces, cuts):
        data = b"".join(p for p, _ in pieces)
        for _, expectations in pieces:
            for marker, content in expectations:
                if marker in self.expect:
                    content = None            # the same marker twice: no telling
                self.expect[marker] = content
        points = sorted({c % (len(data) + 1) for c in cuts})
        prev = 0
        session = self.current
        self.spool.session = session
        for p in points + [len(data)]:
            if p > prev:
                session.proto.dataReceived(data[prev:p])
                session.collect()
            prev = p

    @rule(mode=st.sampled_from(["ok", "ok", "fail", "raise", "hold", "hold"]))
    def spool_mode(self, mode):
        self.spool.mode = mode

    @precondition(lambda self: self.spool.held)
    @rule(ok=st.booleans())
    def release(self, ok):
        self.spool.release(ok)
        for s in self.sessions:
            s.collect()

    @rule(seconds=st.sampled_from([1, 30, 299, 301, 601]))
    def advance(self, seconds):
        self.clock.advance(seconds)
        for s in self.sessions:
            s.collect()

    @precondition(lambda self: not self.current.lost)
    @rule()
    def client_goes(self):
        self._lose(self.current)
        self._connect()

    @precondition(lambda self: not self.current.lost and self.current.tr.disconnecting)
    @rule()
    def server_closed(self):
        """The server closed the connection: the reactor tells the protocol."""
        self._lose(self.current)
        self._connect()

    def _lose(self, session: Session) -> None:
        session.lost = True
        session.proto.connectionLost(Failure(ConnectionError("gone")))
        session.collect()

    # -- invariants ----------------------------------------------------------------
    @invariant()
    def replies_are_well_formed(self):
        for s in self.sessions:
            pos = 0
            out = s.out
            code = None
            closing_at = None
            while pos < len(out):
                m = _REPLY_LINE.match(out, pos)
                assert m, f"session {s.number}: malformed output at {pos}: {out[pos:pos + 80]!r}"
                assert closing_at is None, f"session {s.number}: output after {closing_at!r}"
                if code is not None:
                    assert m.group(1) == code, f"multi-line reply changed code: {out!r}"
                code = m.group(1) if m.group(2) == b"-" else None
                if code is None and m.group(1) in (b"221", b"421"):
                    closing_at = m.group(0)
                pos = m.end()
            assert code is None, f"session {s.number}: output ends inside a multi-line reply"
            assert b"Traceback" not in out

    @invariant()
    def nothing_went_wrong(self):
        assert not self.errors, self.errors
        for d in self.spool.deferreds:
            if d.called:
                assert not isinstance(d.result, Failure), d.result

    @invariant()
    def stored_if_and_only_if_queued(self):
        queued: dict[str, Session] = {}
        for s in self.sessions:
            for line in s.out.split(b"\r\n"):
                m = _QUEUED.match(line)
                if m:
                    qid = m.group(1).decode()
                    assert qid not in queued, f"queue id {qid} given twice"
                    queued[qid] = s
        for qid, s in queued.items():
            assert qid in self.spool.stored, f"250 for {qid}, which was not stored"
            assert self.spool.stored[qid][1] is s
        for qid, (msg, s) in self.spool.stored.items():
            if qid not in queued:
                # Only a client that went away before the commit returned
                # may miss its 250.
                assert s.lost, f"{qid} stored without a 250 to a connected client"

    @invariant()
    def stored_messages_are_whole(self):
        for qid, (msg, s) in self.spool.stored.items():
            assert msg.recipients and len(msg.recipients) <= 4
            client = s.proto.client_ip
            for r in msg.recipients:
                if self.policy.client_may_relay(client):
                    continue
                assert r.address.lower() == "postmaster" or \
                    r.address.lower().endswith("@example.test"), (client, r.address)
            content = bytes(msg.headers) + bytes(msg.body)
            assert content.startswith(b"Received: ")
            assert msg.size == len(content)
            body = content[content.index(b"\r\n") + 2:]
            while body[:1] in (b" ", b"\t"):          # the Received field's continuation
                body = body[body.index(b"\r\n") + 2:]
            assert len(body) <= MAX_SIZE
            marker = body[:body.find(b"\r\n") + 2]
            if marker.startswith(b"X-Id: ") and self.expect.get(marker) is not None:
                assert body == self.expect[marker], (body, self.expect[marker])
                self.checked += 1
            if msg.body_type != "BINARYMIME":
                assert not has_bare_newline(content), content
                assert not has_long_line(content)

    @invariant()
    def connection_count_is_right(self):
        live = sum(1 for s in self.sessions if not s.lost)
        assert self.factory.connections == live


ServerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])

TestServerFuzz = ServerMachine.TestCase
