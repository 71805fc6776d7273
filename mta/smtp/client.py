"""The outbound ESMTP client (RFC 5321): the Twisted protocol, the types
the rest of mta sees (OutboundMessage, DeliveryResult, ...), the replies
and the failures.  This docstring describes the whole client, whose parts
are these modules:

``ConnectionPool.deliver(hops, msg)`` (mta.smtp.pool) tries the next hops
in order and returns one result per recipient.  The protocol
(:class:`SMTPClientProtocol`, here) only reads replies and writes commands.
Three parts drive it:

* :class:`mta.smtp.pool.ConnectionPool`: connects (``connectTCP``), caches
  idle connections, falls back across hops, holds rejected logins;
* :class:`mta.smtp.session.ClientSession`: the conversation over one
  connected SMTPClientProtocol, whoever connected it (greeting, EHLO,
  STARTTLS, AUTH, the transactions) -- so a session can also run over a
  connection the pool did not open (a turned-around connection, ATRN);
* :class:`mta.smtp.session.TLSPolicy`: which TLS policy a hop gets and the
  TLS options.

What is sent is a :class:`mta.smtp.content.Content`, dot-stuffed as it is
written.

The conversation:

* greeting, EHLO (HELO when EHLO gets a 5xx), opportunistic STARTTLS and
  EHLO again;
* checks that the next hop can take the message: SMTPUTF8 (553 5.6.7),
  BINARYMIME with CHUNKING (554 5.6.3), 8BITMIME and SIZE (552 5.3.4).
  Those failures are final for the message (the other hops are not tried).
  8-bit content for a hop without 8BITMIME (RFC 6152 §3) is converted to
  7 bits by ``mta.smtp.downgrade`` (8-bit parts to quoted-printable or
  base64, all else byte for byte) and sent without ``BODY=``; only what
  cannot be converted (8-bit header fields, a broken MIME structure) is
  refused with 554 5.6.3 saying why.  An all-ASCII message declared
  ``BODY=8BITMIME`` is 7-bit content: it goes to such a hop as it is.
  Binary content (BINARYMIME) is never converted;
* MAIL, every RCPT and DATA in one write when PIPELINING is offered, one at
  a time otherwise; replies are read strictly in order;
* the content is dot-stuffed as it is written, with the state kept across
  writes (DESIGN.md §2: Twisted's client stuffs per 16 KiB chunk and can end
  DATA early); BINARYMIME content goes out with ``BDAT n LAST`` unchanged;
* every network step has its RFC 5321 §4.5.3.2 timeout; a timeout aborts
  the connection.

Choices:

* DATA is used for everything but BINARYMIME, even when CHUNKING is
  offered: it is what every server implements best, and the stuffing is
  done right.  BDAT is used only where it is required.
* A hop that cannot be connected to (refused, connect timeout: 4.4.1), that
  drops or times out (4.4.2), or that answers the greeting, EHLO/HELO or
  MAIL with 4xx/5xx is a hop failure: the next hop is tried.  Once MAIL is
  accepted, RCPT and end-of-data replies are per-recipient results and
  final for this attempt.  A drop or timeout later in the transaction is
  still a hop failure (the next hop gets every recipient; a timeout after
  the final dot may therefore cause a duplicate, as RFC 5321 §4.5.3.2.6
  warns).
* When no hop takes the message, every recipient gets the last error of a
  hop that was reached (a server reply, a drop or a timeout), or else the
  last connection error.  It is made 4xx (451, status 4.x.y) unless every
  hop answered 5xx to the greeting, HELO or MAIL.
* STARTTLS follows the next hop's TLS policy (``NextHop.tls``, set by the
  router from ``[relay] tls`` and ``[route_tls]``):

  - ``may`` (the default; MX certificates cannot be checked meaningfully
    without DANE or MTA-STS): opportunistic and unauthenticated.  A failed
    TLS handshake reconnects to the same hop without TLS (Postfix's
    behaviour at ``smtp_tls_security_level = may``), once per delivery.  A
    STARTTLS command answered with anything but 220 continues in plain text
    on the same connection.
  - ``none``: STARTTLS is never sent.
  - ``encrypt``: TLS is required, any certificate is accepted.
  - ``verify``: TLS is required and the certificate must chain to the trust
    root (``trust_root``: the ``[relay] tls_ca_file`` CAs, else the system's)
    and match ``NextHop.host`` (service-identity, via
    ``optionsForClientTLS``).

  With ``encrypt``/``verify``, no STARTTLS offered, a STARTTLS refused, a
  failed handshake or a certificate that does not verify is a hop failure
  with ``451 4.7.5`` (the next hop is tried; the recipients are deferred,
  never bounced), logged with its reason.
* A next hop with credentials (``NextHop.auth``, the smarthost's) is
  logged in to after the EHLO that follows STARTTLS: AUTH PLAIN, or LOGIN
  when only LOGIN is offered.  Credentials make ``may`` behave as
  ``encrypt``: the password is never sent without TLS (4.7.5), and a hop
  that offers neither mechanism is a hop failure (4.7.0).  A login rejected
  with 5xx (535) is logged with ``log.error`` and defers the whole
  delivery at once (451 4.7.8 for every recipient, the other hops are not
  tried); for ``auth_failure_hold`` seconds after it, deliveries with the
  same credentials to that address fail the same way without connecting,
  so a queue of messages cannot lock the account at the smarthost.  A 4xx
  answer to AUTH is an ordinary (temporary) hop failure.
* Cached connections are keyed by address, port, TLS policy (and the
  verified name) and credentials, so a connection is only reused for a hop
  with the same requirements.
* After a transaction (RSET first if the transaction did not end with the
  final dot) the connection waits in the pool, keyed by (address, port),
  for ``Timeouts.idle`` seconds (at most ``max_idle_per_host`` per key),
  then gets a QUIT.  ``deliver`` moves a hop that has a cached connection
  to the front of the list (the earlier hops were unreachable or busy a
  moment ago).  A cached connection that turns out to be dead (closed, or
  answering 421 before anything else) is replaced by a fresh connection to
  the same hop; that is not a hop failure.  ``deliver(...,
  opened_after=T)`` reuses only a connection opened at T or later (a
  flush after ETRN, RFC 1985, goes out on a new connection); older cached
  ones to that hop are closed.
* Results we make ourselves have the same form as server replies:
  ``text`` is "451 4.4.1 connect to mx[192.0.2.1]:25: Connection refused",
  "552 5.3.4 Message too big for next hop", ...; ``RecipientResult.remote``
  (the next hop whose reply ``text`` is, None for ours) tells them apart,
  so that a report never says a remote MTA said what we decided.
* A next hop's recipient limit (RFC 5321 §4.5.3.1.10): when the RCPT
  replies end in 452s starting with a "too many recipients" one (status
  4.5.3 or none) after at least one other reply, those recipients are sent
  at once in another transaction — on the same connection after the end of
  data (or RSET), on one new connection to the same hop if it was closed —
  and the number taken is kept as ``rcpt_limit`` of the connection, so
  later transactions on it are split up front.  Without PIPELINING no RCPT
  is sent after the limit's 452.  A 452 for the first recipient of a
  transaction is an ordinary deferral; when every recipient of such a
  transaction got a 452, the ones not sent yet are deferred too (the next
  hop takes no more now).  Once a transaction of a delivery
  is done, a failure of a later one (a drop, MAIL refused) is the result of
  the recipients not yet sent only: other hops are not tried, so nothing
  is delivered twice.
* ``DeliveryResult.tls`` is the TLS session used (protocol, cipher, and
  whether the certificate was verified: policy ``verify``), or None.
* An address with a control character is never sent (CR/LF would be
  command injection): that recipient gets 553 5.1.3 (5.1.7 for the
  sender).  Malformed DSN parameters are left out.
* Cancelling the Deferred from ``deliver`` aborts the connection in use and
  fails with CancelledError (no further hop is tried).
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .content import DotStuffer
from .types import NextHop, TLSInfo, reply_detail, reply_kind

log = Logger(namespace="mta.smtp")

CHUNK = 64 * 1024          # content is written in pieces of this size
MAX_REPLY_LINE = 4096      # longer reply lines are a protocol error (RFC: 512)
MAX_REPLY_LINES = 200

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?")
_STATUS = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

@dataclass
class OutboundRecipient:
    address: str
    notify: str | None = None       # "NEVER" or e.g. "SUCCESS,FAILURE"
    orcpt: str | None = None        # "addr-type;xtext" as received


@dataclass
class OutboundMessage:
    queue_id: str
    sender: str                     # "" = <>
    recipients: list[OutboundRecipient]
    headers: bytes
    body: bytes
    body_type: str | None = None    # None, 7BIT, 8BITMIME, BINARYMIME
    smtputf8: bool = False
    ret: str | None = None          # FULL, HDRS
    envid: str | None = None        # xtext as received


@dataclass(frozen=True)
class RecipientResult:
    address: str
    code: int                       # 250, 451, 550, ...
    status: str                     # "2.0.0"
    text: str                       # full reply, e.g. "250 2.0.0 Ok: queued as X"
    # The next hop that sent ``text`` as its reply to us.  None when we
    # produced the result ourselves (connection failure, timeout, a next hop
    # too small for the message, no route...): ``text`` then is our own
    # explanation in the same form, e.g. "451 4.4.1 connect to
    # mx.example[192.0.2.1]:25: Connection refused", and must never be
    # reported as something a remote MTA said (RFC 3464 §2.3.5, §2.3.6).
    remote: NextHop | None = None

    @property
    def from_remote(self) -> bool:
        return self.remote is not None

    @property
    def detail(self) -> str:
        """``text`` without its leading reply code and enhanced status (for
        our own results: "connect to mx[192.0.2.1]:25: Connection refused")."""
        return reply_detail(self.text)


@dataclass
class DeliveryResult:
    results: list[RecipientResult]  # one per recipient, same order
    remote: NextHop | None          # the hop that answered (None if none could be reached)
    dsn_offered: bool               # next hop advertised DSN
    tls: TLSInfo | None = None      # the TLS session used with ``remote`` (None: plain text)


# ---------------------------------------------------------------------------
# Replies and errors
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    code: int
    status: str
    text: str                       # "550 5.1.1 first line second line"
    lines: tuple[str, ...] = ()     # the text of each line, as received

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


def _make_reply(code: int, lines: list[str]) -> Reply:
    first = lines[0] if lines else ""
    m = _STATUS.match(first)
    status = None
    if m and int(m.group(1)) == code // 100:
        status = f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
    parts = [first]
    for line in lines[1:]:
        # Continuation lines usually repeat the enhanced code; say it once.
        if status is not None:
            m2 = _STATUS.match(line)
            if m2 and m2.group(0).strip() == m.group(0).strip():
                line = line[m2.end():]
        parts.append(line)
    text = " ".join(p for p in parts if p)
    return Reply(code, status or f"{code // 100}.0.0", f"{code} {text}" if text else str(code),
                 tuple(lines))


class StepError(Exception):
    """A conversation broke off at one *step* (its words: "sending RCPT"):
    raised by :meth:`SMTPClientProtocol.command`; :func:`step_failure_text`
    says it in a report's words.  The private subclasses say how: timed out,
    connection lost, or a reply that is not SMTP."""

    def __init__(self, step: str, got: int = 0):
        super().__init__(step)
        self.step = step
        self.got = got                  # replies received in this batch before it failed


class StepTimeout(StepError):
    pass


class StepLost(StepError):
    def __init__(self, step: str, got: int = 0, tls_failed: bool = False, reason: str = ""):
        super().__init__(step, got)
        self.tls_failed = tls_failed
        self.reason = reason


class _ProtocolError(StepError):
    pass


class HopFailure(Exception):
    """This next hop did not take the message; try the next one.

    Made by one of two constructors: :meth:`from_reply` (the hop's own reply:
    ``remote`` is the hop) or :meth:`ours` (our decision, always a 451 with a
    4.x.y status: ``remote`` is None).  ``reached``: the hop was talked to
    (its failure is the one reported); ``final``: no other hop is tried (a
    rejected login); ``permanent``: a 5xx that may bounce the recipients when
    every hop gave one (see ConnectionPool._deliver)."""

    def __init__(self, hop: NextHop, code: int, status: str, text: str, *,
                 remote: NextHop | None, reached: bool, permanent: bool = False,
                 final: bool = False, login_rejected: bool = False):
        super().__init__(text)
        self.hop = hop
        self.code = code
        self.status = status
        self.text = text
        self.remote = remote            # the hop when ``text`` is its reply, None when ours
        self.reached = reached
        self.permanent = permanent
        self.final = final              # no other hop is tried (a rejected login)
        self.login_rejected = login_rejected  # AUTH got 5xx: the pool holds the credentials
        self.tls: TLSInfo | None = None  # the TLS session of the conversation, if any

    @classmethod
    def from_reply(cls, hop: NextHop, reply: Reply, *, permanent_ok: bool) -> "HopFailure":
        return cls(hop, reply.code, reply.status, reply.text, remote=hop, reached=True,
                   permanent=permanent_ok and reply_kind(reply.code) == "permanent")

    @classmethod
    def ours(cls, hop: NextHop, status: str, text: str, *, reached: bool = True,
             final: bool = False, login_rejected: bool = False) -> "HopFailure":
        """Our own temporary failure with *hop*: "451 *status* *text*"."""
        return cls(hop, 451, status, f"451 {status} {text}", remote=None, reached=reached,
                   final=final, login_rejected=login_rejected)

    def result(self, address: str) -> "RecipientResult":
        """This failure as the result of one recipient."""
        return RecipientResult(address, self.code, self.status, self.text, self.remote)


class TLSFailed(Exception):
    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason


class DeadConnection(Exception):
    """A cached connection was found dead before it said anything."""


def connect_failure_text(e: BaseException) -> str:
    """Why a connection attempt failed, in Postfix's words ("Connection
    refused", "Connection timed out"), for logs and reports."""
    if isinstance(e, (defer.TimeoutError, error.TimeoutError, error.UserError)):
        return "Connection timed out"
    if isinstance(e, error.ConnectionRefusedError):
        return "Connection refused"
    return str(e) or e.__class__.__name__


def hop_name(hop: NextHop) -> str:
    return f"{hop.host}[{hop.address}]:{hop.port}"


def step_failure_text(peer: str, e: StepError) -> tuple[str, str]:
    """Our own words for a conversation with *peer* that broke off:
    ``(enhanced status, text)``, e.g. ``("4.4.2", "conversation with
    mx[192.0.2.1]:25 timed out while sending RCPT")``; 4.5.0 for a
    protocol error.  For the SMTP pool and the LMTP client alike."""
    if isinstance(e, StepTimeout):
        return "4.4.2", f"conversation with {peer} timed out while {e.step}"
    if isinstance(e, _ProtocolError):
        return "4.5.0", f"protocol error with {peer} while {e.step}"
    why = f" ({e.reason})" if isinstance(e, StepLost) and e.reason else ""
    return "4.4.2", f"lost connection with {peer} while {e.step}{why}"


# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------

@dataclass
class _Batch:
    steps: list[tuple[float, str]]
    d: defer.Deferred
    replies: list[Reply] = field(default_factory=list)


@implementer(IPushProducer)
class _ContentProducer:
    """Writes the content in CHUNK pieces while the transport wants more."""

    def __init__(self, proto: "SMTPClientProtocol", parts: list[bytes], stuff: bool,
                 block_timeout: float):
        self.proto = proto
        self.parts = parts
        self.stuffer = DotStuffer() if stuff else None
        self.block_timeout = block_timeout
        self.part = 0
        self.pos = 0
        self.paused = False
        self.pumping = False
        self.done = False
        self.d: defer.Deferred = defer.Deferred(self._cancelled)
        self.timer: Any = None
        self.registered = False

    def start(self) -> defer.Deferred:
        self.timer = self.proto.reactor.callLater(self.block_timeout, self._timed_out)
        self.proto.transport.registerProducer(self, True)
        self.registered = True
        self._pump()
        return self.d

    def _pump(self) -> None:
        if self.pumping or self.done:
            return
        self.pumping = True
        try:
            transport = self.proto.transport
            while not self.paused and not self.done:
                if self.part >= len(self.parts):
                    self._finish(None)
                    return
                data = self.parts[self.part]
                chunk = data[self.pos:self.pos + CHUNK]
                self.pos += len(chunk)
                if self.pos >= len(data):
                    self.part += 1
                    self.pos = 0
                if self.stuffer is not None:
                    chunk = self.stuffer.feed(chunk)
                if self.timer is not None and self.timer.active():
                    self.timer.reset(self.block_timeout)
                transport.write(chunk)
        finally:
            self.pumping = False

    def _finish(self, err: Exception | None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.registered and self.proto.usable:
            self.registered = False
            self.proto.transport.unregisterProducer()
        if err is None:
            self.d.callback(None)
        else:
            self.d.errback(err)

    def _timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        self._finish(StepTimeout("sending message content"))
        self.proto.abort()

    def _cancelled(self, d: defer.Deferred) -> None:
        self.done = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.proto.abort()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.block_timeout)
        self._pump()

    def stopProducing(self) -> None:
        self.registered = False     # the transport is letting go of us
        self._finish(StepLost("sending message content"))


@implementer(IHandshakeListener)
class SMTPClientProtocol(protocol.Protocol):
    """Reads replies in order and writes what it is given.

    ``command(data, steps)`` writes *data* (one or more pipelined commands)
    and returns a Deferred that fires with one :class:`Reply` per entry of
    *steps* (``(timeout, description)``), or fails with a ``StepError``.
    Each reply has its own timer, started when the previous reply arrives.
    """

    def __init__(self, reactor: Any, hop: NextHop):
        self.reactor = reactor
        self.hop = hop
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.tls_pending = False        # STARTTLS done, handshake not yet complete
        self.tls_verified = False       # the certificate is checked (policy verify)
        self.tls_info: TLSInfo | None = None  # set when the handshake completes
        self.rcpt_limit: int | None = None    # recipients per transaction, learned from 452s
        self.closed = False
        self.aborting = False
        self.idle = False
        self.idle_timer: Any = None
        self.transactions = 0
        self.opened_at = 0.0            # reactor time the TCP connection was made
        self._buf = b""
        self._lines: list[str] = []
        self._reply_code = 0
        self._epoch = 0                 # bumped by STARTTLS: drop plaintext read ahead
        self._early: deque[Reply] = deque()
        self._batch: _Batch | None = None
        self._timer: Any = None
        self._producer: _ContentProducer | None = None
        self._lost_waiters: list[defer.Deferred] = []
        self.on_lost: Any = None        # set by the pool
        self.connector: Any = None
        self.connected_d: defer.Deferred = defer.Deferred(self._cancel_connect)

    # -- connection ---------------------------------------------------------
    def connectionMade(self) -> None:
        if not self.connected_d.called:
            self.connected_d.callback(self)

    def _cancel_connect(self, d: defer.Deferred) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()

    def handshakeCompleted(self) -> None:
        self.tls_pending = False
        self.tls = True
        version, cipher = "TLS", "unknown"
        try:
            handle = self.transport.getHandle()
            version = handle.get_protocol_version_name() or version
            cipher = handle.get_cipher_name() or cipher
        except Exception:   # not an OpenSSL connection (a test transport)
            pass
        self.tls_info = TLSInfo(version, cipher, self.tls_verified)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed = True
        tls_failed = self.tls_pending
        why = "" if reason.check(error.ConnectionDone) else (
            _tls_error_text(reason, self.hop) if tls_failed else reason.getErrorMessage())
        self._cancel_timer()
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None
        if self._producer is not None:
            p, self._producer = self._producer, None
            p._finish(StepLost("sending message content", tls_failed=tls_failed, reason=why))
        if self._batch is not None:
            b, self._batch = self._batch, None
            step = b.steps[len(b.replies)][1]
            b.d.errback(StepLost(step, len(b.replies), tls_failed=tls_failed, reason=why))
        if self.on_lost is not None:
            cb, self.on_lost = self.on_lost, None
            cb(self)
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)

    def abort(self) -> None:
        if self.closed or self.aborting:
            return
        self.aborting = True
        if self.transport is not None:
            self.transport.abortConnection()

    def when_lost(self) -> defer.Deferred:
        if self.closed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._lost_waiters.append(d)
        return d

    @property
    def usable(self) -> bool:
        return not (self.closed or self.aborting)

    # -- writing --------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.usable:
            self.transport.write(data)

    def command(self, data: bytes | None, steps: list[tuple[float, str]]) -> defer.Deferred:
        assert self._batch is None, "one batch of replies at a time"
        d: defer.Deferred = defer.Deferred(self._cancel_batch)
        if not self.usable:
            d.errback(StepLost(steps[0][1]))
            return d
        self._batch = _Batch(steps, d)
        if data:
            self.transport.write(data)
        self._start_timer()
        self._deliver_early()
        return d

    def send_content(self, parts: list[bytes], *, stuff: bool,
                     block_timeout: float) -> defer.Deferred:
        if not self.usable:
            return defer.fail(StepLost("sending message content"))
        p = _ContentProducer(self, parts, stuff, block_timeout)
        self._producer = p
        d = p.start()

        def done(r: Any) -> Any:
            if self._producer is p:
                self._producer = None
            return r
        return d.addBoth(done)

    def start_tls(self, options: Any) -> None:
        self.tls_pending = True
        self._epoch += 1
        self._buf = b""         # nothing the server sent before TLS counts
        self._lines = []
        self._early.clear()
        self.transport.startTLS(options)

    def quit(self, timeout: float) -> defer.Deferred:
        """Say QUIT, wait for the reply (or *timeout*), close; fires when closed."""
        if not self.usable or self._batch is not None:
            self.abort()
            return self.when_lost()
        lost = self.when_lost()
        d = self.command(b"QUIT\r\n", [(timeout, "sending QUIT")])

        def close(_: Any) -> None:
            if self.usable:
                self.transport.loseConnection()
        d.addBoth(close)
        return lost

    def _cancel_batch(self, d: defer.Deferred) -> None:
        # The delivery was cancelled (shutdown): this connection is done for.
        if self._batch is not None and self._batch.d is d:
            self._batch = None
            self._cancel_timer()
        self.abort()

    # -- timers ---------------------------------------------------------------
    def _start_timer(self) -> None:
        b = self._batch
        if b is None or len(b.replies) >= len(b.steps):
            self._cancel_timer()
            return
        seconds = b.steps[len(b.replies)][0]
        # One timer per connection, moved on from reply to reply: reset()
        # to a later time is an assignment, where a new callLater and a
        # cancel per command are a heap push and a cancelled call each.
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        b, self._batch = self._batch, None
        if b is not None:
            step = b.steps[len(b.replies)][1]
            if self.tls_pending:
                step = "performing the TLS handshake"
            b.d.errback(StepTimeout(step, len(b.replies)))
        self.abort()

    # -- reading ----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if not self.usable:
            return
        buf = self._buf + data if self._buf else data
        pos = 0
        epoch = self._epoch
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl]
            pos = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._line(line) or self._epoch != epoch:
                return
        self._buf = buf[pos:]
        if len(self._buf) > MAX_REPLY_LINE:
            self._protocol_error()

    def _line(self, line: bytes) -> bool:
        m = _REPLY_LINE.fullmatch(line)
        if m is None or len(line) > MAX_REPLY_LINE or len(self._lines) >= MAX_REPLY_LINES:
            self._protocol_error()
            return False
        code = int(m.group(1))
        if self._lines and code != self._reply_code:
            self._protocol_error()
            return False
        self._reply_code = code
        self._lines.append((m.group(3) or b"").decode("utf-8", "replace"))
        if m.group(2) == b"-":
            return True
        lines, self._lines = self._lines, []
        self._got(_make_reply(code, lines))
        return self.usable

    def _got(self, reply: Reply) -> None:
        b = self._batch
        if b is None:
            if self.idle:
                # A cached connection spoke unasked (a 421 at the server's
                # idle timeout, typically): it is of no further use.
                log.debug("{hop}: unsolicited reply on a cached connection: {reply}",
                          hop=hop_name(self.hop), reply=reply.text)
                self.abort()
                return
            self._early.append(reply)
            return
        b.replies.append(reply)
        if len(b.replies) == len(b.steps):
            self._cancel_timer()
            self._batch = None
            b.d.callback(b.replies)
        else:
            self._start_timer()

    def _deliver_early(self) -> None:
        while self._early and self._batch is not None:
            self._got(self._early.popleft())

    def _protocol_error(self) -> None:
        b, self._batch = self._batch, None
        self._cancel_timer()
        if b is not None:
            b.d.errback(_ProtocolError(b.steps[len(b.replies)][1], len(b.replies)))
        self.abort()


class ConnectFactory(protocol.ClientFactory):
    """Hands one :class:`SMTPClientProtocol` to a connector or an endpoint,
    and fails its ``connected_d`` when the connection attempt fails."""

    noisy = False  # no "Starting/Stopping factory" line per connection
    def __init__(self, proto: SMTPClientProtocol):
        self.proto = proto

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.proto.connected_d.called:
            self.proto.connected_d.errback(reason)


def _tls_error_text(reason: Failure, hop: NextHop) -> str:
    """A short reason for a failed TLS handshake (for logs and the deferral text)."""
    try:
        from service_identity import VerificationError
        if reason.check(VerificationError):
            return f"certificate does not match the name {hop.host}"
    except ImportError:
        pass
    try:
        from OpenSSL import SSL
        if reason.check(SSL.Error):
            errors = reason.value.args[0] if reason.value.args else None
            if isinstance(errors, list):
                texts = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
                if texts:
                    return "; ".join(texts)
    except ImportError:
        pass
    return reason.getErrorMessage()


def load_trust_root(path: str) -> Any:
    """The CA certificates in the PEM file ``path`` as a trust root for policy
    ``verify``.  Raises ValueError (one line) if it cannot be read or holds none."""
    from twisted.internet import ssl
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data,
                        re.DOTALL)
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate in the file")
    try:
        certs = [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise ValueError(f"{path}: bad certificate: {e}") from None
    return ssl.trustRootFromCertificates(certs)


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (upper-cased) → their parameters ("" when none)."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        word, _, rest = line.strip().partition(" ")
        if word:
            ext[word.upper()] = rest.strip()
    return ext
