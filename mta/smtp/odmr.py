"""The On-Demand Mail Relay server (RFC 2645): ATRN on ``[gateway]
atrn_listen``.

A customer that is not always online (a branch office that dials in at
night) connects here, authenticates, and says ``ATRN`` (all the domains its
user was granted) or ``ATRN d1,d2``; we then turn the connection around --
it becomes our SMTP client session to the customer's SMTP server -- and
hand over the mail queued for those domains.

This module owns the protocol: it is :class:`mta.smtp.server.SMTPServer`
(one command loop, one reply formatter, one STARTTLS and one AUTH
implementation) with the mail commands taken away and ATRN added:

* EHLO lists AUTH (as the ordinary listeners offer it), STARTTLS when a
  certificate is configured, ATRN; MAIL, RCPT, DATA and BDAT are ``502``
  (§5.4: this port takes no mail), as are ETRN and TURN;
* ``ATRN`` before AUTH: ``530``; a domain not granted to the user (the
  ``grants`` callable, ``[gateway.atrn]``): ``450``; a domain that another
  ATRN session is taking now: ``451``; nothing queued: ``453 You have no
  mail``; a temporary problem (the spool): ``451``;
* otherwise ``250 OK now reversing the connection``: the bytes that follow
  belong to an :class:`mta.smtp.client.SMTPClientProtocol` attached to the
  same transport (TCP or TLS as it is), driven by
  :class:`mta.smtp.pool.TurnedConnection` -- the customer's 220, our
  EHLO, the transactions, QUIT.

What is queued and what becomes of each recipient is not decided here: the
factory is given an :class:`ATRNHandler` (the daemon wires the queue
runner's ``deliver_over``), called with the domains and a *turn* callable.
The handler claims the recipients; when there are none it fires with 0
without calling *turn* (453); otherwise it calls ``turn(n)``, which sends
the 250, turns the connection and fires with the started TurnedConnection,
delivers over it, and fires with the number of recipients handed over.
When the handler is done this side says QUIT.  The ATRN lock (one session
per domain at a time) is the factory's, since it sees every ODMR session.

No SQL, no configuration and nothing of mta/delivery/ in here.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import domain as dom
from .client import SMTPClientProtocol
from .pool import TurnedConnection, TurnFailed
from .replies import R, Reply, SMTPReplyError
from . import replies as r
from .server import SMTPServer, SMTPServerFactory
from .settings import Timeouts
from .types import NextHop, TLSInfo

__all__ = ["ATRNHandler", "ODMRFactory", "ODMRServer", "Turn"]

log = Logger(namespace="mta.odmr")

#: What the handler calls once it has claimed *n* recipients: the 250 goes
#: out, the connection is turned, and the Deferred fires with the started
#: TurnedConnection (or fails with TurnFailed).
Turn = Callable[[int], "defer.Deferred[TurnedConnection]"]


class ATRNHandler(Protocol):
    """Hands over the mail of *domains* (mta.domain.key form): fires with 0
    without calling *turn* when none is queued; otherwise calls ``turn(n)``,
    delivers over the TurnedConnection it gives, and fires with the number
    of recipients handed over.  Failing before *turn* is called is a
    temporary problem (451)."""

    def __call__(self, domains: Sequence[str], turn: Turn) -> defer.Deferred[int]: ...


NO_MAIL = R(453, "4.3.0", "You have no mail")
REVERSING = R(250, "2.0.0", "OK now reversing the connection")
NOT_HERE = R(502, "5.5.1", "Command not implemented on the ODMR service (RFC 2645)")
ATRN_FAILED = R(451, "4.3.0", "Temporary problem taking your mail, try again later")


class ODMRFactory(protocol.Factory):
    """The factory of an ``atrn_listen`` endpoint.  Sessions share *main*
    (the SMTP server factory: connection limits, TLS, the portal, the AUTH
    failure limiter, the shutdown); *grants(user)* gives the domains a user
    may take; *atrn* is the :class:`ATRNHandler`; *timeouts* and our
    hostname (``main.settings.hostname``) are the client side's."""
    noisy = False

    def __init__(self, main: SMTPServerFactory, *, grants: Callable[[str], Sequence[str]],
                 atrn: ATRNHandler, timeouts: Timeouts = Timeouts(),
                 implicit_tls: bool = False) -> None:
        self.main = main
        self.grants = grants
        self.atrn = atrn
        self.timeouts = timeouts
        self.implicit_tls = implicit_tls
        self.active: dict[str, ODMRServer] = {}     # domain -> the session taking its mail

    def logPrefix(self) -> str:  # "odmr starting on 366"
        return "odmr"

    def buildProtocol(self, addr: Any) -> "ODMRServer":
        return ODMRServer(self.main, self, implicit_tls=self.implicit_tls)


class ODMRServer(SMTPServer):
    """One ODMR session (see the module docstring)."""

    def __init__(self, main: SMTPServerFactory, odmr: ODMRFactory, *,
                 implicit_tls: bool = False) -> None:
        super().__init__(main)
        self.odmr = odmr
        self.implicit_tls = implicit_tls
        self._turned: SMTPClientProtocol | None = None     # the client side, once turned
        self._turned_session: TurnedConnection | None = None
        self._domains: tuple[str, ...] = ()       # the domains this session holds the lock of

    # -- EHLO and the commands this port does not take ------------------------------
    def do_EHLO(self, arg: str) -> None:
        lines = [self._start_ehlo(arg), "ENHANCEDSTATUSCODES"]
        auth = self._auth_keyword()
        if auth is not None:
            lines.append(auth)
        if self._starttls_offered():
            lines.append("STARTTLS")
        lines += ["ATRN", "HELP"]
        self._out.append(Reply(250, None, "\n".join(lines)).encode(False))

    def do_MAIL(self, arg: str) -> None:
        self._reply(NOT_HERE)

    do_RCPT = do_DATA = do_BDAT = do_ETRN = do_MAIL

    def do_HELP(self, arg: str) -> None:
        self._reply(R(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH ATRN RSET NOOP QUIT\n"
                                    "See RFC 2645"))

    # -- ATRN -----------------------------------------------------------------------------
    def do_ATRN(self, arg: str) -> None:
        if self.authenticated is None:
            self._count("denied")
            raise SMTPReplyError(r.AUTH_REQUIRED)
        user = self.authenticated
        granted = tuple(self.odmr.grants(user))
        if arg:
            domains = []
            for item in arg.split(","):
                name = item.strip(" ")
                try:
                    if not name or dom.is_literal(name):
                        raise dom.DomainError(name)
                    domains.append(dom.to_ascii(name))
                except dom.DomainError:
                    raise SMTPReplyError(R(501, "5.5.4", "Syntax: ATRN [domain[,domain...]]")
                                         ) from None
            wanted = tuple(dict.fromkeys(domains))
        else:
            wanted = granted
        refused = [d for d in wanted if d not in granted] if wanted else []
        if not wanted or refused:
            self._count("denied")
            what = ", ".join(refused) or "any domain"
            log.info("ATRN denied client={client} user={user} domains={domains}",
                     client=self.client_ip, user=user, domains=",".join(refused) or "-")
            raise SMTPReplyError(R(450, "4.7.1", f"Access denied to mail for {what}"))
        busy = [d for d in wanted if d in self.odmr.active]
        if busy:
            self._count("busy")
            log.info("ATRN busy client={client} user={user} domains={domains}: another ATRN "
                     "session is taking their mail", client=self.client_ip, user=user,
                     domains=",".join(busy))
            raise SMTPReplyError(R(451, "4.3.0", f"ATRN already in progress for "
                                                 f"{', '.join(busy)}, try again later"))
        self._domains = wanted
        for d in wanted:
            self.odmr.active[d] = self
        self._busy = True          # input waits for the verdict, like a spool write
        try:
            d = self.odmr.atrn(wanted, self._turn)
        except Exception:
            d = defer.fail()
        d.addCallbacks(self._atrn_done, self._atrn_failed)

    def _turn(self, n: int) -> defer.Deferred[TurnedConnection]:
        """The handler has *n* recipients for us: 250, and turn around (on
        the next turn of the reactor, once the command loop has let go of
        the input buffer)."""
        d: defer.Deferred[TurnedConnection] = defer.Deferred()
        if self.closed:
            d.errback(TurnFailed("451 4.4.2 the client closed the connection before ATRN's "
                                 "reply"))
            return d
        if self.factory.shutting_down:
            d.errback(TurnFailed("451 4.3.2 stopping: not turning the connection"))
            return d
        self._reply(REVERSING)
        self._flush()
        self.reactor.callLater(0, self._switch, d)
        return d

    def _switch(self, d: defer.Deferred[TurnedConnection]) -> None:
        if self.closed:
            d.errback(TurnFailed("451 4.4.2 connection lost while reversing it"))
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()     # the client side has a timeout for every step
        self._timer = None
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()   # the client's content producer takes over
        if self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()
        peer = self.transport.getPeer()
        hop = NextHop(host=self._peer_name(), address=self.client_ip,
                      port=getattr(peer, "port", 0) or 0, tls="none")
        conn = SMTPClientProtocol(self.reactor, hop)
        if self.tls:
            conn.tls = True
            conn.tls_info = TLSInfo(self.tls_version or "TLS", self.tls_cipher or "unknown",
                                    False)
        self._turned = conn
        conn.makeConnection(self.transport)
        left, self._buf = self._buf, b""
        if left:
            conn.dataReceived(left)
        turned = TurnedConnection(conn, hop, helo_name=self.settings.hostname,
                                  timeouts=self.odmr.timeouts)
        self._turned_session = turned
        turned.start().addCallback(lambda _: turned).chainDeferred(d)

    def _peer_name(self) -> str:
        """The customer's name for logs and DSNs (Remote-MTA): its EHLO name
        when that is a domain name, else its address."""
        try:
            if self.helo and not dom.is_literal(self.helo):
                return dom.to_ascii(self.helo)
        except dom.DomainError:
            pass
        return self.client_ip

    def dataReceived(self, data: bytes) -> None:
        if self._turned is not None:
            self._turned.dataReceived(data)
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self._turned is not None:
            self._turned.connectionLost(reason)
        super().connectionLost(reason)

    def _release_domains(self) -> None:
        for d in self._domains:
            if self.odmr.active.get(d) is self:
                del self.odmr.active[d]
        self._domains = ()

    def _atrn_done(self, n: int) -> None:
        domains = ",".join(self._domains)
        self._release_domains()
        if self._turned is None:
            self._count("no_mail")
            log.info("ATRN client={client} user={user} domains={domains} recipients=0: "
                     "no mail", client=self.client_ip, user=self.authenticated,
                     domains=domains)
            self._resume(NO_MAIL)
            return
        self._count("turned", n)
        log.info("ATRN client={client} user={user} domains={domains} recipients={n}: "
                 "handed over", client=self.client_ip, user=self.authenticated,
                 domains=domains, n=n)
        self._end_turn()

    def _atrn_failed(self, failure: Failure) -> None:
        domains = ",".join(self._domains)
        self._release_domains()
        if self._turned is None:
            # The spool refused the claim, the queue runner is starting or
            # stopping...: the client tries again later (one line, no traceback).
            self._count("failed")
            log.warn("ATRN failed client={client} user={user} domains={domains}: {error}: "
                     "{why}", client=self.client_ip, user=self.authenticated, domains=domains,
                     error=failure.type.__name__, why=failure.getErrorMessage())
            self._resume(ATRN_FAILED)
            return
        self._count("turned")
        if failure.check(TurnFailed):
            log.info("ATRN client={client} user={user} domains={domains}: the turned "
                     "connection took no mail: {why}", client=self.client_ip,
                     user=self.authenticated, domains=domains, why=str(failure.value))
        else:
            log.failure("ATRN client={client} user={user} domains={domains}: delivery over "
                        "the turned connection failed", failure, client=self.client_ip,
                        user=self.authenticated, domains=domains)
        self._end_turn()

    def _end_turn(self) -> None:
        """The handler is done with the turned connection: QUIT (once; a
        connection already gone stays gone)."""
        self._busy = False
        turned = self._turned_session
        if turned is not None and not self.closed:
            turned.close()

    def _count(self, result: str, recipients: int = 0) -> None:
        m = self.factory.metrics
        if m is not None:
            m.atrn_done(result, recipients)

    # -- the stop ---------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        if self._turned is not None:
            return        # handing over mail: it may finish within the grace
        super().begin_shutdown()

    def force_shutdown(self) -> None:
        if self._turned is not None:
            if not self.closed:
                log.info("stopping: aborting the turned ATRN connection client={client}",
                         client=self.client_ip)
                self._turned.abort()
            return
        super().force_shutdown()
