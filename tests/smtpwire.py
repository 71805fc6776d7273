"""The shared harness of the SMTP protocol unit tests: no sockets.

A server protocol (mta.smtp.server's SMTP or mta.smtp.odmr's ODMR) runs on
a ``StringTransport`` (``TLSTransport`` when STARTTLS matters) with a
``MemoryReactorClock`` as its reactor; :class:`Wire` sends bytes to it and
parses what it wrote back into one string per reply.  :func:`make_factory`
builds the server factory with everything a test needs passed to its
constructor, as the daemon does (mta.tap).  The fakes here implement the
same interfaces as the real parts (FakeSpool: mta.message.MessageStore).
"""
from __future__ import annotations

import base64
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from mta.auth.limiter import FailureLimiter
from mta.message import InboundMessage
from mta.policy import RelayPolicy
from mta.smtp.server import ServerSettings, SMTPServer, SMTPServerFactory

HOST = "mx.example.test"
OUTSIDE = "10.1.1.1"
INSIDE = "127.0.0.1"
PASSWORD = "correct horse"


# -- fakes ----------------------------------------------------------------------------

class FakeSpool:
    """A :class:`mta.message.MessageStore` whose ``store()`` returns a
    Deferred the test controls (or, with *auto*, one that has already fired
    with the message's queue id)."""

    def __init__(self, auto: bool = False):
        self.auto = auto
        self.calls: list[tuple[object, defer.Deferred]] = []

    def store(self, msg: InboundMessage) -> Deferred[str]:
        if self.auto:
            self.calls.append((msg, None))
            return defer.succeed(msg.queue_id)
        d: defer.Deferred = defer.Deferred()
        self.calls.append((msg, d))
        return d

    @property
    def messages(self):
        return [m for m, _ in self.calls]

    def fire(self, i: int = -1) -> str:
        msg, d = self.calls[i]
        d.callback(msg.queue_id)
        return msg.queue_id

    def fail(self, i: int = -1) -> None:
        _, d = self.calls[i]
        d.errback(Failure(OSError(28, "No space left on device")))


class RaisingSpool:
    """A MessageStore whose store() raises (a bug in the spool)."""

    def store(self, msg: InboundMessage) -> Deferred[str]:
        raise RuntimeError("database is locked")


class RecordingTransport(StringTransport):
    """Also records how many write() calls were made."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


@implementer(ITLSTransport)
class TLSTransport(RecordingTransport):
    """Records startTLS; ``tls_at`` is how much output had been written then."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tls_context = None
        self.tls_at: int | None = None

    def startTLS(self, ctx, normal=True):
        assert self.tls_context is None, "startTLS twice"
        self.tls_context = ctx
        self.tls_at = len(self.value())


class FakeTLS:
    """Stands in for mta.tls.ServerTLS."""

    def __init__(self, broken: bool = False):
        self.broken = broken

    def getContext(self):
        if self.broken:
            raise RuntimeError("certificate vanished")
        return object()


def inline(f, *args):
    """A password-check runner that runs the check at once (mta.auth.checker)."""
    return defer.maybeDeferred(f, *args)


# -- the factory ------------------------------------------------------------------------

def make_factory(spool=None, auth_plaintext_on_loopback: bool = False, *,
                 reactor: MemoryReactorClock | None = None, tls: Any = None, portal: Any = None,
                 limits: dict[str, float] | None = None, cram_md5: Any = None,
                 metrics: Any = None, etrn: Any = None, on_stored: Any = None,
                 **settings) -> SMTPServerFactory:
    """An SMTPServerFactory for host HOST, relaying for 127.0.0.0/8 and to
    example.test, on a MemoryReactorClock.  *limits* are the AUTH failure
    limiter's settings (default: no delay, no lockout); *settings* are
    ServerSettings fields."""
    clock = reactor if reactor is not None else MemoryReactorClock()
    limiter = FailureLimiter(clock=clock, **(limits if limits is not None
                                             else {"delay": 0.0, "max_failures": 0}))
    policy = RelayPolicy(["127.0.0.0/8"], ["example.test"])
    return SMTPServerFactory(ServerSettings(hostname=HOST, **settings),
                             spool if spool is not None else FakeSpool(), policy,
                             reactor=clock, tls=tls, portal=portal, limiter=limiter,
                             auth_plaintext_on_loopback=auth_plaintext_on_loopback,
                             cram_md5=cram_md5, metrics=metrics, etrn=etrn,
                             on_stored=on_stored)


# -- replies ----------------------------------------------------------------------------

def parse_replies(data: bytes) -> list[str]:
    """Wire output → one string per reply (continuation lines joined by \\n)."""
    text = data.decode("utf-8")
    assert text == "" or text.endswith("\r\n"), repr(text)
    out: list[str] = []
    cur: list[str] = []
    for line in text.split("\r\n")[:-1]:
        assert re.match(r"[2-5]\d\d[ -]", line), repr(line)
        cur.append(line)
        if line[3] == " ":
            out.append("\n".join(cur))
            cur = []
    assert not cur, f"unterminated multi-line reply: {cur}"
    return out


def codes(replies: list[str]) -> list[str]:
    """'250 2.1.0 Ok' → '250 2.1.0'; '250 Ok' → '250'."""
    out = []
    for rep in replies:
        last = rep.split("\n")[-1]
        m = re.match(r"(\d{3}) (\d\.\d{1,3}\.\d{1,3}) ", last + " ")
        out.append(f"{m.group(1)} {m.group(2)}" if m else last[:3])
    return out


def code(reply: str) -> str:
    [c] = codes([reply])
    return c


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plain(user: str, password: str = PASSWORD, authzid: str = "") -> str:
    """The AUTH PLAIN initial response."""
    return b64(f"{authzid}\0{user}\0{password}")


def address(ip: str, port: int) -> IPv4Address | IPv6Address:
    return IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)


# -- sessions ---------------------------------------------------------------------------

class Wire:
    """A connected server protocol and its transport: send bytes, take the
    replies written since the last take."""

    def __init__(self, proto: Any, transport: RecordingTransport, clock: MemoryReactorClock):
        self.proto = proto
        self.tr = transport
        self.clock = clock
        proto.makeConnection(transport)
        self.greeting = self.take()

    def take(self) -> list[str]:
        """Replies written since the last take()."""
        data = self.tr.value()
        self.tr.clear()
        if getattr(self.tr, "tls_at", None) is not None:
            self.tr.tls_at = 0
        return parse_replies(data)

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str | bytes) -> str:
        """Send one command line and return its one reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        rs = self.send(line + b"\r\n")
        assert len(rs) == 1, rs
        return rs[0]

    def ehlo_keywords(self, name: str = "client.example.org") -> list[str]:
        """EHLO; the keyword lines of its 250 reply."""
        [rep] = self.send(f"EHLO {name}\r\n")
        assert rep.startswith("250-"), rep
        return [line[4:] for line in rep.split("\n")[1:]]

    def after_reply(self) -> None:
        """Let the reactor take the turns that follow a reply: an accepted
        message's log line, metric and on_stored come after its 250."""
        for _ in range(2):
            self.clock.advance(0)

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionError("gone")))

    @property
    def closing(self) -> bool:
        return self.tr.disconnecting


class Client(Wire):
    """One SMTP server protocol (from *ip*) on a RecordingTransport."""

    def __init__(self, factory: SMTPServerFactory | None = None, ip: str = OUTSIDE,
                 port: int = 1234, **kw):
        self.factory = factory if factory is not None else make_factory(**kw)
        self.spool = self.factory.spool
        addr = address(ip, port)
        proto: SMTPServer = self.factory.buildProtocol(addr)
        super().__init__(proto, RecordingTransport(peerAddress=addr), self.factory.reactor)

    def ehlo(self, name: str = "client.example.org") -> list[str]:
        return self.send(f"EHLO {name}\r\n")

    def start(self, sender: str = "<s@example.org>", rcpts=("<u@example.test>",),
              esmtp: bool = True, mail_params: str = "") -> None:
        if esmtp:
            assert self.ehlo()[0].startswith("250")
        else:
            assert self.cmd("HELO client.example.org").startswith("250")
        assert self.cmd(f"MAIL FROM:{sender}{' ' + mail_params if mail_params else ''}"
                        ).startswith("250")
        for rcpt in rcpts:
            assert self.cmd(f"RCPT TO:{rcpt}").startswith("250"), rcpt
