"""The SMTP relay courier: a :class:`mta.delivery.types.Courier` that asks
the router for the next hops of the recipients' domain and hands the
message to the SMTP client's ConnectionPool.

* routing failures become Outcomes of our own (``RouteError``: its status,
  550 or 451; anything unforeseen: 451 4.4.3, logged with its traceback);
* each ``RecipientResult`` of the client becomes an Outcome with
  :meth:`Outcome.from_reply` (so its kind is decided by ``reply_kind``),
  carrying the hop reached (``relay=``), the TLS session (``tls=``) and
  whether the hop offered DSN (it then owes the success report);
* a bare ``postmaster`` (accepted without a domain) is sent as
  ``postmaster@<hostname>``;
* after :meth:`SMTPCourier.fresh_connections` (a flush: ETRN), a domain's
  mail goes out on a connection opened since, never one cached before.

:class:`TurnedCourier` is the same conversion over a connection the
customer opened and turned around (ATRN), for the queue runner's
``deliver_over``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..address import domain_key
from ..smtp.client import DeliveryResult, OutboundMessage, OutboundRecipient
from .router import RouteError
from .types import NextHop, Outcome, QueuedMessage, QueuedRecipient

__all__ = ["HopFinder", "SMTPCourier", "Transmitter", "TurnedCourier", "TurnedTransmitter",
           "outbound_message", "outcomes"]

log = Logger(namespace="mta.delivery")


class HopFinder(Protocol):
    """The next hops of a domain, most preferred first (mta.delivery.router.Router);
    fails with RouteError."""

    def route(self, domain: str) -> Deferred[list[NextHop]]: ...


class Transmitter(Protocol):
    """Hands a message to the first of *hops* that takes it
    (mta.smtp.pool.ConnectionPool); with *opened_after*, on a connection
    opened at that time or later only (only passed after a flush)."""

    def deliver(self, hops: list[NextHop], msg: OutboundMessage, *,
                opened_after: float | None = None) -> Deferred[DeliveryResult]: ...

    def close(self) -> Deferred[None] | None: ...


class TurnedTransmitter(Protocol):
    """Delivers over one connection, to whoever is at its other end
    (mta.smtp.pool.TurnedConnection: a connection turned around by ATRN)."""

    def deliver(self, msg: OutboundMessage) -> Deferred[DeliveryResult]: ...


class SMTPCourier:
    """Relay by SMTP: ``router`` finds the hops, ``pool`` delivers;
    ``hostname`` is ours (for a bare postmaster).  The router is not closed
    here (the scheduler owns it)."""

    def __init__(self, router: HopFinder, pool: Transmitter, *, hostname: str) -> None:
        self.router = router
        self.pool = pool
        self.hostname = hostname
        self._fresh_since: dict[str, float] = {}   # domain -> deliveries need a connection since

    def fresh_connections(self, domain: str, since: float) -> None:
        """From now on, *domain*'s mail goes out on connections opened at
        *since* or later (the queue runner calls this when a flush starts).
        One entry per flushed domain, replaced by the next flush."""
        self._fresh_since[domain] = since

    def deliver(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                destination: str) -> Deferred[list[Outcome]]:
        return Deferred.fromCoroutine(self._deliver(message, list(recipients), destination))

    def close(self) -> Deferred[None] | None:
        return self.pool.close()

    async def _deliver(self, m: QueuedMessage, rcpts: list[QueuedRecipient],
                       destination: str) -> list[Outcome]:
        domain = domain_key(rcpts[0].address, self.hostname)
        try:
            hops = await self.router.route(domain)
        except RouteError as e:
            return [Outcome.ours(e.status, e.text)] * len(rcpts)
        except Exception as e:  # resolver trouble we did not foresee: try again later
            log.failure("routing {domain} failed", domain=domain)
            return [Outcome.ours("4.4.3", f"routing failed: {e}")] * len(rcpts)
        out = outbound_message(m, rcpts, self.hostname)
        since = self._fresh_since.get(domain)
        res = await (self.pool.deliver(hops, out) if since is None
                     else self.pool.deliver(hops, out, opened_after=since))
        return outcomes(res)


class TurnedCourier:
    """The courier of one ATRN session (RFC 2645): delivers over the
    customer's own connection, turned around
    (a :class:`TurnedTransmitter`), whatever the destination -- the queue runner's
    ``deliver_over`` hands it the recipients of the domains asked for.
    Messages and results are converted exactly as for :class:`SMTPCourier`.
    ``close()`` does nothing: the ODMR session owns the connection and says
    QUIT when the runner is done."""

    def __init__(self, connection: TurnedTransmitter, *, hostname: str) -> None:
        self.connection = connection
        self.hostname = hostname

    def deliver(self, message: QueuedMessage, recipients: Sequence[QueuedRecipient],
                destination: str) -> Deferred[list[Outcome]]:
        return Deferred.fromCoroutine(self._deliver(message, list(recipients)))

    async def _deliver(self, m: QueuedMessage, rcpts: list[QueuedRecipient]) -> list[Outcome]:
        res = await self.connection.deliver(outbound_message(m, rcpts, self.hostname))
        return outcomes(res)

    def close(self) -> Deferred[None] | None:
        return None


def outbound_message(m: QueuedMessage, rcpts: Sequence[QueuedRecipient],
                     hostname: str) -> OutboundMessage:
    """What the SMTP client sends for *rcpts* of *m* (a bare ``postmaster``
    as ``postmaster@<hostname>``)."""
    return OutboundMessage(
        queue_id=m.queue_id, sender=m.sender,
        recipients=[OutboundRecipient(r.address if "@" in r.address
                                      else f"{r.address}@{hostname}", r.notify, r.orcpt)
                    for r in rcpts],
        headers=m.headers, body=m.body, body_type=m.body_type, smtputf8=m.smtputf8,
        ret=m.ret, envid=m.envid)


def outcomes(res: DeliveryResult) -> list[Outcome]:
    """The client's result as one Outcome per recipient (kind by reply_kind)."""
    relay = str(res.remote) if res.remote is not None else "none"
    return [Outcome.from_reply(r.code, r.status, r.text, r.remote, relay=relay,
                               tls=res.tls, dsn_passed=res.dsn_offered)
            for r in res.results]
