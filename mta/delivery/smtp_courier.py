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
  ``postmaster@<hostname>``.
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

__all__ = ["SMTPCourier"]

log = Logger(namespace="mta.delivery")


class HopFinder(Protocol):
    """The next hops of a domain, most preferred first (mta.delivery.router.Router);
    fails with RouteError."""

    def route(self, domain: str) -> Deferred[list[NextHop]]: ...


class Transmitter(Protocol):
    """Hands a message to the first of *hops* that takes it
    (mta.smtp.client.ConnectionPool)."""

    def deliver(self, hops: list[NextHop], msg: OutboundMessage) -> Deferred[DeliveryResult]: ...

    def close(self) -> Deferred[None] | None: ...


class SMTPCourier:
    """Relay by SMTP: ``router`` finds the hops, ``pool`` delivers;
    ``hostname`` is ours (for a bare postmaster).  The router is not closed
    here (the scheduler owns it)."""

    def __init__(self, router: HopFinder, pool: Transmitter, *, hostname: str) -> None:
        self.router = router
        self.pool = pool
        self.hostname = hostname

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
        out = OutboundMessage(
            queue_id=m.queue_id, sender=m.sender,
            recipients=[OutboundRecipient(self._address(r.address), r.notify, r.orcpt)
                        for r in rcpts],
            headers=m.headers, body=m.body, body_type=m.body_type, smtputf8=m.smtputf8,
            ret=m.ret, envid=m.envid)
        res = await self.pool.deliver(hops, out)
        relay = str(res.remote) if res.remote is not None else "none"
        return [Outcome.from_reply(r.code, r.status, r.text, r.remote, relay=relay,
                                   tls=res.tls, dsn_passed=res.dsn_offered)
                for r in res.results]

    def _address(self, address: str) -> str:
        return address if "@" in address else f"{address}@{self.hostname}"
