"""The inbound ESMTP server (RFC 5321) as a Twisted protocol and factory.

The protocol parses and replies; a policy object decides who may relay, the
spool stores, and a ``twisted.cred`` portal checks AUTH credentials.  One
command is processed at a time: while a spool write (or a password check)
is outstanding, further input (pipelined commands, RFC 2920) waits in the
buffer, so replies always come in order and nothing a client pipelined after
the final dot is lost.  Replies produced by one burst of input are written
in one go.

Abuse resistance: input is read only while it can be dealt with.  The
protocol is registered as a streaming producer with its transport, so when
a client does not read our replies and the transport's output buffer fills
up, we stop working through the input until it drains.  While we do not
work through it (output full, or a spool write outstanding), at most
``_PAUSE_AT`` octets are buffered before we stop reading.  (Reading is not
stopped as soon as the output is full: a TLS layer says its output is full
while its handshake is under way, and the handshake needs reading.)

The command timeout is the time allowed to send a complete command line
(bytes trickling in do not extend it: no slowloris); during DATA and BDAT
the timeout is extended only by ``_DATA_PROGRESS`` octets of progress.  A
connection we close is aborted if its last reply cannot be delivered within
``_CLOSE_GRACE`` seconds (or the command timeout).

STARTTLS (RFC 3207) and implicit TLS (RFC 8314): after ``220 Ready to start
TLS`` whatever the client pipelined in plaintext is thrown away (the
CVE-2011-0411 class of bug), and everything learnt from the client so far
(EHLO, transaction, AUTH) is forgotten.  AUTH PLAIN and LOGIN (RFC 4954) are
offered over TLS, or in plaintext on a loopback connection when the settings
allow it; AUTH CRAM-MD5 (RFC 2195), which does not reveal the password, is
offered on every connection as long as some user has a CRAM-MD5 secret.  A
credential check holds further input like a spool write does.
On a submission listener (port 587 semantics) MAIL needs AUTH first.

ETRN (RFC 1985): offered when the factory is given an ``etrn`` callback
(the daemon wires the queue runner's flush); who may ask for which domain
is the policy's answer (``etrn_refusal``, a ``459``).  The callback fires
with an :class:`EtrnStarted`; a flush is held like a spool write.

No SQL and no configuration parsing in here.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.cred.credentials import CramMD5Credentials, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.address import UNIXAddress
from twisted.internet.interfaces import (IHandshakeListener, IPushProducer, ISSLTransport,
                                         ITLSTransport)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .. import address
from .. import domain as dom
from ..address import AddressError, Mailbox
from ..auth.checker import IMailUser
from ..auth.limiter import FailureLimiter
from ..tls import connection_info
from ..message import (InboundMessage, MessageStore, Recipient, new_queue_id,
                       received_header, split_header_block)
from . import eager
from . import replies as r
from .data import DataReader, has_bare_newline, has_long_line, normalize_newlines
from .params import MailParams, parse_mail_params, parse_rcpt_params
from .replies import R, Reply, SMTPReplyError
from .settings import ServerSettings

log = Logger(namespace="mta.smtpd")

_RECEIVED = re.compile(rb"^Received[ \t]*:", re.I | re.M)
MAX_COMMAND_LINE = 512          # octets including CRLF (RFC 5321 §4.5.3.1.4)
MAX_AUTH_LINE = 12288           # AUTH command and SASL response lines (RFC 4954 §4)
_BDAT = re.compile(r"(\d{1,15})(?: +(LAST))? *", re.I)
_PAUSE_AT = 256 * 1024          # buffered input while busy before we stop reading
_FLUSH_AT = 256                 # replies gathered before they are written out
_DATA_PROGRESS = 1024           # octets of DATA/BDAT input that extend the data timeout
_CLOSE_GRACE = 30.0             # seconds for our last reply to go before we abort

_CMD, _DATA, _BDAT_MODE, _CLOSED = range(4)

# The metrics' reason label of a refusal after the content (see mta/metrics.py).
_REFUSAL_REASONS = {r.MSG_TOO_BIG: "too_big", r.BARE_NEWLINE: "bare_newline",
                    r.TEXT_LINE_TOO_LONG: "long_line"}


@dataclass(frozen=True)
class EtrnStarted:
    """What a flush asked for by ETRN made due: *messages* and *recipients*,
    their *domains*; *already*: a flush of that node was under way (it is
    not started twice)."""
    messages: int
    recipients: int
    domains: tuple[str, ...] = ()
    already: bool = False


#: ``etrn(domain, subdomains, client_ip)``: start the flush of *domain* (a
#: mta.domain key; *subdomains*: ``ETRN @domain``) asked for by *client_ip*.
EtrnHandler = Callable[[str, bool, str], "defer.Deferred[EtrnStarted]"]


class SMTPServerFactory(protocol.Factory):
    """Shared state of all listeners: settings, spool (a
    :class:`mta.message.MessageStore`), policy, connection counters, and
    (optional) the TLS context factory, the cred portal and the AUTH
    failure limiter.  ``listener()`` gives the per-endpoint factory.

    ``settings`` is a :class:`mta.smtp.settings.ServerSettings` (the
    daemon passes its ``[server]`` config section, which is one);
    ``auth_plaintext_on_loopback`` is ``[auth] allow_plaintext_on_loopback``;
    ``cram_md5()`` tells whether some user can AUTH CRAM-MD5 now (the
    daemon passes ``UsersFile.has_cram_md5``; None: never);
    ``on_stored(queue_id)`` is called after each 250 for a message (the
    daemon kicks the queue runner); ``metrics`` is a
    :class:`mta.metrics.Metrics` or None; ``etrn`` an :data:`EtrnHandler`
    (None: ETRN is not offered, ``502``)."""

    def __init__(self, settings: ServerSettings, spool: MessageStore, policy: Any,
                 reactor: Any, *, tls: Any = None, portal: Any = None,
                 limiter: FailureLimiter | None = None,
                 storage: Callable[[int], bool] | None = None,
                 auth_plaintext_on_loopback: bool = False,
                 cram_md5: Callable[[], bool] | None = None,
                 on_stored: Callable[[str], Any] | None = None,
                 metrics: Any = None, etrn: EtrnHandler | None = None):
        self.settings = settings
        self.spool = spool
        self.policy = policy
        self.reactor = reactor
        self.tls = tls            # IOpenSSLContextFactory for STARTTLS, or None
        self.portal = portal      # twisted.cred Portal giving IMailUser avatars, or None
        self.limiter = limiter if limiter is not None else FailureLimiter(clock=reactor)
        # storage(size) -> False when a message of size octets (0: not
        # declared) must not be taken now (452 4.3.1 at MAIL), or None.
        self.storage = storage
        self.connections = 0
        self.per_client: Counter[str] = Counter()
        self.auth_plaintext_on_loopback = auth_plaintext_on_loopback
        self.cram_md5 = cram_md5          # is CRAM-MD5 offered (some user has a secret)?
        self.on_stored = on_stored        # e.g. kick the queue runner
        self.metrics = metrics            # mta.metrics.Metrics, or None (no metrics)
        self.etrn = etrn                  # start a flush (ETRN), or None: not offered
        self.sessions: set[SMTPServer] = set()
        self.shutting_down = False

    # -- graceful shutdown ----------------------------------------------------
    def shutdown(self) -> None:
        """Stop taking mail: from now on every new command (and every new
        connection) is answered ``421 4.3.2`` and the session closed.  An idle
        session, or one still receiving a message, is closed at once (that
        message was never acknowledged); a session whose transaction is past
        its final dot gets the reply of its commit first."""
        self.shutting_down = True
        for session in list(self.sessions):
            session.begin_shutdown()

    def force_close(self) -> None:
        """The grace period is over: close every session that is not waiting
        for a commit (or a password check) to return."""
        for session in list(self.sessions):
            session.force_shutdown()

    def drained(self) -> bool:
        """True when no session waits for anything from us any more."""
        return all(s.finished() for s in self.sessions)

    def buildProtocol(self, addr: Any) -> "SMTPServer":
        p = SMTPServer(self)
        p.factory = self
        return p

    def listener(self, *, submission: bool = False, implicit_tls: bool = False) -> "ListenerFactory":
        return ListenerFactory(self, submission=submission, implicit_tls=implicit_tls)


class ListenerFactory(protocol.Factory):
    """The factory of one listening endpoint: sessions share the main factory
    (limits, counters) and learn whether they are on a submission listener
    and whether the listener speaks TLS from the first byte."""
    noisy = False

    def __init__(self, main: SMTPServerFactory, *, submission: bool, implicit_tls: bool):
        self.main = main
        self.submission = submission
        self.implicit_tls = implicit_tls

    def logPrefix(self) -> str:  # "submission starting on 2587"
        return "submission" if self.submission else "smtp"

    def buildProtocol(self, addr: Any) -> "SMTPServer":
        p = self.main.buildProtocol(addr)
        p.submission = self.submission
        p.implicit_tls = self.implicit_tls
        return p


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _is_tls_transport(transport: Any) -> bool:
    from twisted.protocols.tls import TLSMemoryBIOProtocol
    return ISSLTransport.providedBy(transport) or isinstance(transport, TLSMemoryBIOProtocol)


_LOGIN_USERNAME = base64.b64encode(b"Username:").decode()
_LOGIN_PASSWORD = base64.b64encode(b"Password:").decode()


@implementer(IHandshakeListener, IPushProducer)
class SMTPServer(protocol.Protocol):
    factory: SMTPServerFactory
    submission = False      # set by ListenerFactory: AUTH required before MAIL
    implicit_tls = False    # set by ListenerFactory: TLS from the first byte

    def __init__(self, factory: SMTPServerFactory):
        self.factory = factory
        s = factory.settings
        self.settings = s
        self.reactor = factory.reactor
        self._buf = b""
        self._out: list[bytes] = []
        self._mode = _CMD
        self._busy = False
        self._processing = False
        self._input_full = False     # enough input buffered while we cannot take it
        self._out_full = False       # the transport's output buffer is full
        self._read_paused = False    # we told the transport to stop reading
        self._registered = False     # registered as the transport's producer
        self._progress = 0           # DATA/BDAT octets since the timer was last extended
        self._abort_timer: Any = None
        self._skipping = False       # discarding the rest of an over-long command line
        self._errors = 0
        # A BDAT chunk was refused and only further chunks (of the message
        # that failed) followed: their refusals do not count as more errors.
        self._bdat_failing = False
        self._timer: Any = None
        self._counted = False
        self.helo: str | None = None
        self.esmtp = False
        self.enhanced = False
        self.tls = False
        self.tls_version = ""
        self.tls_cipher = ""
        self._tls_bits = 0
        self._handshake_done = False
        self._discard_input = False  # drop what is buffered (set by STARTTLS)
        self.authenticated: str | None = None
        self._sasl_mech: str | None = None      # an AUTH exchange is waiting for a response
        self._sasl_user: str | None = None      # LOGIN: the user name already given
        self._sasl_challenge: bytes | None = None  # CRAM-MD5: the challenge we sent
        self._delayed: Any = None               # a held-back reply (failed AUTH)
        self.client_ip = "unknown"
        self._reset_transaction()

    # -- transaction state --------------------------------------------------
    def _reset_transaction(self) -> None:
        self.sender: Mailbox | None = None
        self.has_sender = False
        self.mail_params = MailParams()
        self.recipients: list[Recipient] = []
        # The recipients' addresses as address.parse_path gave them (route
        # and brackets gone): one copy each, found in O(1) per RCPT.
        self._recipient_addresses: set[str] = set()
        self._reader: DataReader | None = None
        self._chunks: bytearray | None = None   # BDAT content so far
        self._bdat_error: Reply | None = None    # the transaction failed during BDAT
        self._bdat_left = 0
        self._bdat_last = False
        self._chunk_reply: Reply | None = None   # reply owed for the chunk being read

    # -- connection ---------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", None) or "unknown"
        f = self.factory
        f.connections += 1
        f.per_client[self.client_ip] += 1
        self._counted = True
        f.sessions.add(self)
        if f.metrics is not None:
            f.metrics.connection_opened()
        if f.shutting_down:
            self._close_with(r.SHUTTING_DOWN, enhanced=True)
            return
        if f.connections > self.settings.max_connections:
            self._close_with(r.TOO_MANY_CONNECTIONS, enhanced=True)
            return
        if f.per_client[self.client_ip] > self.settings.max_connections_per_client:
            self._close_with(r.TOO_MANY_FROM_CLIENT, enhanced=True)
            return
        if self.implicit_tls or _is_tls_transport(self.transport):
            self.tls = True   # an ssl: listener; the greeting waits for the handshake
        self._timer = self.reactor.callLater(self.settings.command_timeout, self._timed_out)
        register = getattr(self.transport, "registerProducer", None)
        if register is not None:
            register(self, True)     # pauseProducing() when our replies pile up
            self._registered = True
        eager.connected(self.transport)
        eager.write(self.transport, f"220 {self.settings.hostname} ESMTP mta\r\n".encode())

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake (STARTTLS or implicit) is done."""
        self._handshake_done = True
        try:
            handle = self.transport.getHandle()
        except Exception:
            handle = None
        self.tls_version, self.tls_cipher, self._tls_bits = connection_info(handle)
        log.info("TLS established client={client} version={version} cipher={cipher} "
                 "bits={bits}", client=self.client_ip, version=self.tls_version or "?",
                 cipher=self.tls_cipher or "?", bits=self._tls_bits)

    def tls_description(self) -> str | None:
        """For the Received header: "TLSv1.3 with cipher X (256 bits)"."""
        if not self.tls or not self.tls_version:
            return None
        bits = f" ({self._tls_bits} bits)" if self._tls_bits else ""
        return f"{self.tls_version} with cipher {self.tls_cipher}{bits}"

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.tls and not self._handshake_done and self._mode != _CLOSED:
            log.info("TLS handshake not completed client={client}: {reason}",
                     client=self.client_ip, reason=reason.getErrorMessage())
        self._mode = _CLOSED
        self._buf = b""
        self.factory.sessions.discard(self)
        self._reset_transaction()
        self._end_sasl()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()
            self._busy = False           # the held-back reply will never be sent
        self._delayed = None
        if self._abort_timer is not None and self._abort_timer.active():
            self._abort_timer.cancel()
        self._abort_timer = None
        self._registered = False
        if self._counted:
            self._counted = False
            f = self.factory
            f.connections -= 1
            if f.metrics is not None:
                f.metrics.connection_closed()
            f.per_client[self.client_ip] -= 1
            if f.per_client[self.client_ip] <= 0:
                del f.per_client[self.client_ip]

    def _timed_out(self) -> None:
        self._timer = None
        if self._mode == _CLOSED:
            return
        if self._busy:  # we are the slow one; give the spool its time
            self._timer = self.reactor.callLater(self.settings.command_timeout, self._timed_out)
            return
        log.info("timeout client={client}", client=self.client_ip)
        self._close_with(R(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"),
                         enhanced=True)

    def _close_with(self, reply: Reply, enhanced: bool = False) -> None:
        # The 421s we send on our own initiative (connection limits, timeout,
        # too many errors) carry their enhanced code even before EHLO, as
        # Postfix's do: the greeting-time refusal has no other way to say
        # 4.7.0, and a client that did not ask for the codes just sees text.
        self._out.append(reply.encode(enhanced or self.enhanced))
        self._flush()
        self._mode = _CLOSED
        self._buf = b""
        if self._registered:
            # A transport with a producer registered does not close.
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        # A client that does not read would keep the connection (and its
        # slot) forever, waiting for this last reply to be written.
        grace = min(_CLOSE_GRACE, self.settings.command_timeout)
        if self._abort_timer is None:
            self._abort_timer = self.reactor.callLater(grace, self._abort)

    def _abort(self) -> None:
        self._abort_timer = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            log.info("aborting connection client={client}: last reply not taken",
                     client=self.client_ip)
            abort()

    # -- graceful shutdown (see SMTPServerFactory.shutdown) ----------------------
    def begin_shutdown(self) -> None:
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()       # a held-back 535: not worth waiting for
            self._delayed = None
            self._busy = False
        if not self._busy and not self._processing and self._mode != _CLOSED:
            # Idle, or still receiving a message: that transaction is not
            # ours yet (no 250), so the client keeps it and tries again later.
            self._close_with(r.SHUTTING_DOWN, enhanced=True)
        # Otherwise a commit (or a password check) is pending: its reply goes
        # out first, then the 421 (see _process).

    def force_shutdown(self) -> None:
        if self._mode == _CLOSED:
            return
        if self._delayed is not None and self._delayed.active():
            self._delayed.cancel()       # a held-back 535: no need to hold it any more
            self._delayed = None
            self._busy = False
        if not self._busy:               # a commit in progress still gets its reply
            self._close_with(r.SHUTTING_DOWN, enhanced=True)

    @property
    def closed(self) -> bool:
        """The session is over (closed, or closing): nothing more is read or said."""
        return self._mode == _CLOSED

    def finished(self) -> bool:
        """Nothing more to say: closed (or closing), and no commit pending."""
        return self._mode == _CLOSED and not self._busy

    # -- flow control (IPushProducer, for the transport) ----------------------
    def pauseProducing(self) -> None:
        """The transport's output buffer is full (the client is not reading
        our replies, or TLS is still being negotiated): answer no more until
        it drains.  Input is buffered meanwhile, up to _PAUSE_AT."""
        self._out_full = True

    def resumeProducing(self) -> None:
        self._out_full = False
        if self._mode == _CLOSED or self._busy:
            return
        if self._buf:
            self._process()
        else:
            # The output filled up as the last buffered command was answered:
            # nothing is left to process, so reading must resume here.
            self._read_again_if_room()

    def stopProducing(self) -> None:
        self._registered = False   # the connection is going away

    def _read_again_if_room(self) -> None:
        """Reading was paused for buffered input: resume it once that input
        can be taken (no operation outstanding, room for the replies)."""
        if self._input_full and not self._busy and not self._out_full:
            self._input_full = False
            self._set_reading()

    def _set_reading(self) -> None:
        pause = self._input_full
        if pause != self._read_paused and self._mode != _CLOSED:
            self._read_paused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # -- input ----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._mode == _CLOSED:
            return
        if self._mode != _CMD and self._timer is not None:
            # Message content extends the data timeout by steady progress
            # only; commands extend the command timeout when they are
            # complete (in _process), not octet by octet.
            self._progress += len(data)
            if self._progress >= _DATA_PROGRESS:
                self._progress = 0
                self._timer.reset(self.settings.data_timeout)
        self._buf = self._buf + data if self._buf else data
        if self._busy or self._out_full:
            if not self._input_full and len(self._buf) > _PAUSE_AT:
                self._input_full = True
                self._set_reading()
            return
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            lines = self._process_loop()
        finally:
            self._processing = False
        if lines and self._timer is not None and self._mode != _CLOSED and not self._busy:
            self._progress = 0
            self._timer.reset(self.settings.command_timeout if self._mode == _CMD
                              else self.settings.data_timeout)
        if self.factory.shutting_down and self._mode == _CMD and not self._busy:
            # Stopping: the session's last reply is out (or about to be); no
            # more commands.
            self._close_with(r.SHUTTING_DOWN, enhanced=True)
            return
        self._flush()
        self._read_again_if_room()

    def _process_loop(self) -> int:
        """Work through the buffered input; return how many command lines
        were complete."""
        buf = self._buf
        pos = 0
        n = len(buf)
        lines = 0
        while pos < n and not self._busy and not self._out_full:
            mode = self._mode
            if mode == _CMD:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if n - pos > MAX_COMMAND_LINE and n - pos > self._line_limit(buf, pos):
                        self._skipping = True  # answer when the line finally ends
                        pos = n
                    break
                line = buf[pos:nl]
                start = pos
                pos = nl + 1
                lines += 1
                if len(self._out) >= _FLUSH_AT:
                    self._flush()   # the transport may tell us to pause
                if self._skipping:
                    self._skipping = False
                    self._line_too_long()
                    continue
                if line.endswith(b"\r"):
                    line = line[:-1]
                if (len(line) > MAX_COMMAND_LINE - 2
                        and len(line) > self._line_limit(buf, start) - 2):
                    self._line_too_long()
                    continue
                if self._sasl_mech is not None:
                    self._sasl_response(line)
                else:
                    self._command(line)
                if self._discard_input:
                    # STARTTLS: anything after it in this buffer came in
                    # plaintext before the handshake; it must not be obeyed.
                    self._discard_input = False
                    if n > pos:
                        log.info("discarded {n} octets pipelined after STARTTLS "
                                 "client={client}", n=n - pos, client=self.client_ip)
                    pos = n
                    break
            elif mode == _DATA:
                end = self._reader.feed(buf, pos)
                if end is None:
                    pos = n
                    break
                pos = end
                self._end_of_data()
            elif mode == _BDAT_MODE:
                take = min(self._bdat_left, n - pos)
                if take:
                    if self._chunks is not None:
                        self._chunks += memoryview(buf)[pos:pos + take]
                    self._bdat_left -= take
                    pos += take
                if self._bdat_left == 0:
                    self._end_of_chunk()
                else:
                    break
            else:  # closed
                pos = n
                break
        if self._mode == _CLOSED:
            self._buf = b""
        else:
            self._buf = buf[pos:] if pos < n else b""
            if self._mode == _BDAT_MODE and self._bdat_left == 0 and not self._busy:
                self._end_of_chunk()  # zero-length chunk arriving with nothing after it
        return lines

    def _line_limit(self, buf: bytes, start: int) -> int:
        if self._sasl_mech is not None or buf[start:start + 5].upper() == b"AUTH ":
            return MAX_AUTH_LINE
        return MAX_COMMAND_LINE

    def _line_too_long(self) -> None:
        if self._sasl_mech is not None:
            self._end_sasl()
            self._reply(R(500, "5.5.6", "Authentication exchange line is too long"))
        else:
            self._reply(r.LINE_TOO_LONG)

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            if self.transport is not None:
                eager.write(self.transport, data)

    def _reply(self, reply: Reply, *, counts: bool = True) -> None:
        """Queue *reply*; a 5xx counts towards ``max_errors`` unless *counts*
        is false."""
        self._out.append(reply.encode(self.enhanced))
        if reply.code >= 500 and counts:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                log.info("too many errors client={client}", client=self.client_ip)
                self._close_with(r.TOO_MANY_ERRORS, enhanced=True)

    # -- commands -----------------------------------------------------------
    def _command(self, raw: bytes) -> None:
        if self.factory.shutting_down:
            self._close_with(r.SHUTTING_DOWN, enhanced=True)
            return
        if b"\x00" in raw or b"\r" in raw:  # NUL, or a bare CR inside the line
            self._reply(r.BAD_CHARS)
            return
        try:
            line = raw.decode("ascii") if raw.isascii() else raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(r.BAD_CHARS)
            return
        verb, _, arg = line.partition(" ")
        # ASCII only: 'ı'.upper() == 'I', so "MAıL" would otherwise pass for MAIL.
        name = _HANDLERS.get(verb.upper()) if verb.isascii() else None
        if name != "do_BDAT":
            self._bdat_failing = False   # the client has stopped sending chunks
        if name is None:
            self._reply(r.UNKNOWN_COMMAND)
            return
        try:
            getattr(self, name)(arg.strip(" "))
        except SMTPReplyError as e:
            self._reply(e.reply)

    def do_HELO(self, arg: str) -> None:
        if not arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: HELO hostname"))
        self._reset_transaction()
        self.helo = arg.split(" ", 1)[0]
        self.esmtp = False
        self.enhanced = False
        self._reply(R(250, None, self.settings.hostname))

    def _start_ehlo(self, arg: str) -> str:
        """The session state an EHLO sets (both listeners); its greeting line."""
        if not arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: EHLO hostname"))
        self._reset_transaction()
        self.helo = arg.split(" ", 1)[0]
        self.esmtp = True
        self.enhanced = True
        return f"{self.settings.hostname} greets {self.helo}"

    def do_EHLO(self, arg: str) -> None:
        greeting = self._start_ehlo(arg)
        size = self.settings.max_message_size
        lines = [greeting,
                 "PIPELINING",
                 f"SIZE {size}" if size else "SIZE",
                 "8BITMIME",
                 "BINARYMIME",
                 "CHUNKING",
                 "ENHANCEDSTATUSCODES",
                 "SMTPUTF8",
                 "DSN",
                 "HELP"]
        if self._starttls_offered():
            lines.append("STARTTLS")
        auth = self._auth_keyword()
        if auth is not None:
            lines.append(auth)
        if self.factory.etrn is not None:
            lines.append("ETRN")
        self._out.append(Reply(250, None, "\n".join(lines)).encode(False))

    def do_MAIL(self, arg: str) -> None:
        if self.helo is None:
            raise SMTPReplyError(r.NEED_HELO)
        if self.has_sender:
            raise SMTPReplyError(r.NESTED_MAIL)
        if self.submission and self.authenticated is None:
            self._count_rejected("auth_required")
            raise SMTPReplyError(r.AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:":
            raise SMTPReplyError(R(501, "5.5.2", "Syntax: MAIL FROM:<address>"))
        try:
            path, rest = address.split_path(arg[5:])
        except AddressError as e:
            raise SMTPReplyError(R(501, "5.1.7", f"Bad sender address syntax: {e}")) from None
        params = parse_mail_params(rest, esmtp=self.esmtp)
        try:
            sender = address.parse_path(path, utf8=params.smtputf8, allow_null=True)
        except AddressError as e:
            if not path.isascii() and not params.smtputf8:
                raise SMTPReplyError(r.NON_ASCII_ADDRESS) from None
            raise SMTPReplyError(R(501, "5.1.7", f"Bad sender address syntax: {e}")) from None
        limit = self.settings.max_message_size
        if limit and params.size is not None and params.size > limit:
            self._count_rejected("too_big")
            raise SMTPReplyError(r.MSG_TOO_BIG)
        storage = self.factory.storage
        if storage is not None and not storage(params.size or 0):
            self._count_rejected("insufficient_storage")
            raise SMTPReplyError(r.INSUFFICIENT_STORAGE)
        if params.auth is not None and self.authenticated is None:
            # RFC 4954 §5: from a client that has not authenticated, behave
            # as if AUTH=<> had been given.
            params = replace(params, auth="<>")
        self.sender = sender
        self.has_sender = True
        self.mail_params = params
        self._reply(r.SENDER_OK)

    def do_RCPT(self, arg: str) -> None:
        if self.helo is None:
            raise SMTPReplyError(r.NEED_HELO)
        if not self.has_sender:
            raise SMTPReplyError(r.NEED_MAIL)
        if self._chunks is not None or self._bdat_error is not None:
            raise SMTPReplyError(R(503, "5.5.1", "RCPT not allowed during BDAT"))
        if arg[:3].upper() != "TO:":
            raise SMTPReplyError(R(501, "5.5.2", "Syntax: RCPT TO:<address>"))
        try:
            path, rest = address.split_path(arg[3:])
        except AddressError as e:
            raise SMTPReplyError(R(501, "5.1.3", f"Bad recipient address syntax: {e}")) from None
        params = parse_rcpt_params(rest, esmtp=self.esmtp)
        utf8 = self.mail_params.smtputf8
        try:
            rcpt = address.parse_path(path, utf8=utf8, allow_postmaster=True)
        except AddressError as e:
            if not path.isascii() and not utf8:
                raise SMTPReplyError(r.NON_ASCII_ADDRESS) from None
            raise SMTPReplyError(R(501, "5.1.3", f"Bad recipient address syntax: {e}")) from None
        assert rcpt is not None
        if len(self.recipients) >= self.settings.max_recipients:
            self._count_rejected("too_many_recipients")
            raise SMTPReplyError(r.TOO_MANY_RCPTS)
        refusal = self.factory.policy.check_recipient(
            rcpt, client_ip=self.client_ip, authenticated=self.authenticated is not None)
        if refusal is not None:
            log.info("reject client={client} from=<{sender}> to=<{rcpt}> {code} {status} "
                     "{reason}", client=self.client_ip, sender=self.sender or "", rcpt=rcpt,
                     code=refusal.code, status=refusal.status,
                     reason=refusal.reason.replace("_", " "))
            self._count_rejected(refusal.reason)
            raise SMTPReplyError(R(refusal.code, refusal.status, refusal.text))
        text = str(rcpt)
        if text not in self._recipient_addresses:  # one copy per address; the first one's
            self._recipient_addresses.add(text)    # NOTIFY and ORCPT are kept
            self.recipients.append(Recipient(text, params.notify, params.orcpt))
        self._reply(r.RCPT_OK)

    def do_DATA(self, arg: str) -> None:
        if self.helo is None:
            raise SMTPReplyError(r.NEED_HELO)
        if not self.has_sender:
            raise SMTPReplyError(r.NEED_MAIL)
        if self._chunks is not None or self._bdat_error is not None:
            raise SMTPReplyError(r.DATA_AFTER_BDAT)
        if arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: DATA"))
        if self.mail_params.body == "BINARYMIME":
            raise SMTPReplyError(r.BINARYMIME_DATA)
        if not self.recipients:
            raise SMTPReplyError(r.NO_VALID_RCPT)
        self._reader = DataReader(self.settings.max_message_size, self.settings.bare_newlines)
        self._mode = _DATA
        self._reply(r.DATA_GO)
        if self._timer is not None:
            self._timer.reset(self.settings.data_timeout)

    def _end_of_data(self) -> None:
        self._mode = _CMD
        if self._timer is not None:
            self._timer.reset(self.settings.command_timeout)
        content, err = self._reader.result(self.settings.max_message_size)
        self._reader = None
        if err is not None:
            self._refuse(err)
            return
        self._store(content)

    def do_BDAT(self, arg: str) -> None:
        m = _BDAT.fullmatch(arg)
        if m is None:
            # Without a size we cannot tell where the chunk ends: reading on
            # would take message content for commands.  Stop here.
            self._close_with(R(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]; closing connection"))
            return
        size = int(m.group(1))
        last = m.group(2) is not None
        # The chunk is read whatever we think of it, so we stay in step.
        err: Reply | None = None
        if self.helo is None:
            err = r.NEED_HELO
        elif not self.has_sender:
            err = r.NEED_MAIL
        elif not self.recipients:
            err = r.NO_VALID_RCPT
        elif self._bdat_error is not None:
            err = self._bdat_error
        self._chunk_reply = err
        if err is None:
            if self._chunks is None:
                self._chunks = bytearray()
            limit = self.settings.max_message_size
            if limit and len(self._chunks) + size > limit:
                self._count_rejected("too_big")
                self._bdat_error = self._chunk_reply = r.MSG_TOO_BIG
                self._chunks = None
        self._bdat_left = size
        self._bdat_last = last
        self._mode = _BDAT_MODE
        if self._timer is not None:
            self._timer.reset(self.settings.data_timeout)

    def _end_of_chunk(self) -> None:
        self._mode = _CMD
        if self._timer is not None:
            self._timer.reset(self.settings.command_timeout)  # as after DATA's dot
        last = self._bdat_last
        if self._chunk_reply is not None:
            reply = self._chunk_reply
            self._chunk_reply = None
            if self._bdat_error is not None and last:
                self._reset_transaction()  # a failed BDAT transaction ends with LAST
            # RFC 3030: after a refused chunk the client sends no more, but
            # chunks it had already pipelined are read and discarded.  Each
            # gets a reply (the refusal again), yet the message counts as one
            # error: a pipelined oversized message must not earn a 421.
            first = not self._bdat_failing
            self._bdat_failing = not last
            self._reply(reply, counts=first)
            return
        if not last:
            self._reply(R(250, "2.0.0", f"{self._bdat_size_so_far()} octets received"))
            return
        content = self._chunks if self._chunks is not None else bytearray()
        self._chunks = None
        if self.mail_params.body != "BINARYMIME":
            if has_bare_newline(content):
                if self.settings.bare_newlines != "normalize":
                    self._refuse(r.BARE_NEWLINE)
                    return
                content = normalize_newlines(content)
            if has_long_line(content):
                self._refuse(r.TEXT_LINE_TOO_LONG)
                return
        self._store(content)

    def _bdat_size_so_far(self) -> int:
        return len(self._chunks) if self._chunks is not None else 0

    def _count_rejected(self, reason: str) -> None:
        m = self.factory.metrics
        if m is not None:
            m.message_rejected(reason)

    def _refuse(self, reply: Reply) -> None:
        if self.factory.metrics is not None:
            self._count_rejected(_REFUSAL_REASONS.get(reply, "other"))
        log.info("refused client={client} from=<{sender}> nrcpt={n}: {reply}",
                 client=self.client_ip, sender=self.sender or "", n=len(self.recipients),
                 reply=str(reply))
        self._reset_transaction()
        self._reply(reply)

    # -- storing --------------------------------------------------------------
    def _protocol_name(self) -> str:
        base = "ESMTP" if self.esmtp else "SMTP"
        if self.mail_params.smtputf8:
            base = "UTF8SMTP"
        if self.tls:
            base += "S"
        if self.authenticated is not None:
            base += "A"
        return base

    def _store(self, content: bytearray) -> None:
        now = self.reactor.seconds()
        qid = new_queue_id(now)
        proto = self._protocol_name()
        rcpts = self.recipients
        hdr_end = split_header_block(content)
        hops = len(_RECEIVED.findall(content, 0, hdr_end))
        if hops >= self.settings.max_hops:
            # A mail loop (RFC 5321 §6.3): refuse rather than pass it on again.
            self._refuse(R(554, "5.4.6", f"Too many hops ({hops} Received lines): mail loop?"))
            return
        received = received_header(
            helo=self.helo or "", client_ip=self.client_ip, hostname=self.settings.hostname,
            protocol=proto, queue_id=qid,
            recipient=rcpts[0].address if len(rcpts) == 1 else None, now=now,
            tls=self.tls_description())
        headers = received + memoryview(content)[:hdr_end]  # one copy of the header block
        body = memoryview(content)[hdr_end:] if hdr_end else content
        p = self.mail_params
        msg = InboundMessage(
            queue_id=qid, sender=str(self.sender) if self.sender else "", recipients=rcpts,
            headers=headers, body=body, arrival=now, client_address=self.client_ip,
            helo=self.helo or "", protocol=proto, size=len(headers) + len(body),
            body_type=p.body, smtputf8=p.smtputf8, size_param=p.size, ret=p.ret,
            envid=p.envid, auth=p.auth)
        self._busy = True
        try:
            d = self.factory.spool.store(msg)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(msg,), errbackArgs=(msg,))

    def _stored(self, qid: str, msg: InboundMessage) -> None:
        self._done(R(250, "2.0.0", f"Ok: queued as {qid}"))
        # The log line, the metric and on_stored wait until the 250 is on
        # its way (a later turn of the reactor: the one now ends with the
        # write): a log write can block on the file's pages while a commit's
        # fsync flushes them, ~0.2 ms of every single client's dot -> 250.
        self.reactor.callLater(0, self.reactor.callLater, 0, self._log_stored, qid, msg,
                               self.authenticated)

    def _log_stored(self, qid: str, msg: InboundMessage, user: str | None) -> None:
        # Formatted here, the fields kept for the JSON log: Twisted's own
        # formatting of a template costs ~10 µs a field, on every message.
        line = (f"{qid}: client={msg.client_address} helo={msg.helo} from=<{msg.sender}> "
                f"size={msg.size} nrcpt={len(msg.recipients)} proto={msg.protocol}")
        fields = dict(queue_id=qid, client=msg.client_address, helo=msg.helo,
                      sender=msg.sender, size=msg.size, nrcpt=len(msg.recipients),
                      proto=msg.protocol)
        if user is not None:
            line += f" sasl_username={user}"
            fields["user"] = user
        log.info("{line}", line=line, **fields)
        if self.factory.metrics is not None:
            self.factory.metrics.accepted.inc()
        if self.factory.on_stored is not None:
            self.factory.on_stored(qid)

    def _store_failed(self, failure: Failure, msg: InboundMessage) -> None:
        log.error("spool failure client={client} from=<{sender}> nrcpt={nrcpt}: {error}",
                  client=msg.client_address, sender=msg.sender, nrcpt=len(msg.recipients),
                  error=failure.getErrorMessage())
        self._count_rejected("spool_error")
        self._done(r.SPOOL_FAILED)

    def _done(self, reply: Reply) -> None:
        self._reset_transaction()
        self._resume(reply)

    def _resume(self, reply: Reply) -> None:
        """The outstanding operation is over: reply, and go on with what the
        client pipelined meanwhile."""
        self._busy = False
        self._delayed = None
        if self._mode == _CLOSED:
            return
        if self._timer is not None and self._mode == _CMD:
            self._timer.reset(self.settings.command_timeout)  # the client's turn now
        self._reply(reply)
        self._read_again_if_room()
        if self._processing:
            return  # the running loop goes on with what is buffered
        self._process()

    # -- simple commands ----------------------------------------------------------
    def do_RSET(self, arg: str) -> None:
        if arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: RSET"))
        self._reset_transaction()
        self._reply(r.OK)

    def do_NOOP(self, arg: str) -> None:
        self._reply(r.OK)

    def do_QUIT(self, arg: str) -> None:
        self._close_with(r.BYE)

    def do_VRFY(self, arg: str) -> None:
        if not arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: VRFY address"))
        self._reply(r.VRFY_CANNOT)

    def do_EXPN(self, arg: str) -> None:
        self._reply(r.EXPN_DISABLED)

    def do_HELP(self, arg: str) -> None:
        self._reply(r.HELP)

    # -- STARTTLS (RFC 3207) -------------------------------------------------------
    def _starttls_offered(self) -> bool:
        return (self.factory.tls is not None and not self.tls
                and ITLSTransport.providedBy(self.transport))

    def do_STARTTLS(self, arg: str) -> None:
        if self.tls:
            raise SMTPReplyError(r.TLS_ALREADY_ACTIVE)
        ctx = self.factory.tls
        if ctx is None or not ITLSTransport.providedBy(self.transport):
            raise SMTPReplyError(r.STARTTLS_UNAVAILABLE)
        if arg:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: STARTTLS"))
        if self.has_sender:
            raise SMTPReplyError(R(503, "5.5.1", "STARTTLS not permitted during a mail transaction"))
        try:
            ctx.getContext()
        except Exception as e:
            log.error("STARTTLS impossible client={client}: {error}", client=self.client_ip,
                      error=str(e) or type(e).__name__)
            raise SMTPReplyError(r.TLS_TEMP_UNAVAILABLE) from None
        self._reply(r.READY_TO_START_TLS)
        self._flush()                     # the 220 goes out in plaintext
        self._discard_input = True        # and nothing buffered behind STARTTLS is obeyed
        self.transport.startTLS(ctx)
        self.tls = True
        # RFC 3207 §4.2: discard any knowledge obtained from the client.
        self._reset_transaction()
        self.helo = None
        self.esmtp = False
        self.enhanced = False
        self.authenticated = None

    # -- AUTH (RFC 4954) ---------------------------------------------------------------
    def _on_loopback(self) -> bool:
        try:
            host = self.transport.getHost()
        except Exception:
            return False
        if isinstance(host, UNIXAddress):
            return True
        return _is_loopback(self.client_ip) and _is_loopback(getattr(host, "host", "") or "")

    def _auth_mechanisms(self) -> list[str]:
        """The SASL mechanisms this session offers (EHLO's AUTH line)."""
        f = self.factory
        if f.portal is None:
            return []
        # PLAIN and LOGIN send the password itself: TLS (or loopback if allowed).
        if self.tls or (f.auth_plaintext_on_loopback and self._on_loopback()):
            mechanisms = ["PLAIN", "LOGIN"]
        else:
            mechanisms = []
        if f.cram_md5 is not None and f.cram_md5():
            mechanisms.append("CRAM-MD5")
        return mechanisms

    def _end_sasl(self) -> None:
        self._sasl_mech = self._sasl_user = self._sasl_challenge = None

    def _auth_keyword(self) -> str | None:
        """EHLO's AUTH line ("AUTH PLAIN LOGIN CRAM-MD5"), None when AUTH is
        not offered (one place for the ODMR listener's EHLO too)."""
        mechanisms = self._auth_mechanisms()
        return "AUTH " + " ".join(mechanisms) if mechanisms else None

    def do_AUTH(self, arg: str) -> None:
        if self.factory.portal is None:
            raise SMTPReplyError(r.AUTH_UNAVAILABLE)
        offered = self._auth_mechanisms()
        if not offered:
            raise SMTPReplyError(r.ENCRYPTION_REQUIRED)
        if not self.esmtp:
            raise SMTPReplyError(R(503, "5.5.1", "Send EHLO first"))
        if self.authenticated is not None:
            raise SMTPReplyError(R(503, "5.5.1", "Already authenticated"))
        if self.has_sender:
            raise SMTPReplyError(R(503, "5.5.1", "AUTH not permitted during a mail transaction"))
        mech, _, initial = arg.partition(" ")
        initial = initial.strip(" ")
        if not mech or " " in initial:
            raise SMTPReplyError(R(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        mech = mech.upper()
        if mech not in offered:
            if mech in ("PLAIN", "LOGIN"):      # offered with TLS only
                raise SMTPReplyError(r.ENCRYPTION_REQUIRED)
            raise SMTPReplyError(R(504, "5.5.4", "Unrecognized authentication type"))
        if mech == "CRAM-MD5" and initial:
            # The server speaks first in CRAM-MD5 (RFC 4954 §4).
            raise SMTPReplyError(R(501, "5.5.4", "CRAM-MD5 takes no initial response"))
        if self.factory.limiter.refused(self.client_ip):
            log.info("auth refused client={client}: too many failures", client=self.client_ip)
            raise SMTPReplyError(r.AUTH_TOO_MANY_FAILURES)
        self._sasl_mech = mech
        self._sasl_user = None
        if mech == "CRAM-MD5":
            # RFC 2195: a msg-id style challenge, <random.timestamp@hostname>.
            self._sasl_challenge = (f"<{secrets.randbelow(10 ** 12)}."
                                    f"{int(self.reactor.seconds())}@{self.settings.hostname}>"
                                    ).encode("utf-8")
            self._reply(R(334, None, base64.b64encode(self._sasl_challenge).decode("ascii")))
            return
        if not initial:
            self._reply(R(334, None, _LOGIN_USERNAME if mech == "LOGIN" else ""))
            return
        # An initial response of "=" is an empty one (RFC 4954 §4).
        self._sasl_response(b"" if initial == "=" else initial.encode("ascii", "replace"),
                            initial=True)

    def _sasl_response(self, line: bytes, initial: bool = False) -> None:
        """One client response of the AUTH exchange (or the initial response)."""
        mech = self._sasl_mech
        if line == b"*" and not initial:
            self._end_sasl()
            self._reply(R(501, "5.7.0", "Authentication cancelled"))
            return
        try:
            data = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError):
            self._end_sasl()
            self._reply(R(501, "5.5.2", "Cannot decode response"))
            return
        if mech == "CRAM-MD5":
            # RFC 2195: user name, a space, the HMAC-MD5 digest in hex.
            challenge = self._sasl_challenge or b""
            self._end_sasl()
            name, space, digest = data.rpartition(b" ")
            if not space or not name:
                self._reply(R(501, "5.5.2", "Invalid CRAM-MD5 response"))
                return
            try:
                user = name.decode("utf-8")
            except UnicodeDecodeError:
                user = "\ufffd"
            cram = CramMD5Credentials(self.settings.hostname.encode("utf-8", "replace"))
            cram.challenge, cram.username, cram.response = challenge, name, digest
            self._check_credentials(mech, user, cram)
            return
        if mech == "LOGIN":
            if self._sasl_user is None:
                try:
                    self._sasl_user = data.decode("utf-8")
                except UnicodeDecodeError:
                    self._sasl_user = "\ufffd"  # no such user; fails after the password
                self._reply(R(334, None, _LOGIN_PASSWORD))
                return
            user, password = self._sasl_user, data
        else:  # PLAIN: authzid NUL authcid NUL passwd (RFC 4616)
            parts = data.split(b"\0")
            if len(parts) != 3:
                self._end_sasl()
                self._reply(R(501, "5.5.2", "Invalid PLAIN response"))
                return
            authzid, authcid, password = parts
            try:
                user = authcid.decode("utf-8")
                zid = authzid.decode("utf-8")
            except UnicodeDecodeError:
                user, zid = "\ufffd", ""
            if zid and zid != user:
                user = "\ufffd"     # acting for someone else is not allowed: fail below
        self._end_sasl()
        self._check_credentials(mech or "?", user,
                                UsernamePassword(user.encode("utf-8", "replace"), password))

    def _check_credentials(self, mech: str, user: str,
                           creds: UsernamePassword | CramMD5Credentials) -> None:
        self._busy = True            # pipelined input waits for the verdict
        self.factory.limiter.started(self.client_ip)
        try:
            d = self.factory.portal.login(creds, None, IMailUser)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._auth_succeeded, self._auth_failed,
                       callbackArgs=(mech,), errbackArgs=(mech, user))

    def _auth_succeeded(self, result: tuple, mech: str) -> None:
        _iface, avatar, _logout = result
        self.factory.limiter.finished(self.client_ip)
        if self._mode == _CLOSED:
            self._busy = False
            return
        self.authenticated = avatar.username
        log.info("auth ok client={client} mechanism={mech} sasl_username={user}",
                 client=self.client_ip, mech=mech, user=self.authenticated)
        self._resume(r.AUTH_OK)

    def _auth_failed(self, failure: Failure, mech: str, user: str) -> None:
        self.factory.limiter.finished(self.client_ip)
        if not failure.check(UnauthorizedLogin):
            log.failure("auth check failed client={client}", failure, client=self.client_ip)
            self._resume(r.AUTH_TEMP_FAILURE)
            return
        delay = self.factory.limiter.failed(self.client_ip)
        log.info("auth failed client={client} mechanism={mech} sasl_username={user} "
                 "failures={n}", client=self.client_ip, mech=mech, user=user,
                 n=self.factory.limiter.failures(self.client_ip))
        if delay > 0 and self._mode != _CLOSED:
            self._delayed = self.reactor.callLater(delay, self._resume, r.AUTH_INVALID)
        else:
            self._resume(r.AUTH_INVALID)

    # -- ETRN (RFC 1985) -------------------------------------------------------------
    def do_ETRN(self, arg: str) -> None:
        etrn = self.factory.etrn
        if etrn is None:
            raise SMTPReplyError(r.ETRN_UNAVAILABLE)
        if self.helo is None:
            raise SMTPReplyError(r.NEED_HELO)
        if self.has_sender:
            raise SMTPReplyError(r.ETRN_IN_TRANSACTION)
        if not arg:
            raise SMTPReplyError(r.ETRN_SYNTAX)
        if arg.startswith("#"):
            self._etrn_done(arg, "unsupported", r.etrn_unable(arg, "named queues are not "
                                                               "supported"))
            return
        subdomains = arg.startswith("@")
        name = arg[1:] if subdomains else arg
        try:
            if " " in name or dom.is_literal(name):
                raise dom.DomainError(f"{name!r} is not a domain name")
            key = dom.to_ascii(name)
        except dom.DomainError:
            raise SMTPReplyError(r.etrn_bad_argument(arg)) from None
        node = ("@" if subdomains else "") + key
        why = self.factory.policy.etrn_refusal(self.client_ip, key, subdomains=subdomains)
        if why is not None:
            self._etrn_done(node, "refused", r.etrn_not_allowed(node), why=why)
            return
        self._busy = True            # pipelined input waits for the answer
        try:
            d = etrn(key, subdomains, self.client_ip)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._etrn_started, self._etrn_failed, callbackArgs=(node,),
                       errbackArgs=(node,))

    def _etrn_started(self, started: EtrnStarted, node: str) -> None:
        if started.already:
            reply, result = r.etrn_queuing(node), "already"
        elif started.messages:
            reply, result = r.etrn_pending(node, started.messages), "started"
        else:
            reply, result = r.etrn_no_messages(node), "no_mail"
        self._etrn_done(node, result, reply, started=started)

    def _etrn_failed(self, failure: Failure, node: str) -> None:
        log.error("etrn client={client} node={node}: flush failed: {error}",
                  client=self.client_ip, node=node, error=failure.getErrorMessage())
        self._etrn_done(node, "failed", r.etrn_unable(node, "try again later"), logged=True)

    def _etrn_done(self, node: str, result: str, reply: Reply, *,
                   started: EtrnStarted | None = None, why: str = "",
                   logged: bool = False) -> None:
        """The one log line (and count) of an ETRN, and its reply."""
        n = started.recipients if started is not None else 0
        if not logged:
            log.info("etrn client={client} node={node} domains={domains} messages={messages} "
                     "recipients={n} result={result}{why} ({reply})", client=self.client_ip,
                     node=node, domains=",".join(started.domains) if started else "-",
                     messages=started.messages if started else 0, n=n, result=result,
                     why=f" ({why})" if why else "", reply=str(reply))
        if self.factory.metrics is not None:
            self.factory.metrics.etrn_done(result, n)
        if self._busy:
            if self._mode == _CLOSED:
                self._busy = False
                return
            self._resume(reply)
        else:
            self._reply(reply)

    def do_ATRN(self, arg: str) -> None:
        self._reply(r.ATRN_UNAVAILABLE)

    def do_TURN(self, arg: str) -> None:
        self._reply(r.TURN_REFUSED)

    def do_obsolete(self, arg: str) -> None:
        self._reply(r.NOT_IMPLEMENTED)


# Verb -> the name of its method, looked up on the session: a protocol built
# on this one (mta.smtp.odmr) answers a verb differently by overriding it.
_HANDLERS: dict[str, str] = {
    verb: f"do_{verb}" for verb in (
        "HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
        "EXPN", "HELP", "STARTTLS", "AUTH", "ETRN", "ATRN", "TURN")
}
_HANDLERS.update(SEND="do_obsolete", SOML="do_obsolete", SAML="do_obsolete")
