"""Where the outbound client's connections come from, and who hands
messages to a :class:`mta.smtp.session.ClientSession` over them:

* :class:`ConnectionPool`: connects (``connectTCP``), caches idle
  connections, tries the next hops in order, holds rejected logins -- what
  the SMTP courier delivers through;
* :class:`TurnedConnection`: one connection the peer opened to us and
  turned around (ATRN, RFC 2645).

The conversation itself (greeting, EHLO, STARTTLS, AUTH, transactions) and
the rules the pool follows (hop failures, TLS policies, connection reuse,
results we make ourselves) are described in mta.smtp.client.
"""
from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from twisted.internet import defer, error
from twisted.logger import Logger

from .client import (ConnectFactory, DeadConnection, DeliveryResult, HopFailure,
                     OutboundMessage, RecipientResult, SMTPClientProtocol, TLSFailed,
                     connect_failure_text, hop_name)
from .content import Content, prepare_content
from .session import ClientSession, TLSPolicy
from .settings import Timeouts
from .types import NextHop, reply_detail, reply_kind

log = Logger(namespace="mta.smtp")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


async def _without_control_characters(
        msg: OutboundMessage,
        send: Callable[[OutboundMessage], Awaitable[DeliveryResult]]) -> DeliveryResult:
    """``send(msg)``, but never with a control character in an address:
    nothing stored should hold one, but a CR or LF here would be command
    injection.  Such a sender fails the message (553 5.1.7), such a
    recipient itself (553 5.1.3); the others are sent."""
    if _CONTROL.search(msg.sender):
        text = "553 5.1.7 sender address contains control characters"
        return DeliveryResult([RecipientResult(r.address, 553, "5.1.7", text)
                               for r in msg.recipients], None, False)
    bad = [i for i, r in enumerate(msg.recipients) if _CONTROL.search(r.address)]
    if not bad:
        return await send(msg)
    good = [r for i, r in enumerate(msg.recipients) if i not in bad]
    sub = (await send(replace(msg, recipients=good)) if good
           else DeliveryResult([], None, False))
    it = iter(sub.results)
    text = "553 5.1.3 recipient address contains control characters"
    return DeliveryResult(
        [RecipientResult(r.address, 553, "5.1.3", text) if i in bad
         else next(it) for i, r in enumerate(msg.recipients)],
        sub.remote, sub.dsn_offered, sub.tls)


class TurnedConnection:
    """Deliveries over one connection this client did not open: one the
    peer opened to us and turned around (ATRN, RFC 2645).  The same
    :class:`ClientSession` as the pool's runs over it -- greeting, EHLO (the
    extensions as offered: PIPELINING, 8BITMIME, DSN, SIZE...), the
    transactions -- with no STARTTLS (the connection is whatever it already
    is: TLS from before the turn, or plain text) and no login.

    *conn* is an SMTPClientProtocol already attached to the transport
    (``makeConnection``); *hop* names the peer in replies and logs.
    ``start()`` waits for the peer's 220 greeting and says EHLO; raises
    :class:`TurnFailed` when the peer does not take mail.  ``deliver(msg)``
    fires with a :class:`DeliveryResult` like ``ConnectionPool.deliver``:
    a recipient refused is the peer's reply; a connection lost or timed out
    before the end of data gives every recipient of that message 451 4.4.2
    (nothing else is tried: there is no other hop).  After a loss every
    further ``deliver`` fails that way at once.  ``close()``: QUIT; fires
    when the connection is closed."""

    def __init__(self, conn: SMTPClientProtocol, hop: NextHop, *, helo_name: str,
                 timeouts: Timeouts) -> None:
        self.conn = conn
        self.hop = hop
        self.timeouts = timeouts
        self._quitting: defer.Deferred | None = None
        self.session = ClientSession(helo_name=helo_name, timeouts=timeouts,
                                     tls=TLSPolicy(starttls=False),
                                     release=lambda c: None, quit=self._quit)

    @property
    def usable(self) -> bool:
        return self.conn.usable and self._quitting is None

    def start(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            await self.session.start(self.conn, self.hop, False)
        except HopFailure as e:
            raise TurnFailed(e.text) from None

    def deliver(self, msg: OutboundMessage) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(_without_control_characters(msg, self._send))

    async def _send(self, msg: OutboundMessage) -> DeliveryResult:
        hop = self.hop
        try:
            if not self.usable:
                raise HopFailure.ours(hop, "4.4.2", f"connection with {hop_name(hop)} "
                                       "closed before this message was sent")
            return await self.session.send(self.conn, hop, msg, prepare_content(msg), False, False)
        except HopFailure as e:
            return DeliveryResult([e.result(r.address) for r in msg.recipients],
                                  hop if e.reached else None, False, self.conn.tls_info)

    def close(self) -> defer.Deferred:
        if self._quitting is None:
            self._quit(self.conn)
        assert self._quitting is not None
        return self._quitting

    def _quit(self, conn: SMTPClientProtocol) -> None:
        if self._quitting is None:
            self._quitting = conn.quit(self.timeouts.quit)


class TurnFailed(Exception):
    """The peer of a turned connection did not take mail (greeting or EHLO
    refused, connection lost or timed out): ``str()`` says why, in the form
    of a reply ("451 4.4.2 ...")."""


class ConnectionPool:
    """Delivers messages to next hops and keeps connections for reuse.

    ``starttls=False`` disables opportunistic STARTTLS (policy ``may``
    becomes ``none``); ``tls_options`` is an
    ``IOpenSSLClientConnectionCreator`` or context factory to use instead of
    the default unverified one (policies ``may`` and ``encrypt``).
    ``trust_root`` (an ``IOpenSSLTrustRoot``, see :func:`load_trust_root`)
    is what policy ``verify`` checks certificates against; None: the
    system's (``platformTrust()``).  ``auth_failure_hold``: seconds during
    which a rejected login is not tried again (0: no hold).
    """

    def __init__(self, *, helo_name: str, reactor: Any, timeouts: Timeouts = Timeouts(),
                 max_idle_per_host: int = 4, starttls: bool = True,
                 tls_options: Any = None, trust_root: Any = None,
                 auth_failure_hold: float = 300.0):
        self.helo_name = helo_name
        self.reactor = reactor
        self.timeouts = timeouts
        self.max_idle_per_host = max_idle_per_host
        self.tls = TLSPolicy(starttls=starttls, tls_options=tls_options, trust_root=trust_root)
        self.session = ClientSession(helo_name=helo_name, timeouts=timeouts, tls=self.tls,
                                     release=self._release, quit=self._quit)
        self._idle: dict[tuple[str, int], list[SMTPClientProtocol]] = {}
        self._quitting: set[defer.Deferred] = set()
        self._closed = False
        self.connections_made = 0
        self.auth_failure_hold = auth_failure_hold
        self._auth_rejected: dict[tuple, tuple[float, str, str]] = {}  # until, status, why

    @property
    def trust_root(self) -> Any:
        """What policy ``verify`` checks certificates against (None: the system's)."""
        return self.tls.trust_root

    # -- public -----------------------------------------------------------------
    def deliver(self, hops: list[NextHop], msg: OutboundMessage, *,
                opened_after: float | None = None) -> defer.Deferred[DeliveryResult]:
        """Deliver *msg* to the first of *hops* that takes it; with
        *opened_after*, on a connection opened at that time or later only
        (cached older ones to these hops are closed)."""
        if opened_after is not None:
            for hop in hops:
                self._drop_older(hop, opened_after)
        return defer.Deferred.fromCoroutine(self._deliver(list(hops), msg))

    def close(self) -> defer.Deferred[None]:
        """QUIT the idle connections; fires when they (and earlier QUITs) are closed."""
        self._closed = True
        for conns in list(self._idle.values()):
            for conn in list(conns):
                self._drop_idle(conn)
                self._quit(conn)
        self._idle.clear()
        return defer.DeferredList(list(self._quitting), consumeErrors=True).addCallback(
            lambda _: None)

    def idle_count(self, hop: NextHop | None = None) -> int:
        if hop is not None:
            return len(self._idle.get(self._key(hop), ()))
        return sum(len(v) for v in self._idle.values())

    # -- delivery ---------------------------------------------------------------------
    async def _deliver(self, hops: list[NextHop], msg: OutboundMessage) -> DeliveryResult:
        return await _without_control_characters(
            msg, lambda good: self._deliver_hops(hops, good))

    async def _deliver_hops(self, hops: list[NextHop], msg: OutboundMessage) -> DeliveryResult:
        content = prepare_content(msg)
        failures: list[HopFailure] = []
        for hop in self._order(hops):
            try:
                return await self._attempt(hop, msg, content)
            except HopFailure as e:
                failure = e
            except defer.CancelledError:
                raise
            except Exception:
                log.failure("{queue_id}: delivery to {hop} failed", queue_id=msg.queue_id,
                            hop=hop_name(hop))
                failure = HopFailure.ours(hop, "4.3.0", "local error in the SMTP client",
                                          reached=False)
            log.info("{queue_id}: {hop}: {text}", queue_id=msg.queue_id,
                     hop=hop_name(hop), text=failure.text)
            failures.append(failure)
            if failure.final:
                break
        if not failures:
            text = "451 4.4.1 no next hop to deliver to"
            results = [RecipientResult(r.address, 451, "4.4.1", text) for r in msg.recipients]
            return DeliveryResult(results, None, False)
        reached = [f for f in failures if f.reached]
        last = reached[-1] if reached else failures[-1]
        code, status = last.code, last.status
        if reply_kind(code) == "permanent" and not all(f.permanent for f in failures):
            code, status = 451, "4" + status[1:]
        results = [RecipientResult(r.address, code, status, last.text, last.remote)
                   for r in msg.recipients]
        return DeliveryResult(results, last.hop if last.reached else None, False,
                              last.tls if last.reached else None)

    def _order(self, hops: list[NextHop]) -> list[NextHop]:
        """The hops in order, but one with a cached connection first."""
        for i, hop in enumerate(hops):
            if any(c.usable for c in self._idle.get(self._key(hop), ())):
                return [hop] + hops[:i] + hops[i + 1:]
        return hops

    async def _attempt(self, hop: NextHop, msg: OutboundMessage,
                       content: Content) -> DeliveryResult:
        if hop.auth is not None:
            self._check_auth_hold(hop)
        conn = self._take_idle(hop)
        use_tls = self.tls.policy(hop) != "none"
        while True:
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._open(hop, use_tls)
                except TLSFailed as e:
                    log.info("{hop}: TLS handshake failed ({why}), retrying without TLS",
                             hop=hop_name(hop), why=e.reason or "no reason given")
                    use_tls = False
                    continue
            try:
                return await self.session.send(conn, hop, msg, content, reused, use_tls,
                                               self._open)
            except DeadConnection:
                log.debug("{hop}: cached connection was dead, reconnecting", hop=hop_name(hop))
                conn.abort()
                conn = None
            except HopFailure as e:
                if e.tls is None:
                    e.tls = conn.tls_info
                raise

    # -- connection setup ---------------------------------------------------------------
    async def _connect(self, hop: NextHop) -> SMTPClientProtocol:
        t = self.timeouts
        proto = SMTPClientProtocol(self.reactor, hop)
        d = proto.connected_d
        timer: Any = None
        try:
            connector = self.reactor.connectTCP(hop.address, hop.port, ConnectFactory(proto),
                                                timeout=t.connect)
            proto.connector = connector

            def timed_out() -> None:
                if not d.called:
                    d.errback(error.TimeoutError())
                    connector.stopConnecting()
            timer = self.reactor.callLater(t.connect, timed_out)
            await d
        except defer.CancelledError:
            raise
        except Exception as e:
            why = connect_failure_text(e)
            raise HopFailure.ours(hop, "4.4.1", f"connect to {hop_name(hop)}: {why}",
                                   reached=False) from None
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        self.connections_made += 1
        proto.opened_at = self.reactor.seconds()
        return proto

    async def _open(self, hop: NextHop, use_tls: bool) -> SMTPClientProtocol:
        """A new connection to *hop*, started (see ClientSession.start); a
        rejected login starts the hold (``auth_failure_hold``)."""
        conn = await self._connect(hop)
        try:
            return await self.session.start(conn, hop, use_tls)
        except HopFailure as e:
            if e.login_rejected and self.auth_failure_hold > 0 and hop.auth is not None:
                self._auth_rejected[(hop.address, hop.port, hop.auth)] = (
                    self.reactor.seconds() + self.auth_failure_hold, e.status,
                    reply_detail(e.text))
            raise

    # -- AUTH hold and the cache key ---------------------------------------------------
    def _check_auth_hold(self, hop: NextHop) -> None:
        key = (hop.address, hop.port, hop.auth)
        held = self._auth_rejected.get(key)
        if held is None:
            return
        until, status, why = held
        left = until - self.reactor.seconds()
        if left <= 0:
            del self._auth_rejected[key]
            return
        raise HopFailure.ours(hop, status, f"{why} (not tried again for another {left:.0f}s)",
                               final=True)

    def _key(self, hop: NextHop) -> tuple:
        """The connection cache key: a connection is reused only for the same requirements."""
        policy = self.tls.policy(hop)
        return (hop.address, hop.port, policy, hop.host if policy == "verify" else "", hop.auth)

    # -- the cache ------------------------------------------------------------------------
    def _release(self, conn: SMTPClientProtocol) -> None:
        if not conn.usable:
            return
        if conn._early:
            # The server said more than it was asked: replies would be out of step.
            conn.abort()
            return
        key = self._key(conn.hop)
        conns = self._idle.setdefault(key, [])
        if self._closed or len(conns) >= self.max_idle_per_host or self.timeouts.idle <= 0:
            if not conns:
                del self._idle[key]
            self._quit(conn)
            return
        conn.idle = True
        conn.on_lost = self._lost_idle
        conn.idle_timer = self.reactor.callLater(self.timeouts.idle, self._expire, conn)
        conns.append(conn)

    def _take_idle(self, hop: NextHop) -> SMTPClientProtocol | None:
        key = self._key(hop)
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()          # the most recently used
            self._unidle(conn)
            if conn.usable:
                if not conns:
                    self._idle.pop(key, None)
                return conn
        self._idle.pop(key, None)
        return None

    def _drop_older(self, hop: NextHop, since: float) -> None:
        """QUIT the cached connections to *hop* opened before *since*."""
        for conn in list(self._idle.get(self._key(hop), ())):
            if conn.opened_at < since:
                self._drop_idle(conn)
                self._quit(conn)

    def _unidle(self, conn: SMTPClientProtocol) -> None:
        conn.idle = False
        conn.on_lost = None
        if conn.idle_timer is not None and conn.idle_timer.active():
            conn.idle_timer.cancel()
        conn.idle_timer = None

    def _drop_idle(self, conn: SMTPClientProtocol) -> None:
        key = self._key(conn.hop)
        conns = self._idle.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[key]
        self._unidle(conn)

    def _lost_idle(self, conn: SMTPClientProtocol) -> None:
        self._drop_idle(conn)

    def _expire(self, conn: SMTPClientProtocol) -> None:
        conn.idle_timer = None
        self._drop_idle(conn)
        self._quit(conn)

    def _quit(self, conn: SMTPClientProtocol) -> None:
        d = conn.quit(self.timeouts.quit)
        if d.called:
            return
        self._quitting.add(d)
        d.addBoth(lambda r: self._quitting.discard(d))
