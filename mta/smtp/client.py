"""The outbound ESMTP client (RFC 5321): the Twisted protocol, the
conversation over one connection, and the types the rest of mta sees.

``ConnectionPool.deliver(hops, msg)`` (mta.smtp.pool) tries the next hops
in order and returns one result per recipient.  The protocol only reads
replies and writes commands.  Three parts drive it:

* :class:`mta.smtp.pool.ConnectionPool`: connects (``connectTCP``), caches
  idle connections, falls back across hops, holds rejected logins;
* :class:`ClientSession`: the conversation over one connected
  SMTPClientProtocol, whoever connected it (greeting, EHLO, STARTTLS, AUTH,
  the transactions) -- so a session can also run over a connection the
  pool did not open (a turned-around connection, ATRN);
* :class:`TLSPolicy`: which TLS policy a hop gets and the TLS options.

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

import base64
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import domain
from .data import has_bare_newline, normalize_newlines
from .downgrade import DowngradeError, to_7bit
from .settings import Timeouts

from .types import NextHop, TLSInfo, reply_detail, reply_kind

log = Logger(namespace="mta.smtp")

CHUNK = 64 * 1024          # content is written in pieces of this size
MAX_REPLY_LINE = 4096      # longer reply lines are a protocol error (RFC: 512)
MAX_REPLY_LINES = 200

_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+")  # esmtp-value (+ UTF-8)
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


class _StepTimeout(StepError):
    pass


class _StepLost(StepError):
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
    if isinstance(e, _StepTimeout):
        return "4.4.2", f"conversation with {peer} timed out while {e.step}"
    if isinstance(e, _ProtocolError):
        return "4.5.0", f"protocol error with {peer} while {e.step}"
    why = f" ({e.reason})" if isinstance(e, _StepLost) and e.reason else ""
    return "4.4.2", f"lost connection with {peer} while {e.step}{why}"


def _step_failure(hop: NextHop, e: StepError) -> HopFailure:
    status, text = step_failure_text(hop_name(hop), e)
    return HopFailure.ours(hop, status, text)


def _is_limit_reply(r: Reply) -> bool:
    """A "too many recipients" reply (RFC 5321 §4.5.3.1.10): 452, enhanced
    status 4.5.3 or none."""
    return r.code == 452 and r.status in ("4.5.3", "4.0.0")


def _over_limit(replies: list[Reply]) -> int | None:
    """Where the next hop's recipient limit cut the RCPT replies of a
    transaction: k when ``replies[k]`` is a "too many recipients" 452 and
    every later reply is a 452, with k > 0 (a 452 for the first recipient is
    a real deferral); None when the limit was not reached."""
    k = len(replies)
    while k > 0 and replies[k - 1].code == 452:
        k -= 1
    while k < len(replies) and not _is_limit_reply(replies[k]):
        k += 1
    return k if 0 < k < len(replies) else None


def _refused_at_once(results: list[RecipientResult]) -> bool:
    """The first recipient of a transaction got a "too many recipients" 452
    from the next hop, and every other one a 452 too."""
    return bool(results) and all(r.code == 452 and r.remote is not None for r in results) and (
        results[0].status in ("4.5.3", "4.0.0"))


# ---------------------------------------------------------------------------
# Content
# ---------------------------------------------------------------------------

class DotStuffer:
    """Dot-stuffing (RFC 5321 §4.5.2) that is correct whatever the chunking.

    The stream is taken to start at the beginning of a line.  The last two
    octets seen are kept, so a ``CRLF.`` split over two (or three) chunks is
    still found.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\r\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        buf = self._tail + chunk
        # A match needs 3 octets, so none lies inside the 2-octet tail, and
        # the extra dot always lands after it: dropping len(tail) octets of
        # the output leaves exactly the stuffed chunk.
        out = buf.replace(b"\r\n.", b"\r\n..")
        self._tail = buf[-2:]
        return out[2:]


def dot_stuff(data: bytes) -> bytes:
    """The whole-buffer form, for reference and tests."""
    out = data.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


@dataclass
class Content:
    parts: list[bytes]
    size: int
    eightbit: bool                  # holds an 8-bit octet (not only declared BODY=8BITMIME)
    binary: bool
    declared_8bit: bool = False     # stored with BODY=8BITMIME
    _seven: "Content | DowngradeError | None" = field(default=None, repr=False)

    def seven_bit(self) -> "Content":
        """This content converted for a next hop without 8BITMIME (computed
        once); raises DowngradeError when it cannot be."""
        if self._seven is None:
            try:
                data = to_7bit(b"".join(self.parts))
            except DowngradeError as e:
                self._seven = e
            else:
                self._seven = Content([data] if data else [], len(data), False, False)
        if isinstance(self._seven, DowngradeError):
            raise self._seven
        return self._seven


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    return bytes(data)


def prepare_content(msg: OutboundMessage) -> Content:
    headers = _as_bytes(msg.headers)
    body = _as_bytes(msg.body)
    body_type = (msg.body_type or "").upper()
    binary = body_type == "BINARYMIME"
    if not binary:
        # Our server stores CRLF-only content; never forward anything else.
        if has_bare_newline(headers) or has_bare_newline(body):
            log.warn("{queue_id}: bare CR or LF in stored content, normalised",
                     queue_id=msg.queue_id)
            whole = normalize_newlines(headers + body)
            headers, body = bytes(whole), b""
    eightbit = (not binary) and not (headers.isascii() and body.isascii())
    parts = [p for p in (headers, body) if p]
    if parts and not binary and not parts[-1].endswith(b"\r\n"):
        parts.append(b"\r\n")  # the final dot must follow a CRLF of the content's own
    return Content(parts, sum(len(p) for p in parts), eightbit, binary,
                    declared_8bit=body_type == "8BITMIME")


def _orcpt_for_ascii(orcpt: str) -> str:
    """An ORCPT with a utf-8 address as ``utf-8-addr-xtext`` (RFC 6533)."""
    atype, _, addr = orcpt.partition(";")
    out = []
    for ch in addr:
        o = ord(ch)
        if o > 126 or o < 33 or ch in "+=\\":
            out.append(f"\\x{{{o:X}}}")
        else:
            out.append(ch)
    return f"{atype};{''.join(out)}"


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
        self._finish(_StepTimeout("sending message content"))
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
        self._finish(_StepLost("sending message content"))


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
            p._finish(_StepLost("sending message content", tls_failed=tls_failed, reason=why))
        if self._batch is not None:
            b, self._batch = self._batch, None
            step = b.steps[len(b.replies)][1]
            b.d.errback(_StepLost(step, len(b.replies), tls_failed=tls_failed, reason=why))
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
            d.errback(_StepLost(steps[0][1]))
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
            return defer.fail(_StepLost("sending message content"))
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
            b.d.errback(_StepTimeout(step, len(b.replies)))
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


def _auth_mechanisms(ext: dict[str, str]) -> list[str]:
    """SASL mechanisms from EHLO: ``AUTH PLAIN LOGIN`` and the old ``AUTH=LOGIN`` form."""
    words = ext.get("AUTH", "").upper().split()
    for key, value in ext.items():
        if key.startswith("AUTH="):
            words += f"{key[5:]} {value}".upper().split()
    return words


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


# ---------------------------------------------------------------------------
# The session (driven by mta.smtp.pool)
# ---------------------------------------------------------------------------

#: How a session gets a new started connection to a hop (ConnectionPool._open).
Reopen = Callable[[NextHop, bool], Awaitable["SMTPClientProtocol"]]


class TLSPolicy:
    """The outbound TLS policy (see the module docstring): the policy a next
    hop gets -- ``NextHop.tls``, but credentials make ``may`` behave as
    ``encrypt`` and ``starttls=False`` turns ``may`` into ``none`` -- and
    the client TLS options for it: ``tls_options`` (else an unverified
    context) for ``may``/``encrypt``, ``optionsForClientTLS`` against
    ``trust_root`` (else the system's) for ``verify``."""

    def __init__(self, *, starttls: bool = True, tls_options: Any = None,
                 trust_root: Any = None) -> None:
        self.starttls = starttls
        self._tls_options = tls_options
        self.trust_root = trust_root
        self._verify_options: dict[str, Any] = {}      # host -> optionsForClientTLS

    def policy(self, hop: NextHop) -> str:
        """The TLS policy applied to ``hop``: credentials require TLS."""
        policy = hop.tls
        if hop.auth is not None and policy == "may":
            policy = "encrypt"
        if policy == "may" and not self.starttls:
            policy = "none"
        return policy

    def options(self, hop: NextHop, policy: str = "may") -> Any:
        if policy == "verify":
            options = self._verify_options.get(hop.host)
            if options is None:
                from twisted.internet import ssl
                trust = self.trust_root if self.trust_root is not None else ssl.platformTrust()
                options = ssl.optionsForClientTLS(hop.host, trustRoot=trust)
                if len(self._verify_options) >= 1000:
                    self._verify_options.clear()
                self._verify_options[hop.host] = options
            return options
        if self._tls_options is None:
            from twisted.internet import ssl
            # Opportunistic and unauthenticated: no CA, no verification.
            self._tls_options = ssl.CertificateOptions(verify=False)
        return self._tls_options


class ClientSession:
    """The client side of the SMTP conversation over one connected
    SMTPClientProtocol, whoever connected it: the pool's ``connectTCP``, or
    any transport a protocol was attached to (a connection turned around,
    as ATRN needs).

    ``start(conn, hop, use_tls)``: greeting, EHLO/HELO, STARTTLS as the
    :class:`TLSPolicy` says, AUTH.  ``send(conn, hop, msg, content, reused,
    use_tls, reopen)``: every recipient of the message, in as many
    transactions as the next hop's recipient limit needs; when the
    connection closes before every recipient was sent, ``reopen(hop,
    use_tls)`` gives a new started connection (None: the rest are deferred).

    The connection's owner gets it back through two callables: ``release``
    (ready for another transaction) and ``quit`` (to be closed with QUIT).
    """

    def __init__(self, *, helo_name: str, timeouts: Timeouts, tls: TLSPolicy,
                 release: Callable[[SMTPClientProtocol], None],
                 quit: Callable[[SMTPClientProtocol], None]) -> None:
        self.helo_name = helo_name
        self.timeouts = timeouts
        self.tls = tls
        self.release = release
        self.quit = quit

    async def start(self, conn: SMTPClientProtocol, hop: NextHop,
                    use_tls: bool) -> SMTPClientProtocol:
        """Greeting, EHLO/HELO, STARTTLS (as the TLS policy says for *hop*;
        not when *use_tls* is false) and AUTH (``hop.auth``) on the freshly
        connected *conn*.  Raises HopFailure (or TLSFailed: a failed
        handshake under policy ``may``, to be tried again without TLS)."""
        t = self.timeouts
        try:
            greeting = (await conn.command(
                None, [(t.greeting, "receiving the initial server greeting")]))[0]
            if greeting.code != 220:
                self.quit(conn)
                raise HopFailure.from_reply(hop, greeting, permanent_ok=True)
            await self._hello(conn, hop)
            policy = self.tls.policy(hop)
            required = policy in ("encrypt", "verify")
            if use_tls and "STARTTLS" in conn.extensions and hasattr(conn.transport, "startTLS"):
                r = (await conn.command(b"STARTTLS\r\n", [(t.helo, "sending STARTTLS")]))[0]
                if r.code == 220:
                    conn.tls_verified = policy == "verify"
                    conn.start_tls(self.tls.options(hop, policy))
                    conn.extensions = {}
                    try:
                        await self._hello(conn, hop)
                    except (_StepLost, _StepTimeout) as e:
                        if conn.tls_pending or getattr(e, "tls_failed", False):
                            conn.abort()
                            why = (getattr(e, "reason", "") or
                                   ("timed out" if isinstance(e, _StepTimeout) else ""))
                            if required:
                                raise self._tls_policy_failure(
                                    hop, policy, f"TLS handshake failed"
                                                 f"{f' ({why})' if why else ''}") from None
                            raise TLSFailed(why) from None
                        raise
                elif required:
                    self.quit(conn)
                    raise self._tls_policy_failure(hop, policy, f"STARTTLS refused: {r.text}")
            elif required:
                self.quit(conn)
                offered = "STARTTLS" in conn.extensions
                raise self._tls_policy_failure(
                    hop, policy, "STARTTLS not offered" if not offered else
                    "TLS not possible on this transport")
            if hop.auth is not None:
                if not conn.tls:
                    # Only reachable with policy "none": never send the password in clear.
                    self.quit(conn)
                    raise self._tls_policy_failure(hop, policy,
                                                   "not sending the password without TLS")
                try:
                    await self._authenticate(conn, hop)
                except HopFailure as e:
                    e.tls = conn.tls_info
                    raise
        except StepError as e:
            conn.abort()
            raise _step_failure(hop, e) from None
        return conn

    async def _hello(self, conn: SMTPClientProtocol, hop: NextHop) -> None:
        t = self.timeouts
        name = (self.helo_name if self.helo_name.isascii()
                else domain.to_ascii(self.helo_name)).encode("ascii")
        r = (await conn.command(b"EHLO " + name + b"\r\n", [(t.helo, "sending EHLO")]))[0]
        if r.ok:
            conn.esmtp = True
            conn.extensions = parse_ehlo(r)
            return
        if reply_kind(r.code) != "permanent":
            self.quit(conn)
            raise HopFailure.from_reply(hop, r, permanent_ok=False)
        r = (await conn.command(b"HELO " + name + b"\r\n", [(t.helo, "sending HELO")]))[0]
        if not r.ok:
            self.quit(conn)
            raise HopFailure.from_reply(hop, r, permanent_ok=True)
        conn.esmtp = False
        conn.extensions = {}

    def _tls_policy_failure(self, hop: NextHop, policy: str, why: str) -> HopFailure:
        text = f"TLS is required (policy {policy}) with {hop_name(hop)}: {why}"
        log.warn("{hop}: TLS policy {policy} not met: {why}", hop=hop_name(hop),
                 policy=policy, why=why)
        return HopFailure.ours(hop, "4.7.5", text)

    async def _authenticate(self, conn: SMTPClientProtocol, hop: NextHop) -> None:
        """AUTH PLAIN (or LOGIN) with ``hop.auth``; raises HopFailure unless accepted."""
        t = self.timeouts
        cred = hop.auth
        assert cred is not None
        mechanisms = _auth_mechanisms(conn.extensions)
        user, password = cred.user.encode("utf-8"), cred.password.encode("utf-8")
        step = [(t.helo, "authenticating")]
        if "PLAIN" in mechanisms:
            mech = "PLAIN"
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            r = (await conn.command(b"AUTH PLAIN " + token + b"\r\n", step))[0]
        elif "LOGIN" in mechanisms:
            mech = "LOGIN"
            r = (await conn.command(b"AUTH LOGIN\r\n", step))[0]
            for secret in (user, password):
                if r.code != 334:
                    break
                r = (await conn.command(base64.b64encode(secret) + b"\r\n", step))[0]
        else:
            self.quit(conn)
            offered = " ".join(mechanisms) or "no AUTH"
            raise HopFailure.ours(hop, "4.7.0", f"{hop_name(hop)} offers no AUTH mechanism we "
                                   f"use (PLAIN, LOGIN): {offered}")
        if r.ok:
            log.debug("{hop}: authenticated as {user} ({mech})", hop=hop_name(hop),
                      user=cred.user, mech=mech)
            return
        if r.code == 334:
            # More challenges than the mechanism has: cancel (RFC 4954 "*").
            try:
                await conn.command(b"*\r\n", step)
            except StepError:
                conn.abort()
            else:
                self.quit(conn)
            raise HopFailure.ours(hop, "4.7.0", f"unexpected AUTH {mech} dialogue with "
                                   f"{hop_name(hop)}: {r.text}")
        self.quit(conn)
        if reply_kind(r.code) != "permanent":
            raise HopFailure.from_reply(hop, r, permanent_ok=False)
        status = "4.7.8" if r.code == 535 else "4" + r.status[1:]
        why = f"login as {cred.user} to {hop_name(hop)} (AUTH {mech}) rejected: {r.text}"
        log.error("SMARTHOST LOGIN REJECTED: {hop} refused user {user} (AUTH {mech}): {reply}; "
                  "mail for it is deferred, not bounced; check the credentials in the "
                  "configuration", hop=hop_name(hop), user=cred.user, mech=mech, reply=r.text)
        raise HopFailure.ours(hop, status, why, final=True, login_rejected=True)

    def _local_check(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                     content: Content) -> tuple[int, str, str] | Content:
        """The content to send to this hop (converted to 7 bits when it
        needs that), or our refusal (code, status, text)."""
        ext = conn.extensions
        if self._needs_utf8(msg) and "SMTPUTF8" not in ext:
            return (553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host "
                                  f"{hop_name(conn.hop)}")
        if content.binary and not ("BINARYMIME" in ext and "CHUNKING" in ext):
            return (554, "5.6.3", f"message has binary content (BINARYMIME) the next hop "
                                  f"{hop_name(conn.hop)} does not accept (CHUNKING and "
                                  f"BINARYMIME) and it could not be converted: binary content "
                                  f"is never converted")
        if content.eightbit and "8BITMIME" not in ext:
            try:
                content = content.seven_bit()
            except DowngradeError as e:
                return (554, "5.6.3", f"message has 8-bit content the next hop does not accept "
                                      f"(8BITMIME) and it could not be converted: {e}")
            log.info("{queue_id}: {hop} does not offer 8BITMIME: 8-bit content converted to "
                     "7 bits", queue_id=msg.queue_id, hop=hop_name(conn.hop))
        limit = ext.get("SIZE", "").strip()
        if "SIZE" in ext and limit.isdigit() and 0 < int(limit) < content.size:
            return (552, "5.3.4", "Message too big for next hop")
        return content

    @staticmethod
    def _needs_utf8(msg: OutboundMessage) -> bool:
        return msg.smtputf8 or not msg.sender.isascii() or not all(
            r.address.isascii() for r in msg.recipients)

    def _mail_line(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                   content: Content) -> bytes:
        ext = conn.extensions
        params: list[str] = []
        if "SIZE" in ext:
            params.append(f"SIZE={content.size}")
        if content.binary:
            params.append("BODY=BINARYMIME")
        elif "8BITMIME" in ext:
            if content.eightbit or content.declared_8bit:
                params.append("BODY=8BITMIME")
            elif (msg.body_type or "").upper() == "7BIT":
                params.append("BODY=7BIT")
        if "SMTPUTF8" in ext and self._needs_utf8(msg):
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if msg.ret and _PARAM_VALUE.fullmatch(msg.ret):
                params.append(f"RET={msg.ret}")
            if msg.envid and _PARAM_VALUE.fullmatch(msg.envid) and msg.envid.isascii():
                params.append(f"ENVID={msg.envid}")
        line = f"MAIL FROM:<{msg.sender}>" + "".join(" " + p for p in params) + "\r\n"
        return line.encode("utf-8")

    def _rcpt_line(self, conn: SMTPClientProtocol, msg: OutboundMessage,
                   rcpt: OutboundRecipient, utf8: bool) -> bytes:
        params: list[str] = []
        if "DSN" in conn.extensions:
            if rcpt.notify and _PARAM_VALUE.fullmatch(rcpt.notify):
                params.append(f"NOTIFY={rcpt.notify}")
            if rcpt.orcpt:
                orcpt = rcpt.orcpt
                if not orcpt.isascii() and not utf8:
                    orcpt = _orcpt_for_ascii(orcpt)
                if _PARAM_VALUE.fullmatch(orcpt):
                    params.append(f"ORCPT={orcpt}")
        line = f"RCPT TO:<{rcpt.address}>" + "".join(" " + p for p in params) + "\r\n"
        return line.encode("utf-8")

    async def send(self, conn: SMTPClientProtocol, hop: NextHop, msg: OutboundMessage,
                   content: Content, reused: bool, use_tls: bool,
                   reopen: Reopen | None = None) -> DeliveryResult:
        """Every recipient of *msg* to *hop* over *conn*, in as many
        transactions as the next hop's recipient limit needs (RFC 5321
        §4.5.3.1.10): recipients refused with a "too many recipients" 452
        after the first one are sent at once in a further transaction, on
        the same connection (a new one to the same hop if it was closed),
        and the limit is remembered for the connection."""
        dsn = "DSN" in conn.extensions
        tls = conn.tls_info
        local = self._local_check(conn, msg, content)
        if isinstance(local, Content):
            content = local
        else:
            self.release(conn)
            return DeliveryResult(self._local_results(msg.recipients, local), hop, dsn, tls)
        n = len(msg.recipients)
        results: list[RecipientResult | None] = [None] * n
        pending = list(range(n))
        first = True
        while True:
            limit = conn.rcpt_limit
            batch = pending[:limit] if limit else pending
            part = msg if len(batch) == n else replace(
                msg, recipients=[msg.recipients[i] for i in batch])
            try:
                got, over, clean = await self._transaction(conn, hop, part, content,
                                                           reused and first)
            except HopFailure as e:
                if first:
                    raise
                # Earlier transactions of this delivery have their results:
                # the others get this failure, never another hop's attempt
                # (which would duplicate what was delivered).
                for i in pending:
                    results[i] = e.result(msg.recipients[i].address)
                break
            first = False
            for j, i in enumerate(batch):
                results[i] = got[j]
            if over:
                took = len(batch) - len(over)
                if conn.rcpt_limit is None or took < conn.rcpt_limit:
                    conn.rcpt_limit = took
                    log.info("{queue_id}: {hop} takes {n} recipients per transaction; sending "
                             "the other {left} in further transactions", queue_id=msg.queue_id,
                             hop=hop_name(hop), n=took, left=len(pending) - took)
            pending = [batch[j] for j in over] + pending[len(batch):]
            if pending and _refused_at_once(got):
                # Not a recipient of this transaction was taken: the next hop
                # takes no more now (a per-connection or rate limit).  The
                # rest wait for the next attempt instead of one refused
                # transaction each.
                for i in pending:
                    results[i] = RecipientResult(
                        msg.recipients[i].address, 452, got[0].status,
                        f"452 {got[0].status} not sent: {hop_name(hop)} took no more "
                        f"recipients ({got[0].text})")
                pending = []
            if clean and conn._early:
                conn.abort()            # the server said more than it was asked
                clean = False
            if not pending:
                if clean:
                    self.release(conn)
                break
            if clean:
                continue
            # The connection is gone: one new connection to the same hop for the rest.
            limit = conn.rcpt_limit
            failure: HopFailure | None = None
            try:
                if reopen is None:
                    raise HopFailure.ours(hop, "4.4.2", f"connection with {hop_name(hop)} "
                                           "closed before every recipient was sent")
                conn = await reopen(hop, use_tls)
            except HopFailure as e:
                failure = e
            except TLSFailed as e:
                failure = HopFailure.ours(hop, "4.4.2", f"TLS handshake with {hop_name(hop)} "
                                           f"failed ({e.reason or 'no reason given'})")
            if failure is not None:
                for i in pending:
                    results[i] = failure.result(msg.recipients[i].address)
                break
            conn.rcpt_limit = limit
            local = self._local_check(conn, msg, content)
            if isinstance(local, Content):
                content = local
            else:
                self.release(conn)
                for i, rr in zip(pending, self._local_results(
                        [msg.recipients[i] for i in pending], local)):
                    results[i] = rr
                break
        final = [r for r in results if r is not None]
        assert len(final) == n
        return DeliveryResult(final, hop, dsn, tls)

    @staticmethod
    def _local_results(rcpts: list[OutboundRecipient],
                       local: tuple[int, str, str]) -> list[RecipientResult]:
        code, status, text = local
        return [RecipientResult(r.address, code, status, f"{code} {status} {text}")
                for r in rcpts]

    async def _transaction(self, conn: SMTPClientProtocol, hop: NextHop, msg: OutboundMessage,
                           content: Content, reused: bool
                           ) -> tuple[list[RecipientResult], list[int], bool]:
        """One transaction: (a result per recipient, the positions of the
        recipients refused for the recipient limit, whether the connection
        is ready for another MAIL).  Raises HopFailure when the hop did not
        take the message (MAIL refused, connection lost or timed out)."""
        t = self.timeouts
        pipelining = "PIPELINING" in conn.extensions
        use_bdat = content.binary
        utf8 = "SMTPUTF8" in conn.extensions and self._needs_utf8(msg)
        mail = self._mail_line(conn, msg, content)
        rcpts = [self._rcpt_line(conn, msg, r, utf8) for r in msg.recipients]
        n = len(rcpts)
        mail_step = (t.mail, "sending MAIL FROM")
        rcpt_step = (t.rcpt, "sending RCPT TO")
        data_step = (t.data_init, "sending DATA")
        data_reply: Reply | None = None
        try:
            if pipelining:
                steps = [mail_step] + [rcpt_step] * n
                data = mail + b"".join(rcpts)
                if not use_bdat:
                    steps.append(data_step)
                    data += b"DATA\r\n"
                try:
                    replies = await conn.command(data, steps)
                except _StepLost as e:
                    if reused and e.got == 0:
                        raise DeadConnection() from None
                    raise
                mail_reply = replies[0]
                if reused and mail_reply.code == 421:
                    raise DeadConnection()
                rcpt_replies = replies[1:1 + n]
                if not use_bdat:
                    data_reply = replies[-1]
                if not mail_reply.ok:
                    if data_reply is not None and data_reply.code == 354:
                        conn.write(b".\r\n")   # a broken server wants a message: give it nothing
                    self.quit(conn)
                    raise HopFailure.from_reply(hop, mail_reply, permanent_ok=True)
            else:
                try:
                    mail_reply = (await conn.command(mail, [mail_step]))[0]
                except _StepLost:
                    if reused:
                        raise DeadConnection() from None
                    raise
                if reused and mail_reply.code == 421:
                    raise DeadConnection()
                if not mail_reply.ok:
                    self.quit(conn)
                    raise HopFailure.from_reply(hop, mail_reply, permanent_ok=True)
                rcpt_replies = []
                for line in rcpts:
                    rep = (await conn.command(line, [rcpt_step]))[0]
                    rcpt_replies.append(rep)
                    if _is_limit_reply(rep) and _over_limit(rcpt_replies) is not None:
                        break       # the limit is reached: the rest go in another transaction

            results = [RecipientResult(r.address, rep.code, rep.status, rep.text, hop)
                       for r, rep in zip(msg.recipients, rcpt_replies)]
            k = _over_limit(rcpt_replies)
            over = list(range(k, n)) if k is not None else []
            for r in msg.recipients[len(results):]:     # not sent (the limit was reached)
                results.append(RecipientResult(
                    r.address, 452, "4.5.3", f"452 4.5.3 not sent: the recipient limit of "
                    f"{hop_name(hop)} was reached"))
            accepted = [i for i, rep in enumerate(rcpt_replies) if rep.ok]
            if not accepted:
                if data_reply is not None and data_reply.code == 354:
                    # RFC 2920 §3.1: all RCPTs failed but DATA was accepted.
                    await conn.command(b".\r\n", [(t.data_end, "sending end of data")])
                return results, over, await self._rset(conn)

            if use_bdat:
                conn.write(f"BDAT {content.size} LAST\r\n".encode())
                await conn.send_content(content.parts, stuff=False, block_timeout=t.data_block)
                final = (await conn.command(None, [(t.data_end, "sending end of data")]))[0]
            else:
                if data_reply is None:
                    data_reply = (await conn.command(b"DATA\r\n", [data_step]))[0]
                if data_reply.code != 354:
                    for i in accepted:
                        results[i] = RecipientResult(msg.recipients[i].address, data_reply.code,
                                                     data_reply.status, data_reply.text, hop)
                    return results, over, await self._rset(conn)
                await conn.send_content(content.parts, stuff=True, block_timeout=t.data_block)
                final = (await conn.command(b".\r\n", [(t.data_end, "sending end of data")]))[0]
        except StepError as e:
            conn.abort()
            raise _step_failure(hop, e) from None
        for i in accepted:
            results[i] = RecipientResult(msg.recipients[i].address, final.code, final.status,
                                         final.text, hop)
        conn.transactions += 1
        if final.code == 421:
            self.quit(conn)
            return results, over, False
        return results, over, conn.usable

    async def _rset(self, conn: SMTPClientProtocol) -> bool:
        """RSET; True when the connection can take another transaction (else it is closed)."""
        try:
            r = (await conn.command(b"RSET\r\n", [(self.timeouts.helo, "sending RSET")]))[0]
        except StepError:
            conn.abort()
            return False
        if r.ok:
            return conn.usable
        self.quit(conn)
        return False
